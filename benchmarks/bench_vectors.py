"""Memory and time of alignment-vector extraction and application on a sharded checkpoint, against the naive way
(load both state dicts whole, subtract).

Builds two random Llama-shaped checkpoints (base and "aligned") saved in shards, then runs each operation in a
fresh process and reports the growth of its peak RSS over the process's state just before the call, the wall time
and the throughput. Prints a table and writes a JSON list of rows with `method`, `seconds`, `peak_growth_mb`,
`checkpoint_mb`, `shard_mb` and `growth_vs_checkpoint`.

    python benchmarks/bench_vectors.py --json benchmarks/results/vectors_cpu.json      # ~460 MB checkpoint
    python benchmarks/bench_vectors.py --quick                                         # ~20 MB (schema)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time


METHODS = {
    "extract_streamed": "peft_clm.tools.vectors.extract: tensor by tensor, two passes, written as it goes",
    "apply_streamed": "peft_clm.tools.vectors.apply_to_checkpoint: base + 1.0 * vector, shard by shard, "
    "to a new directory",
    "extract_naive": "load both checkpoints whole (safetensors.torch.load_file), subtract, save_file",
}

PROBE = """
import json, resource, time, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
import safetensors.torch as st
import peft_clm.tools.vectors as v
tmp, method = Path(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "extract_streamed":
    v.extract(tmp / "base", tmp / "aligned", tmp / "v.safetensors")
elif method == "apply_streamed":
    v.apply_to_checkpoint(tmp / "base", [(tmp / "v.safetensors", 1.0)], tmp / "applied")
else:
    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(st.load_file(f))
        return out
    b, a = load(tmp / "base"), load(tmp / "aligned")
    diff = {k: (a[k] - b[k]).contiguous() for k in b if not torch.equal(a[k], b[k])}
    st.save_file(diff, tmp / "v_naive.safetensors")
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("ROW " + json.dumps({"seconds": seconds, "peak_growth_mb": (after - before) / 1024}))
"""


def build_checkpoints(tmp: str, hidden: int, layers: int, vocab: int, shard_mb: int) -> float:
    code = textwrap.dedent(f"""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={int(hidden * 2.75)},
                          num_hidden_layers={layers}, num_attention_heads=8, num_key_value_heads=8)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained({tmp!r} + "/base", max_shard_size="{shard_mb}MB")
        with torch.no_grad():  # an "aligned" checkpoint: every tensor moved a little
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained({tmp!r} + "/aligned", max_shard_size="{shard_mb}MB")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    files = [os.path.join(tmp, "base", f) for f in os.listdir(os.path.join(tmp, "base")) if f.endswith(".safetensors")]
    return sum(os.path.getsize(f) for f in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~20 MB checkpoint (schema check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--shard-mb", type=int, default=50)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.shard_mb = 256, 4, 2000, 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size_mb = build_checkpoints(tmp, args.hidden, args.layers, args.vocab, args.shard_mb)
        for method in METHODS:  # in this order: apply needs the extracted vector
            proc = subprocess.run([sys.executable, "-c", PROBE, tmp, method], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ROW "))[4:])
            row.update(
                method=method,
                description=METHODS[method],
                checkpoint_mb=size_mb,
                shard_mb=args.shard_mb,
                growth_vs_checkpoint=row["peak_growth_mb"] / size_mb,
                mb_per_s=size_mb / row["seconds"],
            )
            rows.append(row)
    machine = f"{platform.machine()} {os.cpu_count()} CPU threads"
    date = time.strftime("%Y-%m-%d")
    for r in rows:
        r.update(machine=machine, date=date)
    print(
        f"# bench_vectors — random Llama-shaped fp32 checkpoint of {size_mb:.0f} MB in {args.shard_mb} MB shards; "
        f"{machine}; {date}"
    )
    print(f"{'method':<18}{'seconds':>9}{'MB/s':>8}{'peak growth MB':>16}{'x checkpoint':>14}")
    for r in rows:
        print(
            f"{r['method']:<18}{r['seconds']:>9.2f}{r['mb_per_s']:>8.0f}{r['peak_growth_mb']:>16.0f}"
            f"{r['growth_vs_checkpoint']:>14.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
