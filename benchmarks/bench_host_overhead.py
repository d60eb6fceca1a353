"""Host-side cost of one decode step per mode, on a model so narrow that host work is all there is to time.

A 16-layer Llama of width 64 (the 1B shape's depth) decodes one token at a time with the KV cache; for the base
model and CLM in each mode at alpha 0.5 this prints the median wall time of a step, the ATen ops a step issues
(torch.profiler) and the ops among them that make a GPU wait for the host or the host for the GPU (`item`,
`_local_scalar_dense`, `is_nonzero`, `nonzero`, `equal`). On a GPU at batch 1, host work per step is what bounds
decode speed, so this is the CPU-side half of reading `bench_generate.py --device cuda` figures.

    python benchmarks/bench_host_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time

import torch


SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal")
MODES = ("base", "hidden", "logits", "weights")


def build(mode: str):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_clm import ClmConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = LlamaForCausalLM(config).eval()
    if mode == "base":
        return model
    model = get_peft_model(model, ClmConfig(interpolation=mode, alpha=0.5))
    for p in model.base_model.clm_layer().clm_layers["default"].parameters():
        p.data.add_(torch.randn_like(p) * 0.01)  # stand-in for training, so alpha 0.5 is not the identity
    return model


def measure(mode: str, steps: int) -> dict:
    model = build(mode)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            nonlocal past
            past = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1).past_key_values

        for _ in range(5):
            step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        profiled = 4
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                step()
    counts = collections.Counter(e.name for e in prof.events())
    return {
        "mode": mode,
        "step_ms_median": statistics.median(times) * 1e3,
        "aten_ops_per_step": sum(v for k, v in counts.items() if k.startswith("aten::")) / profiled,
        "sync_ops_per_step": {k: counts[k] / profiled for k in SYNC_OPS if counts[k]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per mode (median kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(mode, args.steps) for mode in MODES]
    date = time.strftime("%Y-%m-%d")
    machine = f"{platform.machine()} CPU, 1 torch thread, torch {torch.__version__}"
    print(f"# bench_host_overhead — 16-layer Llama of width 64, batch 1, one token a step; {machine}; {date}")
    print(f"{'mode':<10}{'ms/step':>10}{'ATen ops/step':>15}  sync ops/step")
    for r in rows:
        syncs = r["sync_ops_per_step"] or "-"
        print(f"{r['mode']:<10}{r['step_ms_median']:>10.2f}{r['aten_ops_per_step']:>15.0f}  {syncs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "machine": machine, "date": date} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
