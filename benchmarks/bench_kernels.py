"""Each Triton mixing kernel against the torch-eager reference, torch's one fused op where there is one
(`torch.lerp`, k=1), and a plain copy of the same number of bytes (the bandwidth the device reaches). Prints a
table and writes JSON.

    python benchmarks/bench_kernels.py [--dtype bfloat16] [--json out.json]
    python benchmarks/bench_kernels.py --quick --json out.json   # small shapes (CI checks the schema)

Shapes are those of a 1B-class and an 8B-class Llama: decode rows (1 and 8), prefill rows (8 x 512) and, for the
weight mix, one layer's largest matrices. The mixes are memory-bound, so the figure to read is the fraction of copy
bandwidth. On a GPU times come from `triton.testing.do_bench` (median, L2 flushed between runs); on CPU only the
torch side is timed, since Triton runs there only in its interpreter, which is for correctness, not speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from peft_clm.kernels import hidden_mix_reference, weight_mix_reference


def _time_ms(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(3):
        fn()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    """One dict per case: name, shape, bytes moved, and the callables to time (`lerp` only where torch has one)."""
    from peft_clm.kernels.hidden_mix_triton import hidden_mix_triton
    from peft_clm.kernels.weight_mix_triton import weight_mix_triton

    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    es = torch.tensor([], dtype=dtype).element_size()
    out = []
    hidden_shapes = [(1, 2048), (8, 2048), (8 * 512, 2048), (8 * 512, 4096)] if not quick else [(1, 64), (16, 64)]
    for (rows, hidden), k in [(s, 1) for s in hidden_shapes] + [(hidden_shapes[-1], 2)]:
        x = rand(rows, 1, hidden)
        ys = [rand(rows, 1, hidden) for _ in range(k)]
        alphas = [0.5, -0.3][:k]
        case = {
            "kernel": f"hidden_mix fwd k={k}",
            "shape": f"{rows}x{hidden}",
            "bytes": (k + 2) * x.numel() * es,  # read x and every y, write out
            "torch": lambda x=x, ys=ys, a=alphas: hidden_mix_reference(x, ys, a),
            "triton": lambda x=x, ys=ys, a=alphas: hidden_mix_triton(x, ys, a),
        }
        if k == 1:
            case["lerp"] = lambda x=x, y=ys[0]: torch.lerp(x, y, 0.5)
        out.append(case)
    # one alpha per sequence, as a server mixing requests does: a float32 CPU tensor, as `peft_clm.alpha` passes it
    # (the lerp baseline gets its weights on the device already)
    for rows, hidden in ((8, 2048), hidden_shapes[-1]):
        batch = min(rows, 8 if not quick else 4)
        x, y = rand(batch, rows // batch, hidden), rand(batch, rows // batch, hidden)
        per_seq = torch.linspace(-0.5, 1.5, batch)
        weight = per_seq.view(-1, 1, 1).to(device, dtype)
        out.append({
            "kernel": "hidden_mix fwd per-seq",
            "shape": f"{rows}x{hidden}",
            "bytes": 3 * x.numel() * es,
            "torch": lambda x=x, y=y, a=per_seq: hidden_mix_reference(x, [y], [a]),
            "triton": lambda x=x, y=y, a=per_seq: hidden_mix_triton(x, [y], [a]),
            "lerp": lambda x=x, y=y, w=weight: torch.lerp(x, y, w),
        })
    # backward (hidden mode in training): read the gradient, write dx and dy; 4x the rows, so that the GPU's time,
    # not autograd's per-call overhead, is what is timed
    rows, hidden = 4 * hidden_shapes[-1][0], hidden_shapes[-1][1]
    xg, yg = rand(rows, 1, hidden).requires_grad_(), rand(rows, 1, hidden).requires_grad_()
    grad = rand(rows, 1, hidden)
    fwd_ref = hidden_mix_reference(xg, [yg], [0.5])
    fwd_tri = hidden_mix_triton(xg, [yg], [0.5]) if xg.is_cuda else None  # Triton off the GPU: not timed
    out.append({
        "kernel": "hidden_mix bwd k=1",
        "shape": f"{rows}x{hidden}",
        "bytes": 3 * xg.numel() * es,
        "torch": lambda: torch.autograd.grad(fwd_ref, [xg, yg], grad, retain_graph=True),
        "triton": lambda: torch.autograd.grad(fwd_tri, [xg, yg], grad, retain_graph=True),
    })
    # weights mode: the mixed copy of a layer's largest matrices, written once per alpha
    weight_sizes = [("2048x8192", 2048 * 8192), ("4096x14336", 4096 * 14336)] if not quick else [("64x256", 64 * 256)]
    for (label, n), k in [(s, 1) for s in weight_sizes] + [(weight_sizes[-1], 2)]:
        w0 = rand(n)
        ws = [rand(n) for _ in range(k)]
        alphas = [0.5, -0.3][:k]
        o = torch.empty_like(w0)
        case = {
            "kernel": f"weight_mix k={k}",
            "shape": label,
            "bytes": (k + 2) * n * es,
            "torch": lambda w0=w0, ws=ws, a=alphas, o=o: weight_mix_reference(w0, ws, a, out=o),
            "triton": lambda w0=w0, ws=ws, a=alphas, o=o: weight_mix_triton(w0, ws, a, o),
        }
        if k == 1:
            case["lerp"] = lambda w0=w0, w=ws[0], o=o: torch.lerp(w0, w, 0.5, out=o)
        out.append(case)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="small shapes (schema check)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    rows = []
    for case in cases(device, dtype, args.quick):
        row = {"kernel": case["kernel"], "shape": case["shape"], "bytes": case["bytes"]}
        row["torch_ms"] = _time_ms(case["torch"], cuda)
        row["lerp_ms"] = _time_ms(case["lerp"], cuda) if "lerp" in case else None
        if cuda:
            src = torch.empty(case["bytes"] // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_ms = _time_ms(lambda: dst.copy_(src), cuda)  # reads and writes `bytes` in all
            row["triton_ms"] = _time_ms(case["triton"], cuda)
            row["copy_ms"] = copy_ms
            row["triton_gbps"] = case["bytes"] / row["triton_ms"] / 1e6
            row["copy_gbps"] = case["bytes"] / copy_ms / 1e6
            row["fraction_of_copy_bandwidth"] = copy_ms / row["triton_ms"]
            row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
            row["speedup_vs_lerp"] = row["lerp_ms"] / row["triton_ms"] if row["lerp_ms"] else None
        rows.append(row)
    date = time.strftime("%Y-%m-%d")
    print(f"# bench_kernels — {machine}, {args.dtype}, torch {torch.__version__}, {date}")
    if not cuda:
        print("# no GPU here: Triton runs only in its interpreter on CPU (correctness, not speed); torch side only")
    head = f"{'kernel':<24}{'shape':>12}{'MB':>8}{'torch ms':>10}{'lerp ms':>9}"
    if cuda:
        head += f"{'triton ms':>11}{'vs torch':>10}{'vs lerp':>9}{'GB/s':>7}{'of copy':>9}"
    print(head)
    for r in rows:
        lerp = f"{r['lerp_ms']:>9.4f}" if r["lerp_ms"] is not None else f"{'-':>9}"
        line = f"{r['kernel']:<24}{r['shape']:>12}{r['bytes'] / 1e6:>8.1f}{r['torch_ms']:>10.4f}{lerp}"
        if cuda:
            vs_lerp = f"{r['speedup_vs_lerp']:>9.2f}" if r["speedup_vs_lerp"] else f"{'-':>9}"
            line += f"{r['triton_ms']:>11.4f}{r['speedup_vs_torch']:>10.2f}{vs_lerp}{r['triton_gbps']:>7.0f}"
            line += f"{r['fraction_of_copy_bandwidth']:>9.2f}"
        print(line)
    if args.json:
        meta = {"machine": machine, "date": date, "dtype": args.dtype, "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump([{**meta, **r} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
