"""Each mixing kernel against the torch-eager composition of the same ops, and against a plain copy of the same
bytes (the bandwidth the device reaches). Prints a table and writes JSON.

    python benchmarks/bench_kernels.py [--json out.json]

On CPU only the torch side is timed (Triton kernels need a GPU for real speed; on CPU they only run in the
interpreter, which is for correctness, not timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from peft_clm.kernels import dual_norm_mix_reference, hidden_mix_reference, weight_mix_reference


def _time(fn, repeats: int = 50) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def cases(device, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    out = []
    for rows, hidden in ((8 * 512, 4096), (1, 4096), (64, 2048)):
        x = torch.randn(rows, 1, hidden, device=device, dtype=dtype)
        y = torch.randn_like(x)
        moved = 3 * x.numel() * x.element_size()  # read x, y; write out
        out.append(
            (
                "hidden_mix k=1",
                f"{rows}x{hidden}",
                moved,
                lambda x=x, y=y: hidden_mix_reference(x, [y], [0.5]),
                lambda x=x, y=y: __import__("peft_clm.kernels.hidden_mix_triton", fromlist=["x"]).hidden_mix_triton(
                    x, [y], [0.5]
                ),
            )
        )
    for n in (4096 * 4096, 4096 * 11008):
        w0 = torch.randn(n, device=device, dtype=dtype)
        w1 = torch.randn_like(w0)
        o = torch.empty_like(w0)
        moved = 3 * n * w0.element_size()
        out.append(
            (
                "weight_mix k=1",
                f"{n}",
                moved,
                lambda w0=w0, w1=w1, o=o: weight_mix_reference(w0, [w1], [0.5], out=o),
                lambda w0=w0, w1=w1, o=o: __import__(
                    "peft_clm.kernels.weight_mix_triton", fromlist=["x"]
                ).weight_mix_triton(w0, [w1], [0.5], o),
            )
        )
    for rows, hidden in ((2 * 8 * 512, 4096), (2 * 8, 4096)):
        norm = LlamaRMSNorm(hidden).to(device, dtype)
        h = torch.randn(rows, 1, hidden, device=device, dtype=dtype)
        moved = h.numel() * h.element_size() * 3 // 2  # read 2B rows, write B rows
        from peft_clm.kernels.dual_norm_mix import norm_spec

        out.append(
            (
                "dual_norm_mix k=1",
                f"{rows}x{hidden}",
                moved,
                lambda h=h, norm=norm: dual_norm_mix_reference(h, norm, [0.5], 2),
                lambda h=h, norm=norm: __import__(
                    "peft_clm.kernels.dual_norm_mix_triton", fromlist=["x"]
                ).dual_norm_mix_triton(h, norm_spec(norm), [0.5], 2),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    rows = []
    with torch.inference_mode():
        for name, shape, moved, torch_fn, triton_fn in cases(device, dtype):
            t_torch = _time(torch_fn)
            row = {"kernel": name, "shape": shape, "bytes": moved, "torch_ms": t_torch * 1e3}
            if cuda:
                t_triton = _time(triton_fn)
                src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                t_copy = _time(lambda: dst.copy_(src))  # reads and writes `moved` bytes in all
                row.update(
                    triton_ms=t_triton * 1e3,
                    speedup=t_torch / t_triton,
                    triton_gbps=moved / t_triton / 1e9,
                    copy_gbps=moved / t_copy / 1e9,
                    fraction_of_copy_bandwidth=t_copy / t_triton,
                )
            rows.append(row)
    print(f"# bench_kernels — {machine}, {args.dtype}")
    if not cuda:
        print(
            "# no GPU here: the Triton kernels only run in the interpreter on CPU (for correctness), so only the "
            "torch composition is timed"
        )
    print(
        f"{'kernel':<20}{'shape':>14}{'torch ms':>10}"
        + (f"{'triton ms':>11}{'speedup':>9}{'GB/s':>8}{'of copy':>9}" if cuda else "")
    )
    for r in rows:
        line = f"{r['kernel']:<20}{r['shape']:>14}{r['torch_ms']:>10.3f}"
        if cuda:
            line += f"{r['triton_ms']:>11.3f}{r['speedup']:>9.2f}{r['triton_gbps']:>8.0f}"
            line += f"{r['fraction_of_copy_bandwidth']:>9.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine, "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
