"""DPO training cost of CLM (the full layer, and low-rank layers of rank 4, 16 and 64) against LoRA (reference by
switching the adapter off, and with a separate reference model) and full fine-tuning: same data, same batch, same
steps, each method in a fresh process.

Reports per-step time (median over the steps after the first; checkpoint saving excluded), peak RSS of the
process (model, reference, optimiser, activations), trainable parameters and the size of the saved files. Prints a
table and writes a JSON list of rows with `method`, `step_s`, `peak_mem_mb`, `trainable_params`, `total_params`,
`saved_bytes`, and ratios against CLM.

    python benchmarks/bench_train.py --json benchmarks/results/train_smollm2_cpu.json   # SmolLM2, ~10 min on 2 cores
    python benchmarks/bench_train.py --quick --json out.json                            # tiny random model (schema)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    # name: (description, train() adapter, separate reference model, CLM rank)
    "clm": ("CLM layer; reference = same model, adapter off", "clm", False, None),
    "clm_r4": ("low-rank CLM layer, r=4 on every linear module of the copy", "clm", False, 4),
    "clm_r16": ("low-rank CLM layer, r=16 on every linear module of the copy", "clm", False, 16),
    "clm_r64": ("low-rank CLM layer, r=64 on every linear module of the copy", "clm", False, 64),
    "lora": ("LoRA r=16 all linear; reference = adapter off (TRL default)", "lora", False, None),
    "lora_separate_ref": ("LoRA r=16 all linear; separate frozen reference model", "lora", True, None),
    "full": ("full fine-tuning; TRL's frozen reference copy", "full", True, None),
}


def _measure(method: str, model: str, data: str, steps: int, batch: int, max_length: int) -> dict:
    import torch

    from peft_clm.tools.train import train

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    _, adapter, separate, rank = METHODS[method]
    with tempfile.TemporaryDirectory() as out:
        r = train(model, data, out, method="dpo", adapter=adapter, rank=rank, max_steps=steps, batch_size=batch,
                  lr=5e-5, beta=0.1, max_length=max_length, seed=0, progress=False,
                  separate_reference=separate and adapter != "full")  # full: TRL loads its own reference copy
        # what a user keeps: the adapter file (the whole model for full fine-tuning), not the checkpoints
        saved = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    timed = r.step_seconds[1:] or r.step_seconds  # the first step pays one-off set-up
    return {"method": method, "description": METHODS[method][0], "steps": r.steps, "batch": batch,
                "step_s": statistics.median(timed), "first_step_s": r.step_seconds[0] if r.step_seconds else None,
                "peak_mem_mb": r.peak_rss_mb, "trainable_params": r.trainable_params, "total_params": r.total_params,
                "final_loss": r.final_loss, "saved_bytes": saved}


def _quick_inputs(tmp: str) -> tuple[str, str]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import preference_rows, save_tiny_model_dir

    model_dir = os.path.join(tmp, "tiny-llama")
    save_tiny_model_dir(model_dir)
    data = os.path.join(tmp, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in preference_rows(16))
    return model_dir, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 steps (schema check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "concise", "train.jsonl"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        row = _measure(args._one, args.model, args.data, args.steps, args.batch_size, args.max_length)
        print("ROW " + json.dumps(row))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.model, args.data = _quick_inputs(tmp)
            args.steps, args.max_length = 3, 64
        rows = []
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", method, "--model", args.model, "--data",
                   args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ROW "))[4:]))
    ref = next((r for r in rows if r["method"] == "clm"), None)
    threads = os.environ.get("BENCH_THREADS", os.cpu_count())
    machine = f"{platform.machine()} {os.cpu_count()} CPU threads, torch threads={threads}"
    date = time.strftime("%Y-%m-%d")
    for r in rows:
        r["step_ratio_vs_clm"] = r["step_s"] / ref["step_s"] if ref else None
        r["mem_ratio_vs_clm"] = r["peak_mem_mb"] / ref["peak_mem_mb"] if ref else None
        r.update(machine=machine, date=date, model="tiny llama (quick)" if args.quick else args.model)
    print(
        f"# bench_train — DPO, {'tiny llama (quick)' if args.quick else args.model}, batch {args.batch_size}, "
        f"{args.steps} steps (median of steps 2..), max length {args.max_length}; {machine}; {date}"
    )
    print(
        f"{'method':<20}{'s/step':>9}{'peak MB':>9}{'trainable':>14}{'% of total':>11}{'saved MB':>10}"
        f"{'step/CLM':>10}{'mem/CLM':>9}"
    )
    for r in rows:
        print(
            f"{r['method']:<20}{r['step_s']:>9.2f}{r['peak_mem_mb']:>9.0f}{r['trainable_params']:>14,}"
            f"{100 * r['trainable_params'] / r['total_params']:>10.2f}%{r['saved_bytes'] / 1e6:>10.2f}"
            f"{(r['step_ratio_vs_clm'] or 0):>10.2f}{(r['mem_ratio_vs_clm'] or 0):>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
