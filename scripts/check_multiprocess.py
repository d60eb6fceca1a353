"""Does training in N processes give the one-process adapter? Trains the same data with the same seed twice:
one process with batch N*b, and N processes (`accelerate launch --multi_gpu`, DDP; gloo on CPU) with batch b each,
the same global batch; then compares every saved tensor and the logged loss curves. Prints a table, writes JSON.

    python scripts/check_multiprocess.py --model smollm2 --data data/concise/train.jsonl --out runs/mp --steps 4 \\
        --train-args "--lr 5e-5 --beta 0.1 --sft-weight 1.0"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A free local TCP port for the process group's rendezvous (tests and other jobs may run beside this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, train_args: list[str]) -> list[str]:
    """`peft-clm train` under accelerate: one plain process, or N processes with DDP (torchrun underneath)."""
    if processes == 1:
        return [sys.executable, "-m", "peft_clm", "train", *train_args]
    # `--multi_gpu` is accelerate's multi-process launcher; without a GPU the processes join a gloo group
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "peft_clm", "train", *train_args]


def run_training(processes: int, train_args: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(launch_command(processes, train_args), capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"seconds": time.perf_counter() - start, "stdout": proc.stdout}


def log_history(out: Path) -> list[dict]:
    """The logged entries of a run, from the last checkpoint's trainer state (written by the main process)."""
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def loss_curve(out: Path) -> list[float]:
    """The logged loss of each step."""
    return [h["loss"] for h in log_history(out) if "loss" in h]


def compare(one: Path, many: Path) -> dict:
    """Every tensor of the two adapter files: the largest absolute and relative difference, and how far training
    moved the tensors (so the differences can be read against the size of the update)."""
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(many / "adapter_model.safetensors")
    if a.keys() != b.keys():
        raise ValueError(f"the adapters hold different tensors: {sorted(a.keys() ^ b.keys())}")
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    scale = {k: a[k].double().abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    la, lb = loss_curve(one), loss_curve(many)
    return {
        "tensors": len(a),
        "bit_identical_tensors": sum(bool((a[k] == b[k]).all()) for k in a),
        "max_abs_diff": diffs[worst],
        "max_abs_diff_tensor": worst,
        "max_abs_value": max(scale.values()),
        "loss_one_process": la,
        "loss_multi_process": lb,
        "max_loss_diff": max((abs(x - y) for x, y in zip(la, lb)), default=None) if len(la) == len(lb) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="a new directory: one/ and multi/ adapters go there")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-process-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-args", default="", help="more `peft-clm train` options, quoted as one string")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--model", args.model, "--data", args.data, "--max-steps", str(args.steps), "--seed", str(args.seed),
              "--quiet", *shlex.split(args.train_args)]
    global_batch = args.processes * args.per_process_batch
    runs = {
        "one": run_training(1, [*common, "--out", str(out / "one"), "--batch-size", str(global_batch)],
                            args.timeout),
        "multi": run_training(args.processes, [*common, "--out", str(out / "multi"), "--batch-size",
                                               str(args.per_process_batch)], args.timeout),
    }
    result = {
        "model": args.model, "data": args.data, "steps": args.steps, "seed": args.seed,
        "processes": args.processes, "per_process_batch": args.per_process_batch, "global_batch": global_batch,
        "train_args": args.train_args, "seconds": {k: v["seconds"] for k, v in runs.items()},
        "summaries": {k: v["stdout"].strip().splitlines() for k, v in runs.items()},
        **compare(out / "one", out / "multi"), "date": time.strftime("%Y-%m-%d"),
    }
    print(f"# 1 process x batch {global_batch} vs {args.processes} processes x batch {args.per_process_batch}, "
          f"{args.steps} steps, seed {args.seed}, {args.model}")
    print(f"tensors: {result['tensors']} ({result['bit_identical_tensors']} bit-identical); max |difference| "
          f"{result['max_abs_diff']:.3g} (in {result['max_abs_diff_tensor']}; largest |value| "
          f"{result['max_abs_value']:.3g})")
    print("loss, 1 process:   " + " ".join(f"{x:.6f}" for x in result["loss_one_process"]))
    print(f"loss, {args.processes} processes: " + " ".join(f"{x:.6f}" for x in result["loss_multi_process"]))
    print(f"max loss difference: {result['max_loss_diff']}")
    print(f"wall time: 1 process {runs['one']['seconds']:.0f} s, {args.processes} processes "
          f"{runs['multi']['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
