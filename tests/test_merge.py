"""Merging: a merged model reproduces the unmerged one, reloads with plain transformers, and refuses what is not
exact."""

import copy

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, TINY_CONFIGS, inputs, logits, perturb, run_python, tiny_model

from peft_clm import ClmConfig, ClmLayer


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
        kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False}
        unmerged_gen = model.generate(input_ids=ids, **kw)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, ClmLayer) for m in merged.modules())
        assert merged.config.num_hidden_layers == n_layers + 1
        torch.testing.assert_close(logits(merged, ids, mask), unmerged, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.generate(input_ids=ids, **kw), unmerged_gen)
        out_dir = tmp_path / f"{mode}_{alpha}"
        merged.save_pretrained(out_dir)
        expected[str(out_dir)] = logits(merged, ids, mask)
    run_python(
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


def test_merged_state_is_registered_and_follows_to_and_deepcopy():
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights", alpha=0.4))
    perturb(model)
    model.merge_adapter()
    merged_keys = [k for k in model.state_dict() if ".merged_layer." in k]
    assert merged_keys  # state_dict sees the merged layer
    twin = copy.deepcopy(model)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.base_model.clm_layer().merged_layer.parameters())
    got = logits(model, ids, mask)
    assert got.dtype == torch.float64
    model.unmerge_adapter()
    torch.testing.assert_close(got, logits(model, ids, mask), atol=1e-10, rtol=1e-10)
    assert twin.base_model.clm_layer().merged and logits(twin, ids, mask).dtype == torch.float32
    assert not any(".merged_layer." in k for k in get_peft_model_state_dict(twin))  # derived: never saved
