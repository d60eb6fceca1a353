"""Exactness on tiny random models of several architectures: a fresh adapter and alpha 0 are the base model
exactly, and every mode follows its formula against independent hook-based references."""


import pytest
import torch
from peft import get_peft_model
from reference import hidden_reference_logits, standalone_copy
from tiny_models import ARCHS, MODES, inputs, logits, perturb, tiny_model

from peft_clm import ClmConfig
from peft_clm.transformers_compat import find_decoder_layers


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_fresh_adapter_is_exactly_the_base_model(arch, mode):
    ids, mask = inputs(left_pad=2)
    ref = logits(tiny_model(arch), ids, mask)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode))
    for alpha in (0.0, 0.5, 1.0, 2.0, -1.0):
        model.set_alpha(alpha)
        assert torch.equal(logits(model, ids, mask), ref), alpha


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_trained_adapter_alpha_zero_and_disabled_are_the_base(arch, mode):
    ids, mask = inputs()
    ref = logits(tiny_model(arch), ids, mask)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode))
    perturb(model)
    assert not torch.allclose(logits(model, ids, mask), ref, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), ref)
    model.set_alpha(0.0)
    assert torch.equal(logits(model, ids, mask), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_mode_follows_the_formula(arch):
    ids, mask = inputs(left_pad=1)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="hidden"))
    perturb(model)
    clm = standalone_copy(model.base_model.clm_layer().clm_layers["default"], slot=0)
    base = tiny_model(arch)
    for alpha in (0.3, 1.0, 1.7, -0.5):
        model.set_alpha(alpha)
        ref = hidden_reference_logits(base, [clm], [alpha], ids, mask)
        torch.testing.assert_close(logits(model, ids, mask), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_mode_follows_the_formula(arch):
    ids, mask = inputs()
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="weights"))
    perturb(model)
    layer = model.base_model.clm_layer()
    base = tiny_model(arch)
    _, base_layers = find_decoder_layers(base)
    zero = layer.zero_modules
    for alpha in (0.25, 1.5, -0.5):
        model.set_alpha(alpha)
        mixed = standalone_copy(layer.clm_layers["default"], slot=0)
        with torch.no_grad():
            w0 = dict(base_layers[0].named_parameters())
            for name, p in mixed.named_parameters():
                init = torch.zeros_like(p) if any(name.startswith(z + ".") for z in zero) else w0[name]
                p.copy_(init + alpha * (dict(layer.clm_layers["default"].named_parameters())[name] - init))
        ref = hidden_reference_logits(base, [mixed], [1.0], ids, mask)
        torch.testing.assert_close(logits(model, ids, mask), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_mode_is_the_lerp_of_base_and_aligned(arch):
    ids, mask = inputs(left_pad=2)
    base_logits = logits(tiny_model(arch), ids, mask)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="logits"))
    perturb(model)
    model.set_alpha(1.0)
    aligned = logits(model, ids, mask)
    model.set_interpolation("hidden")
    torch.testing.assert_close(logits(model, ids, mask), aligned, atol=0, rtol=0)  # alpha 1: the aligned path
    model.set_interpolation("logits")
    for alpha in (0.5, 1.5, -0.5):
        model.set_alpha(alpha)
        expected = (1 - alpha) * base_logits + alpha * aligned
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_several_adapters_follow_the_sum_formula(mode):
    arch = "llama"
    ids, mask = inputs()
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode))
    model.add_adapter("b", ClmConfig(interpolation=mode))
    perturb(model, seed=1)
    perturb(model, seed=2, adapter="b")
    model.base_model.set_adapter(["default", "b"])
    model.set_alpha({"default": 0.6, "b": -0.4})
    got = logits(model, ids, mask)
    layer = model.base_model.clm_layer()
    base = tiny_model(arch)
    if mode == "hidden":
        clms = [standalone_copy(layer.clm_layers[n], 0) for n in ("default", "b")]
        ref = hidden_reference_logits(base, clms, [0.6, -0.4], ids, mask)
    elif mode == "weights":
        mixed = standalone_copy(layer.clm_layers["default"], 0)
        w0 = layer.identity_parameters()
        wa, wb = layer.adapter_parameters("default"), layer.adapter_parameters("b")
        with torch.no_grad():
            for name, p in mixed.named_parameters():
                p.copy_(w0[name] + 0.6 * (wa[name] - w0[name]) - 0.4 * (wb[name] - w0[name]))
        ref = hidden_reference_logits(base, [mixed], [1.0], ids, mask)
    else:
        base_logits = logits(base, ids, mask)
        singles = []
        for n in ("default", "b"):
            model.base_model.set_adapter(n)
            model.set_alpha({n: 1.0})
            singles.append(logits(model, ids, mask))
        ref = base_logits + 0.6 * (singles[0] - base_logits) - 0.4 * (singles[1] - base_logits)
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached(arch, mode):
    ids, mask = inputs(batch=3, length=6, left_pad=2)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=0.7))
    perturb(model, scale=0.2)
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False}
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    base = tiny_model(arch)
    assert not torch.equal(cached, base.generate(input_ids=ids, **kw))
