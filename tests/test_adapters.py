"""Adapters of one model: adding, activating, deleting, what trains, one mode for all, copies and configs."""

import copy
import json

import pytest
import torch
from peft import PeftConfig, get_peft_model
from tiny_models import MODES, inputs, logits, perturb, tiny_model

from peft_clm import ClmConfig, ClmLayer


def test_adapter_management():
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="hidden"))
    model.add_adapter("b", ClmConfig(interpolation="hidden"))
    layer = model.base_model.clm_layer()
    assert sorted(layer.clm_layers) == ["b", "default"]
    assert layer.cache_slot == {"default": 3, "b": 4}
    model.set_adapter("b")
    assert model.active_adapters == ["b"]
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.base_model.set_adapter(["b", "nope"])
    model.delete_adapter("default")
    assert list(layer.clm_layers) == ["b"] and "default" not in layer.alpha
    with pytest.raises(ValueError, match="share"):
        model.add_adapter("c", ClmConfig(layer_index=1))
    assert "c" not in model.peft_config


def test_only_the_new_layer_is_trainable_and_learns():
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ClmConfig(interpolation="hidden"))
    trainable, total = model.get_nb_trainable_parameters()
    layer_params = sum(p.numel() for p in model.base_model.clm_layer().clm_layers["default"].parameters())
    assert trainable == layer_params
    assert total == sum(before[k].numel() for k in before if "rotary" not in k) + layer_params
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".clm_layers.default." in n for n in names)
    ids, mask = inputs()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".clm_layers.default." in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "o_proj" in n or "down_proj" in n)
    opt.step()
    unloaded = model.unload()
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_checkpointing_and_dtypes(mode, dtype):
    ids, mask = inputs()
    results = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_model("qwen2", dtype=dtype), ClmConfig(interpolation=mode, alpha=0.7))
        perturb(model)
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
            for module in model.modules():  # count the layers that run through checkpointing
                function = getattr(module, "_gradient_checkpointing_func", None)
                if function is not None:
                    module._gradient_checkpointing_func = lambda *a, f=function, **k: calls.append(1) or f(*a, **k)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        # the three original layers and the CLM layer's copy, whose activations are recomputed too; weights mode's
        # differentiable mix runs the copy by a functional call, which a recompute would run without its parameters
        expected = 3 if mode == "weights" else 4
        assert len(calls) == (expected if checkpointing else 0), len(calls)
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
        results.append((loss.detach().float(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(results[0][1], results[1][1], atol=tol, rtol=tol)


def test_a_second_adapter_adopts_the_models_mode_and_is_saved_with_it(tmp_path):
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="logits", alpha=0.5))
    model.add_adapter("b", ClmConfig(interpolation="weights", alpha=0.5))
    perturb(model, adapter="b", seed=3)
    assert model.peft_config["b"].interpolation == "logits" == model.base_model.interpolation
    model.base_model.set_adapter("b")
    got = logits(model, ids, mask)
    model.set_interpolation("logits")  # explicit: the same mode, so the same logits
    assert torch.equal(logits(model, ids, mask), got)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert saved["interpolation"] == "logits"


@pytest.mark.parametrize("mode", MODES)
def test_a_deep_copy_is_independent(mode):
    ids, mask = inputs(left_pad=1)
    model = get_peft_model(tiny_model("gemma2"), ClmConfig(interpolation=mode, alpha=0.6))
    perturb(model)
    before = logits(model, ids, mask)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids, mask), before)
    perturb(twin, seed=5, scale=0.3)  # changes the copy only
    assert torch.equal(logits(model, ids, mask), before)
    assert not torch.allclose(logits(twin, ids, mask), before, atol=1e-4)
    twin.unload()  # removes the copy's hooks, not the original's
    assert torch.equal(logits(model, ids, mask), before)
    assert not any(isinstance(m, ClmLayer) for m in twin.base_model.model.modules())


def test_a_config_directory_round_trips(tmp_path):
    config = ClmConfig(interpolation="hidden", alpha=0.25, layer_index=1)
    config.save_pretrained(tmp_path)
    loaded = ClmConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ClmConfig)
    assert (loaded.interpolation, loaded.alpha, loaded.layer_index) == ("hidden", 0.25, 1)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), ClmConfig)
