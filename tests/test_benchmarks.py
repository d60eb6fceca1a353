"""The benchmarks' quick modes run and write rows of the documented schema (no timing is asserted)."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(__file__))


def run_bench(script: str, out, *args: str, timeout: int = 600):
    """Run `benchmarks/<script>` with `args` and `--json out`; return its process and the rows it wrote."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_generate_quick_schema(tmp_path):
    out = tmp_path / "bench.json"
    proc, rows = run_bench("bench_generate.py", out, "--quick")
    assert isinstance(rows, list)
    assert {r["method"] for r in rows} >= {
        "base",
        "clm_weights",
        "clm_hidden",
        "clm_logits",
        "sequential_paths",
        "two_model_mix",
        "instruction_prompt",
        "clm_two_adapters_logits",
        "lora_scale",
    }
    for r in rows:
        for key in ("method", "mode", "batch", "decode_tok_s", "ratio_vs_base", "peak_mem_mb"):
            assert key in r, key
        assert r["decode_tok_s"] > 0 and r["peak_mem_mb"] > 0 and r["ratio_vs_base"] > 0
    assert next(r for r in rows if r["method"] == "base")["ratio_vs_base"] == 1.0
    assert "decode tok/s" in proc.stdout


def test_bench_train_quick_schema(tmp_path):
    out = tmp_path / "train.json"
    # seven fresh processes; a shared 2-core machine took over 600 s
    proc, rows = run_bench("bench_train.py", out, "--quick", timeout=1800)
    assert [r["method"] for r in rows] == ["clm", "clm_r4", "clm_r16", "clm_r64", "lora", "lora_separate_ref", "full"]
    for r in rows:
        assert r["step_s"] > 0 and r["peak_mem_mb"] > 0 and r["steps"] == 3 and r["saved_bytes"] > 0
        assert 0 < r["trainable_params"] <= r["total_params"]
    by = {r["method"]: r for r in rows}
    # the low-rank layers train and save more the higher the rank (on the tiny model r=64 exceeds the full layer)
    low = [by[f"clm_r{r}"] for r in (4, 16, 64)]
    assert [r["trainable_params"] for r in low] == sorted(r["trainable_params"] for r in low)
    assert low[0]["saved_bytes"] < low[1]["saved_bytes"] < low[2]["saved_bytes"]
    assert low[0]["saved_bytes"] < by["clm"]["saved_bytes"]
    assert by["full"]["trainable_params"] == by["full"]["total_params"]
    assert (
        by["clm"]["trainable_params"] < by["lora"]["trainable_params"] == by["lora_separate_ref"]["trainable_params"]
    )
    assert "s/step" in proc.stdout


def test_bench_modes_inprocess_quick(tmp_path):
    out = tmp_path / "modes.json"
    _, rows = run_bench("bench_modes_inprocess.py", out, "--quick")
    assert {(r["mode"], r["alpha"]) for r in rows} == {
        ("hidden", 0.0),
        ("hidden", 0.5),
        ("weights", 0.0),
        ("weights", 0.5),
    }
    assert all(r["step_ms_median"] > 0 and r["layer_ms_median"] > 0 for r in rows)


def test_bench_serve_quick_schema(tmp_path):
    out = tmp_path / "serve.json"
    proc, rows = run_bench("bench_serve.py", out, "--quick")
    assert {(r["load"], r["clients"]) for r in rows} == {
        (load, c) for load in ("alpha0", "mixed", "mixed_unbatched", "routed") for c in (1, 4, 8)}
    for r in rows:
        for key in ("requests_per_s", "gen_tok_s", "p50_latency_s", "p99_latency_s", "peak_mem_mb", "vs_alpha0",
                    "vs_unbatched", "mean_batch_rows", "load_avg_1m_start"):
            assert key in r, key
        assert r["requests"] == 2 * r["clients"] and r["completion_tokens"] == 4 * r["requests"]  # EOS ignored
        assert r["gen_tok_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["p50_latency_s"] <= r["p99_latency_s"]
        assert r["max_batch_rows"] <= (1 if r["load"] == "mixed_unbatched" else 8)
    assert next(r for r in rows if r["load"] == "alpha0" and r["clients"] == 8)["vs_alpha0"] == 1.0
    assert "targets at 8 clients" in proc.stdout and "gen tok/s" in proc.stdout
    assert "routing at 8 clients: routed / mixed" in proc.stdout
    assert all(r["vs_mixed"] > 0 for r in rows if r["load"] == "routed")


def test_bench_kernels_quick_schema(tmp_path):
    out = tmp_path / "kernels.json"
    proc, rows = run_bench("bench_kernels.py", out, "--quick")
    kernels = {r["kernel"] for r in rows}
    assert {"hidden_mix fwd k=1", "hidden_mix fwd k=2", "hidden_mix fwd per-seq", "hidden_mix bwd k=1",
            "weight_mix k=1", "weight_mix k=2"} <= kernels
    for r in rows:
        assert r["bytes"] > 0 and r["torch_ms"] > 0 and r["dtype"] == "bfloat16"
        assert (r["lerp_ms"] is not None) == (r["kernel"].endswith("k=1") and "bwd" not in r["kernel"]
                                              or "per-seq" in r["kernel"])
    assert "torch ms" in proc.stdout


def test_bench_host_overhead_schema(tmp_path):
    out = tmp_path / "host.json"
    _, rows = run_bench("bench_host_overhead.py", out, "--steps", "3")
    assert [r["mode"] for r in rows] == ["base", "hidden", "logits", "weights"]
    for r in rows:
        assert r["step_ms_median"] > 0 and r["aten_ops_per_step"] > 0 and isinstance(r["sync_ops_per_step"], dict)
    # the CLM layer adds ops to the base model's step in every mode at alpha 0.5
    assert all(r["aten_ops_per_step"] > rows[0]["aten_ops_per_step"] for r in rows[1:])
