"""Bad input gets one clear error and leaves the model as it was."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import inputs, logits, tiny_model

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
