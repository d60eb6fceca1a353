"""Alignment vectors on tiny random checkpoints: exactness, composition, undo, errors, streaming memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from tiny_models import perturb, tiny_model

from peft_clm import ClmConfig
from peft_clm.tools.cli import main
from peft_clm.tools.vectors import (
    Checkpoint,
    VectorError,
    adapter_vector,
    apply_to_checkpoint,
    apply_to_model,
    extract,
    inspect_vector,
)


def _checkpoint(path, seed=0, shift=0.0, dtype=torch.float32, arch="llama"):
    model = tiny_model(arch, seed=0, dtype=dtype)
    if shift:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layers.1" in name or "norm" in name:
                    p.add_((torch.randn(p.shape, generator=g) * shift).to(dtype))
    model.save_pretrained(path, max_shard_size="20KB")  # several shards
    return path


def _tensors(path):
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def trio(tmp_path, request):
    dtype = request.param
    base = _checkpoint(tmp_path / "base", dtype=dtype)
    a1 = _checkpoint(tmp_path / "a1", seed=1, shift=0.05, dtype=dtype)
    a2 = _checkpoint(tmp_path / "a2", seed=2, shift=0.05, dtype=dtype)
    assert len(Checkpoint(base).files) > 1
    return tmp_path, base, a1, a2, dtype


def test_lambda_zero_and_one_are_exact_and_vectors_sum(trio):
    root, base, a1, a2, dtype = trio
    meta = extract(base, a1, root / "v1.safetensors")
    extract(base, a2, root / "v2.safetensors")
    assert 0 < int(meta["n_tensors_differ"]) < int(meta["n_tensors_total"])
    info = inspect_vector(root / "v1.safetensors")
    assert set(info["norms"]) == set(info["tensors"]) and info["source_dtypes"] == str(dtype).removeprefix("torch.")
    b, t1, t2 = _tensors(base), _tensors(a1), _tensors(a2)
    for scale, expected in ((0.0, b), (1.0, t1)):
        out = apply_to_checkpoint(base, [(root / "v1.safetensors", scale)], root / f"out{scale}")
        got = _tensors(out)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (scale, k)
    both = _tensors(apply_to_checkpoint(base, [(root / "v1.safetensors", 0.5), (root / "v2.safetensors", -0.3)],
                                        root / "both"))
    for k in b:
        ref = (b[k].double() + 0.5 * (t1[k].double() - b[k].double()) - 0.3 * (t2[k].double() - b[k].double()))
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(both[k].double(), ref.to(dtype).double(), atol=tol, rtol=tol)
    assert (root / "both" / "config.json").is_file()


def test_blocks_of_rows_give_the_same_vector_and_checkpoint(trio, monkeypatch):
    """Extraction and application work in blocks of rows: tiny blocks (many per tensor) change no bit."""
    import peft_clm.tools.vectors as vectors

    root, base, a1, _, _ = trio
    extract(base, a1, root / "whole.safetensors")
    monkeypatch.setattr(vectors, "BLOCK_BYTES", 64)
    assert len(vectors._row_blocks([97, 32], 8)) == 97
    extract(base, a1, root / "blocks.safetensors")
    whole, blocks = _tensors(root / "whole.safetensors"), _tensors(root / "blocks.safetensors")
    assert whole.keys() == blocks.keys() and all(torch.equal(whole[k], blocks[k]) for k in whole)
    got, expected = (
        _tensors(apply_to_checkpoint(base, [(root / "blocks.safetensors", 1.0)], root / "out")),
        _tensors(a1),
    )
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_apply_in_place_then_undo_is_bit_exact(trio):
    root, base, a1, _, dtype = trio
    extract(base, a1, root / "v1.safetensors")
    model = tiny_model("llama", dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_to_model(model, [(root / "v1.safetensors", 1.0)])
    after = model.state_dict()
    aligned = _tensors(a1)
    assert all(torch.equal(after[k], aligned[k]) for k in aligned)
    handle.undo()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_transfer_to_another_checkpoint_of_the_architecture(trio):
    root, base, a1, a2, _ = trio
    extract(base, a1, root / "v1.safetensors")
    out = _tensors(apply_to_checkpoint(a2, [(root / "v1.safetensors", 1.0)], root / "transfer"))
    b, t1, t2 = _tensors(base), _tensors(a1), _tensors(a2)
    k = next(n for n in b if not torch.equal(b[n], t1[n]))
    assert not torch.equal(out[k], t2[k])


def test_errors_leave_nothing_behind(tmp_path):
    base = _checkpoint(tmp_path / "base")
    other = _checkpoint(tmp_path / "other", arch="gpt2")
    aligned = _checkpoint(tmp_path / "aligned", seed=1, shift=0.1)
    with pytest.raises(VectorError, match="not the same architecture|shapes differ"):
        extract(base, other, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    extract(base, aligned, tmp_path / "v.safetensors")
    for scale in (float("nan"), float("inf")):
        with pytest.raises(VectorError, match="finite"):
            apply_to_checkpoint(base, [(tmp_path / "v.safetensors", scale)], tmp_path / "out")
    with pytest.raises(VectorError, match="another architecture|shape of"):
        apply_to_checkpoint(other, [(tmp_path / "v.safetensors", 1.0)], tmp_path / "out")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VectorError):
        apply_to_model(model, [(tmp_path / "v.safetensors", 1.0)])
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        extract(tmp_path / "nowhere", aligned, tmp_path / "x.safetensors")
    assert (
        main(
            [
                "vectors",
                "apply",
                "--base",
                str(base),
                "--vector",
                f"{tmp_path / 'v.safetensors'}:abc",
                "--out",
                str(tmp_path / "cli_out"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "cli_out").exists()


def test_cli_round_trip(tmp_path, capsys):
    base = _checkpoint(tmp_path / "base")
    aligned = _checkpoint(tmp_path / "aligned", seed=1, shift=0.1)
    v = tmp_path / "v.safetensors"
    assert main(["vectors", "extract", "--base", str(base), "--aligned", str(aligned), "--out", str(v)]) == 0
    assert main(["vectors", "inspect", str(v)]) == 0
    assert "n_tensors_differ" in capsys.readouterr().out
    assert main(["vectors", "apply", "--base", str(base), "--vector", f"{v}:1", "--out", str(tmp_path / "o")]) == 0
    got, ref = _tensors(tmp_path / "o"), _tensors(aligned)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_clm_adapter_vector_is_the_weights_mode(tmp_path):
    model = get_peft_model(tiny_model("llama"), ClmConfig(interpolation="weights"))
    model.add_adapter("b", ClmConfig(interpolation="weights"))
    perturb(model, seed=1)
    perturb(model, seed=2, adapter="b")
    layer = model.base_model.clm_layer()
    w0 = layer.identity_parameters()
    va, vb = adapter_vector(model, "default"), adapter_vector(model, "b")
    mixed = layer.mixed_parameters(["default", "b"], [0.7, -0.2])
    for k in w0:
        torch.testing.assert_close(mixed[k], w0[k] + 0.7 * va[k] - 0.2 * vb[k], atol=1e-6, rtol=1e-6)


def test_extraction_streams_with_memory_well_under_the_model(tmp_path):
    """Peak memory of extracting a ~77 MB sharded checkpoint, measured in a fresh process."""
    code = textwrap.dedent(f"""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=8)
        for name, seed in (("base", 0), ("aligned", 1)):
            torch.manual_seed(seed)
            LlamaForCausalLM(cfg).save_pretrained({str(tmp_path)!r} + "/" + name, max_shard_size="10MB")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    size = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    probe = textwrap.dedent(f"""
        import resource, json
        import torch, peft_clm.tools.vectors as v
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v.extract({str(tmp_path / "base")!r}, {str(tmp_path / "aligned")!r}, {str(tmp_path / "v.safetensors")!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"peak_growth_bytes": (after - before) * 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    growth = json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]
    assert growth < 0.35 * size, (growth, size)
