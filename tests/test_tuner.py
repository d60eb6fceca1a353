"""The CLM tuner on tiny random models of several architectures: exactness, formulas, save/load, merge, errors."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import perturb
from peft import PeftConfig, PeftModel, get_peft_model
from reference import hidden_reference_logits, standalone_copy
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, TINY_CONFIGS, inputs, tiny_model

from peft_clm import ClmConfig, ClmLayer
from peft_clm.transformers_compat import find_decoder_layers

MODES = ["hidden", "weights", "logits"]
TESTS_DIR = os.path.dirname(__file__)


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


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
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
        results.append((loss.detach().float(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(results[0][1], results[1][1], atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached(arch, mode):
    ids, mask = inputs(batch=3, length=6, left_pad=2)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=0.7))
    perturb(model, scale=0.2)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    base = tiny_model(arch)
    assert not torch.equal(cached, base.generate(input_ids=ids, **kw))


# ---------------------------------------------------------------------------------------------- save / load
def _run_python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=TESTS_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", MODES)
def test_save_and_load_in_a_fresh_process(tmp_path, mode):
    archs = ["llama", "gemma2", "gpt2"]
    ids, mask = inputs(left_pad=1)
    save_file({"ids": ids, "mask": mask}, tmp_path / "inputs.safetensors")
    expected = {}
    for arch in archs:
        model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=0.6))
        perturb(model)
        model.save_pretrained(tmp_path / arch)
        expected[arch] = logits(model, ids, mask)
        cfg = json.loads((tmp_path / arch / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "CLM" and cfg["interpolation"] == mode and cfg["alpha"] == 0.6
        keys = load_file(tmp_path / arch / "adapter_model.safetensors").keys()
        assert keys and all(".clm_layers." in k and ".default." not in k for k in keys)
    _run_python(
        f"""
        import torch, peft_clm
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from tiny_models import tiny_model
        x = load_file({str(tmp_path / "inputs.safetensors")!r})
        out = {{}}
        for arch in {archs!r}:
            model = PeftModel.from_pretrained(tiny_model(arch), {str(tmp_path)!r} + "/" + arch)
            with torch.no_grad():
                out[arch] = model(input_ids=x["ids"], attention_mask=x["mask"]).logits
        save_file(out, {str(tmp_path / "out.safetensors")!r})
        """
    )
    got = load_file(tmp_path / "out.safetensors")
    for arch in archs:
        assert torch.equal(got[arch], expected[arch]), arch


def test_load_under_another_name_and_switch_mode(tmp_path):
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="hidden", alpha=1.0))
    perturb(model)
    model.save_pretrained(tmp_path)
    aligned = logits(model, ids, mask)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, adapter_name="other")
    loaded.set_interpolation("logits")
    assert torch.equal(logits(loaded, ids, mask), aligned)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), ClmConfig)


# ---------------------------------------------------------------------------------------------- merge
MERGEABLE = [("weights", 0.7), ("weights", -0.3), ("hidden", 1.0), ("hidden", 0.0), ("logits", 1.0)]


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_reproduces_unmerged_and_reloads_plainly(arch, tmp_path):
    ids, mask = inputs(left_pad=1)
    save_file({"ids": ids, "mask": mask}, tmp_path / "inputs.safetensors")
    expected = {}
    n_layers = TINY_CONFIGS[arch].get("num_hidden_layers", TINY_CONFIGS[arch].get("n_layer"))
    for mode, alpha in MERGEABLE:
        model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, alpha=alpha))
        perturb(model)
        unmerged = logits(model, ids, mask)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
        unmerged_gen = model.generate(input_ids=ids, **kw)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, ClmLayer) for m in merged.modules())
        assert merged.config.num_hidden_layers == n_layers + 1
        torch.testing.assert_close(logits(merged, ids, mask), unmerged, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.generate(input_ids=ids, **kw), unmerged_gen)
        out_dir = tmp_path / f"{mode}_{alpha}"
        merged.save_pretrained(out_dir)
        expected[str(out_dir)] = logits(merged, ids, mask)
    _run_python(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from safetensors.torch import load_file, save_file
        x = load_file({str(tmp_path / "inputs.safetensors")!r})
        out = {{}}
        for i, d in enumerate({list(expected)!r}):
            m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
            with torch.no_grad():
                out[str(i)] = m(input_ids=x["ids"], attention_mask=x["mask"]).logits
        assert "peft_clm" not in sys.modules
        save_file(out, {str(tmp_path / "out.safetensors")!r})
        """
    )
    got = load_file(tmp_path / "out.safetensors")
    for i, ref in enumerate(expected.values()):
        assert torch.equal(got[str(i)], ref)


def test_merge_config_lists_follow_the_new_layer():
    model = get_peft_model(tiny_model("gemma2"), ClmConfig(interpolation="weights", alpha=0.5, layer_index=1))
    layer_types = list(model.config.layer_types)
    merged = model.merge_and_unload()
    assert merged.config.layer_types == layer_types[:1] + [layer_types[1]] + layer_types[1:]
    base = tiny_model("qwen2")
    base.config.max_window_layers = 2
    merged = get_peft_model(base, ClmConfig(interpolation="weights")).merge_and_unload()
    assert merged.config.max_window_layers == 3


@pytest.mark.parametrize("mode", ["hidden", "logits"])
def test_merge_refuses_what_is_not_exact_and_leaves_the_model(mode):
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation=mode, alpha=0.5))
    perturb(model)
    before = logits(model, ids, mask)
    with pytest.raises(ValueError, match="weights"):
        model.merge_and_unload()
    assert torch.equal(logits(model, ids, mask), before)
    model.set_interpolation("weights")
    assert isinstance(model.merge_and_unload(), type(tiny_model("llama")))


def test_merge_adapter_in_place_and_unmerge():
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights", alpha=0.4))
    perturb(model)
    before = logits(model, ids, mask)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids, mask), before, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(logits(model, ids, mask), before)


def test_unload_returns_the_base_model():
    ids, mask = inputs()
    ref = logits(tiny_model("phi3"), ids, mask)
    model = get_peft_model(tiny_model("phi3"), ClmConfig(interpolation="logits", alpha=0.5))
    perturb(model)
    base = model.unload()
    assert torch.equal(logits(base, ids, mask), ref)
    assert base.config.num_hidden_layers == 3 and not any(isinstance(m, ClmLayer) for m in base.modules())


# ---------------------------------------------------------------------------------------------- bad input
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


def _saved_adapter(tmp_path, arch="llama", **cfg):
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="hidden", **cfg))
    perturb(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def _assert_untouched(base, ref, ids, mask):
    assert not any(isinstance(m, ClmLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert torch.equal(logits(base, ids, mask), ref)
    assert all(not h for h in (base._forward_pre_hooks, base._forward_hooks))


def test_adapter_for_another_shape_is_refused(tmp_path):
    d = _saved_adapter(tmp_path)
    config = dict(TINY_CONFIGS["llama"], hidden_size=48)
    config.pop("model_type")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).eval()
    ids, mask = inputs()
    ref = logits(base, ids, mask)
    with pytest.raises(ValueError, match="another shape"):
        PeftModel.from_pretrained(base, d)
    _assert_untouched(base, ref, ids, mask)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "bin_only"])
def test_missing_or_corrupt_weights_are_refused(tmp_path, damage):
    d = _saved_adapter(tmp_path)
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file" * 10)
    else:
        path.rename(d / "adapter_model.bin")
    base = tiny_model("llama")
    ids, mask = inputs()
    ref = logits(base, ids, mask)
    with pytest.raises((ValueError, FileNotFoundError), match="safetensors"):
        PeftModel.from_pretrained(base, d)
    _assert_untouched(base, ref, ids, mask)


def test_bad_second_adapter_load_keeps_the_first(tmp_path):
    good = _saved_adapter(tmp_path / "good")
    model = PeftModel.from_pretrained(tiny_model("llama"), good)
    ids, mask = inputs()
    before = logits(model, ids, mask)
    bad = _saved_adapter(tmp_path / "bad", arch="qwen3")
    with pytest.raises(ValueError, match="does not fit"):
        model.load_adapter(bad, adapter_name="b")
    assert list(model.base_model.clm_layer().clm_layers) == ["default"]
    assert "b" not in model.peft_config
    assert torch.equal(logits(model, ids, mask), before)
