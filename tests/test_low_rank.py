"""The low-rank CLM layer (`ClmConfig(r=...)`): identity at init, the exact weights-mode formula, merge, save/load,
small files, and the base it was made on."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from reference import hidden_reference_logits, standalone_copy
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, MODES, inputs, logits, perturb, run_python, tiny_model

from peft_clm import ClmConfig, ClmLayer


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_low_rank_layer_is_exactly_the_identity(arch, mode):
    ids, mask = inputs(left_pad=2)
    ref = logits(tiny_model(arch), ids, mask)
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation=mode, r=4))
    for alpha in (0.0, 0.5, 1.0, -1.0):
        assert torch.equal(logits(model, ids, mask, clm_alpha=alpha), ref), alpha


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_weights_mode_is_w0_plus_alpha_times_the_low_rank_update(arch):
    ids, mask = inputs()
    model = get_peft_model(tiny_model(arch), ClmConfig(interpolation="weights", r=4, lora_alpha=8))
    perturb(model, scale=0.2)
    layer = model.base_model.clm_layer()
    factors = layer.clm_layers["default"]
    w0 = layer.identity_parameters()
    base = tiny_model(arch)
    for alpha in (0.4, 1.0, -0.7):
        mixed = standalone_copy(layer.base_layer, slot=0)
        with torch.no_grad():
            for name, p in mixed.named_parameters():
                value = w0[name].clone()
                key = name.rpartition(".")[0].replace(".", "__")
                if name.endswith("weight") and key in factors.factors:
                    f = factors.factors[key]
                    delta = 2.0 * (f.B @ f.A)  # scaling lora_alpha / r = 2
                    value += alpha * (delta.T if arch == "gpt2" else delta)
                p.copy_(value)
        ref = hidden_reference_logits(base, [mixed], [1.0], ids, mask)
        torch.testing.assert_close(logits(model, ids, mask, clm_alpha=alpha), ref, atol=2e-5, rtol=1e-5)


def test_the_low_rank_layer_runs_what_its_effective_weights_say():
    ids, mask = inputs()
    model = get_peft_model(tiny_model("qwen2"), ClmConfig(interpolation="hidden", r=3, train_norms=True))
    perturb(model, scale=0.2)
    layer = model.base_model.clm_layer()
    plain = standalone_copy(layer.base_layer, slot=0)
    with torch.no_grad():
        for name, value in layer.adapter_parameters("default").items():
            dict(plain.named_parameters())[name].copy_(value)
    ref = hidden_reference_logits(tiny_model("qwen2"), [plain], [1.3], ids, mask)
    torch.testing.assert_close(logits(model, ids, mask, clm_alpha=1.3), ref, atol=2e-5, rtol=1e-5)


def test_only_factors_train_and_are_saved(tmp_path):
    ids, mask = inputs()
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ClmConfig(interpolation="logits", r=4, alpha=0.8))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".clm_layers.default.factors." in n for n in names)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = logits(model, ids, mask)
    model.save_pretrained(tmp_path / "low")
    saved = load_file(tmp_path / "low" / "adapter_model.safetensors")
    assert saved and all(".factors." in k for k in saved)
    # exactly the factors: r * (in + out) per linear module (hidden 32, intermediate 64, 2 kv heads of 8)
    linears = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert sum(t.numel() for t in saved.values()) == sum(4 * (i + o) for i, o in linears)
    for k, v in model.base_model.model.state_dict().items():
        k = k.replace(".base_layer.", ".")
        if k in before:
            assert torch.equal(v, before[k]), k
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "low")
    assert torch.equal(logits(loaded, ids, mask), expected)
    run_python(f"""
        import torch, peft_clm
        from peft import PeftModel
        from tiny_models import tiny_model, inputs
        ids, mask = inputs()
        model = PeftModel.from_pretrained(tiny_model("llama"), {str(tmp_path / "low")!r})
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        from safetensors.torch import save_file
        save_file({{"out": out}}, {str(tmp_path / "out.safetensors")!r})
    """)
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


@pytest.mark.parametrize("mode, alpha", [("weights", 0.6), ("hidden", 1.0)])
def test_merge_gives_a_plain_checkpoint(tmp_path, mode, alpha):
    ids, mask = inputs(left_pad=1)
    model = get_peft_model(tiny_model("gemma2"), ClmConfig(interpolation=mode, r=4, alpha=alpha))
    perturb(model, scale=0.2)
    unmerged = logits(model, ids, mask)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ClmLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids, mask), unmerged, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    save_file({"ids": ids, "mask": mask}, tmp_path / "x.safetensors")
    run_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from safetensors.torch import load_file, save_file
        x = load_file({str(tmp_path / "x.safetensors")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, attn_implementation="eager").eval()
        with torch.no_grad():
            out = m(input_ids=x["ids"], attention_mask=x["mask"]).logits
        assert "peft_clm" not in sys.modules
        save_file({{"out": out}}, {str(tmp_path / "out.safetensors")!r})
    """)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], unmerged, atol=1e-5, rtol=1e-5)


def test_loading_onto_another_base_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), ClmConfig(r=4))
    perturb(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]
    other = tiny_model("llama", seed=1)  # same architecture and shapes, other weights
    ids, mask = inputs()
    ref = logits(other, ids, mask)
    with pytest.raises(ValueError, match="another base model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, ClmLayer) for m in other.modules())
    assert torch.equal(logits(other, ids, mask), ref)
    PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), tmp_path)  # same base in bf16: fine


def test_full_and_low_rank_adapters_mix_in_one_model():
    ids, mask = inputs()
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="hidden"))
    model.add_adapter("low", ClmConfig(interpolation="hidden", r=2))
    perturb(model, seed=1)
    perturb(model, seed=2, adapter="low", scale=0.3)
    layer = model.base_model.clm_layer()
    singles = {}
    for name in ("default", "low"):
        model.base_model.set_adapter(name)
        singles[name] = standalone_copy(layer.adapter_layer(name), slot=0)
    model.base_model.set_adapter(["default", "low"])
    got = logits(model, ids, mask, clm_alpha={"default": 0.5, "low": -0.8})
    ref = hidden_reference_logits(tiny_model("llama"), [singles["default"], singles["low"]], [0.5, -0.8], ids, mask)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_low_rank_settings_are_checked():
    for bad, message in (({"r": 0}, "positive int"), ({"r": 4, "lora_alpha": float("nan")}, "lora_alpha"),
                         ({"lora_alpha": 8}, "set r too"), ({"r": 4, "lowrank_modules": "q_proj"}, "list")):
        with pytest.raises(ValueError, match=message):
            ClmConfig(**bad)
    with pytest.raises(ValueError, match="must include the zeroed modules"):
        get_peft_model(tiny_model("llama"), ClmConfig(r=4, lowrank_modules=["self_attn.q_proj"]))
    with pytest.raises(ValueError, match="not linear modules"):
        get_peft_model(tiny_model("llama"), ClmConfig(r=4, lowrank_modules=["self_attn.o_proj", "nope"]))
