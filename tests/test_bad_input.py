"""Bad input gets one clear error and leaves the model as it was."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import inputs, logits, perturb, tiny_model

from peft_clm import ClmConfig, ClmLayer


def test_bad_alpha_is_rejected_and_nothing_changes():
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="hidden", alpha=0.3))
    for bad in (float("nan"), float("inf"), [0.1, float("nan")], "strong", True, [[0.1]]):
        with pytest.raises(ValueError, match="alpha"):
            model.set_alpha(bad)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_alpha({"default": 0.1, "nope": 1.0})
    assert model.get_alpha() == {"default": 0.3}
    with pytest.raises(ValueError, match="alpha must be a finite"):
        ClmConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="interpolation"):
        ClmConfig(interpolation="blend")
    with pytest.raises(ValueError, match="interpolation"):
        model.set_interpolation("blend")


def test_unsupported_architecture_is_a_clear_error_and_leaves_the_model():
    from transformers import OPTConfig, OPTForCausalLM

    base = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)).eval()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="zero_modules"):
        get_peft_model(base, ClmConfig())
    assert not any(isinstance(m, ClmLayer) for m in base.modules())
    assert base.state_dict().keys() == before.keys()
    ids, mask = inputs(vocab=50)
    ref = logits(base, ids, mask)
    model = get_peft_model(base, ClmConfig(zero_modules=["self_attn.out_proj", "fc2"], interpolation="hidden"))
    assert torch.equal(logits(model, ids, mask), ref)  # an explicit zero_modules makes it work, exactly
    with pytest.raises(ValueError, match="same modules"):
        model.add_adapter("b", ClmConfig(zero_modules=["self_attn.out_proj"]))
    with pytest.raises(ValueError, match="not a module"):
        get_peft_model(tiny_model("llama"), ClmConfig(zero_modules=["self_attn.nope", "mlp.down_proj"]))


def test_alpha_values_accepted_and_refused():
    import numpy as np

    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="hidden", alpha=0.3))
    good_values = (np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5), 1000, -1000.0, [0.1, 2.0])
    for good in good_values:
        model.set_alpha(good)
    for bad, message in (
        (1e30, "1000"), (-1e300, "1000"), (10**400, "too large"), ([True, False], "list of numbers"),
        (np.bool_(True), "boolean"), ([], "non-empty"), ([0.1, 2e3], "1000"), ({"default": "x"}, "number"),
    ):
        with pytest.raises(ValueError, match=message):
            model.set_alpha(bad)
    with pytest.raises(ValueError, match="1000"):
        ClmConfig(alpha=1e30)


def test_per_sequence_alpha_counts_are_checked_against_the_callers_batch():
    ids, mask = inputs(batch=2)
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="logits"))
    with pytest.raises(ValueError, match="has 1 values .* 2 rows"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_return_sequences=2,
                       do_sample=True, clm_alpha=[0.5])


def test_after_merging_alpha_and_mode_changes_are_refused_until_unmerged():
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights", alpha=0.4))
    perturb(model)
    model.merge_adapter()
    merged = logits(model, ids, mask)
    for change in (lambda: model.set_alpha(0.9), lambda: model.set_interpolation("hidden"),
                   lambda: logits(model, ids, mask, clm_alpha=0.9)):
        with pytest.raises(ValueError, match="unmerge"):
            change()
    assert torch.equal(logits(model, ids, mask), merged)
    model.unmerge_adapter()
    model.set_alpha(0.9)  # fine once unmerged


@pytest.mark.parametrize("zero_modules, message", [
    (["self_attn.q_proj", "mlp.up_proj"], "identity"),
    (["self_attn.o_proj"], "identity"),
    ([], "non-empty list"),
    ([""], "non-empty list"),
    ("self_attn.o_proj", "non-empty list"),
    (["self_attn.o_proj", "self_attn.o_proj"], "distinct"),
    (["self_attn.rotary_nope", "mlp.down_proj"], "not a module"),
])
def test_zero_modules_must_make_the_copy_the_identity(zero_modules, message):
    base = tiny_model("llama")
    ids, mask = inputs()
    ref = logits(base, ids, mask)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, ClmConfig(zero_modules=zero_modules))
    assert not any(isinstance(m, ClmLayer) for m in base.modules())
    assert torch.equal(logits(base, ids, mask), ref)


def test_an_edited_zero_modules_in_a_saved_config_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["zero_modules"] = ["self_attn.q_proj", "mlp.up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="identity"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, ClmLayer) for m in base.modules())


def test_bloom_works_in_logits_mode_through_explicit_zero_modules():
    from transformers import BloomConfig, BloomForCausalLM

    def base():
        torch.manual_seed(0)
        return BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)).eval()

    ids, mask = inputs(left_pad=1)
    base_logits = logits(base(), ids, mask)
    zero = ["self_attention.dense", "mlp.dense_4h_to_h"]
    model = get_peft_model(base(), ClmConfig(zero_modules=zero, alpha=1.0))
    assert torch.equal(logits(model, ids, mask), base_logits)
    perturb(model, scale=0.2)
    aligned = logits(model, ids, mask)
    got = logits(model, ids, mask, clm_alpha=[0.3, 1.5])
    expected = torch.stack([base_logits[i] + a * (aligned[i] - base_logits[i]) for i, a in enumerate([0.3, 1.5])])
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5)


def test_recurrent_architectures_are_refused_at_injection():
    from transformers import MambaConfig, MambaForCausalLM

    base = MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match="does not support .*recurrent state"):
        get_peft_model(base, ClmConfig(zero_modules=["mixer.out_proj"]))
    assert not any(isinstance(m, ClmLayer) for m in base.modules())
