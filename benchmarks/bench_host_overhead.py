"""Host-side cost of one decode step per mode, on a model so narrow that host work is all there is to time.

A 16-layer Llama of width 64 (the 1B shape's depth) decodes one token at a time with the KV cache; for the base
model and CLM in each mode at alpha 0.5 this prints the median wall time of a step, the ATen ops a step issues
(torch.profiler) and the ops among them that make a GPU wait for the host or the host for the GPU (`item`,
`_local_scalar_dense`, `is_nonzero`, `nonzero`, `equal`). On a GPU at batch 1, host work per step is what bounds
decode speed, so this is the CPU-side half of reading `bench_generate.py --device cuda` figures.

With `--device cuda` the model runs in bfloat16 on the GPU and each timed step ends with a synchronize, so a step's
time is its host work plus any wait for the GPU. SDPA's cuDNN backend is off: on an H200 a step that met a new key
length spent ~60 ms of host time in it, so whichever mode met a shape first paid (`bench_generate.py` does the same).
The hidden and logits modes run twice more with the mix forced onto the torch reference (`PEFT_CLM_KERNELS=torch`),
which separates the cost of the Triton launch from the rest. Each row also names the ops with the most self host
time per step.

    python benchmarks/bench_host_overhead.py [--json out.json]
    python benchmarks/bench_host_overhead.py --device cuda --width 2048   # on a GPU: the 1B shape's hidden size

All rows run in one process, in the order printed (anything a process caches on first use is paid by the first
row that meets it: compare rows within a run, and across runs with care). Width W has W/64 attention heads and
max(2, W/256) key-value heads; the MLP is 2W wide and the vocabulary 1,000, so only the hidden size is the 1B shape's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import time

import torch


SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal")
MODES = ("base", "hidden", "logits", "weights")
TORCH_MIX = ("hidden", "logits")  # modes whose mix is a kernel call (`peft_clm.kernels.hidden_mix`)


def build(mode: str, width: int, device: str):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_clm import ClmConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=16,
                         num_attention_heads=max(4, width // 64), num_key_value_heads=max(2, width // 256),
                         vocab_size=1000)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    if mode == "base":
        return model
    model = get_peft_model(model, ClmConfig(interpolation=mode, alpha=0.5))
    for p in model.base_model.clm_layer().clm_layers["default"].parameters():
        p.data.add_(torch.randn_like(p) * 0.01)  # stand-in for training, so alpha 0.5 is not the identity
    return model


def measure(mode: str, steps: int, width: int, device: str, torch_mix: bool = False) -> dict:
    previous = os.environ.get("PEFT_CLM_KERNELS")
    if torch_mix:
        os.environ["PEFT_CLM_KERNELS"] = "torch"
    try:
        return _measure(mode, steps, width, device, torch_mix)
    finally:
        if previous is None:
            os.environ.pop("PEFT_CLM_KERNELS", None)
        else:
            os.environ["PEFT_CLM_KERNELS"] = previous


def _measure(mode: str, steps: int, width: int, device: str, torch_mix: bool) -> dict:
    if device == "cuda":  # see the module docstring
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build(mode, width, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            nonlocal past
            past = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1).past_key_values

        for _ in range(5):
            step()
        times = []
        sync()
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        profiled = 4
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                step()
            sync()
    counts = collections.Counter(e.name for e in prof.events())
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {
        "mode": mode + (" (torch mix)" if torch_mix else ""),
        "device": device,
        "width": width,
        "step_ms_median": statistics.median(times) * 1e3,
        "top_self_host_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / profiled, 3) for e in top},
        "aten_ops_per_step": sum(v for k, v in counts.items() if k.startswith("aten::")) / profiled,
        "sync_ops_per_step": {k: counts[k] / profiled for k in SYNC_OPS if counts[k]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per mode (median kept)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--width", type=int, default=64, help="hidden size (a multiple of 64)")
    args = parser.parse_args()
    heads, kv_heads = max(4, args.width // 64), max(2, args.width // 256)
    if args.width % 64 or heads % kv_heads:
        parser.error(f"--width must be a multiple of 64 whose {heads} heads split into {kv_heads} key-value heads "
                     f"(64, 128, 256, 512, 1024, 2048, 4096, ...), got {args.width}")
    torch.set_num_threads(1)
    runs = [(mode, False) for mode in MODES]
    if args.device == "cuda":
        runs += [(mode, True) for mode in TORCH_MIX]
    rows = [measure(mode, args.steps, args.width, args.device, torch_mix) for mode, torch_mix in runs]
    date = time.strftime("%Y-%m-%d")
    machine = f"{platform.machine()} CPU, 1 torch thread, torch {torch.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()} (bfloat16)"
    print(f"# bench_host_overhead — 16-layer Llama of width {args.width}, batch 1, one token a step; {machine}; "
          f"{date}")
    print(f"{'mode':<20}{'ms/step':>10}{'ATen ops/step':>15}  sync ops/step; top self host ms/step")
    for r in rows:
        syncs = r["sync_ops_per_step"] or "-"
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["top_self_host_ms_per_step"].items())[:3])
        print(f"{r['mode']:<20}{r['step_ms_median']:>10.2f}{r['aten_ops_per_step']:>15.0f}  {syncs}; {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "machine": machine, "date": date} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
