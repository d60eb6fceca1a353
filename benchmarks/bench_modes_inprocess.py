"""Hidden against weights mode in ONE process, alternating on the same model: what the CLM-wrapped first layer and
a whole decode step cost in each, free of the process-to-process noise that `bench_generate.py` rows carry.

    BENCH_THREADS=2 python benchmarks/bench_modes_inprocess.py --batch 8       # SmolLM2, ~2 min on 2 cores
    python benchmarks/bench_modes_inprocess.py --quick                          # tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    import torch
    from peft import get_peft_model

    from peft_clm import ClmConfig

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    if args.quick:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import tiny_model

        base, args.steps, args.rounds = tiny_model("llama"), 4, 1
    else:
        from peft_clm.tools.loading import load_model

        base = load_model("smollm2")[0]
    model = get_peft_model(base, ClmConfig(interpolation="hidden", alpha=0.5)).eval()
    g = torch.Generator().manual_seed(0)
    for p in model.base_model.clm_layer().clm_layers["default"].parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * 0.01)
    ids = torch.randint(10, model.config.vocab_size - 1, (args.batch, args.context), generator=g)
    layer = model.base_model.clm_layer()
    layer_seconds: list[float] = []
    forward = layer.forward

    def timed_forward(*a, **k):  # wraps the instance's forward: the CLM layer plus the original layer 0
        t = time.perf_counter()
        out = forward(*a, **k)
        layer_seconds.append(time.perf_counter() - t)
        return out

    layer.forward = timed_forward
    results: dict[tuple[str, float], dict[str, list[float]]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for mode in ("hidden", "weights"):
                for alpha in (0.0, 0.5):
                    model.set_interpolation(mode)
                    model.set_alpha(alpha)
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # fresh cache each measurement
                    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                    layer_seconds.clear()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        out = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1)
                        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                    step = (time.perf_counter() - t0) / args.steps
                    r = results.setdefault((mode, alpha), {"step_ms": [], "layer_ms": []})
                    r["step_ms"].append(1000 * step)
                    r["layer_ms"].append(1000 * statistics.median(layer_seconds))
    del layer.forward
    rows = [
        {
            "mode": mode,
            "alpha": alpha,
            "batch": args.batch,
            "step_ms_median": statistics.median(r["step_ms"]),
            "layer_ms_median": statistics.median(r["layer_ms"]),
            "step_ms": r["step_ms"],
            "layer_ms": r["layer_ms"],
            "date": time.strftime("%Y-%m-%d"),
        }
        for (mode, alpha), r in results.items()
    ]
    print(f"# one process, {args.rounds} alternating rounds, batch {args.batch}, {args.steps} decode steps each")
    print(f"{'mode':<9}{'alpha':>6}{'step ms (median)':>18}{'CLM-wrapped layer 0 ms':>24}")
    for r in rows:
        print(f"{r['mode']:<9}{r['alpha']:>6}{r['step_ms_median']:>18.1f}{r['layer_ms_median']:>24.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
