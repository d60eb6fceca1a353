"""Saving and loading adapters: round trips in a fresh process, and files that must be refused before they change
the model."""

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import MODES, TINY_CONFIGS, inputs, logits, perturb, run_python, tiny_model

from peft_clm import ClmConfig, ClmLayer


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
    run_python(
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


@pytest.mark.parametrize("damage, message", [
    ("base_key", "outside the CLM layer"),
    ("nan", "NaN or infinite"),
    ("int", "float tensors only"),
    ("layer_index", "decoder layer 1"),
])
def test_adapter_files_cannot_reach_outside_the_clm_layer(tmp_path, damage, message):
    d = _saved_adapter(tmp_path)
    path = d / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    if damage == "base_key":
        tensors["base_model.model.lm_head.weight"] = torch.zeros(97, 32)
    elif damage == "nan":
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    elif damage == "int":
        tensors[key] = tensors[key].to(torch.int32)
    else:
        tensors = {k.replace(".layers.0.", ".layers.1."): v for k, v in tensors.items()}
    save_file(tensors, path)
    base = tiny_model("llama")
    ids, mask = inputs()
    ref = logits(base, ids, mask)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, d)
    _assert_untouched(base, ref, ids, mask)


def test_loading_onto_another_base_checkpoint_warns(tmp_path, caplog):
    model = get_peft_model(tiny_model("llama"), ClmConfig())
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="peft_clm.model"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # its own base: silent
        assert "another base" not in caplog.text
        PeftModel.from_pretrained(tiny_model("llama", seed=1), tmp_path)  # same shapes, other weights
    assert "made on another base model" in caplog.text
