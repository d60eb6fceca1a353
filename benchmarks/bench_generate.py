"""Generation cost of peft-clm against the base model and the alternatives, measured side by side in one run.

Each method runs in a fresh subprocess (so its peak memory is its own): load, prefill a context, then decode
token by token with the KV cache (greedy). The methods run in `--rounds` interleaved rounds and each keeps its best
round, so a slow spell of a shared machine does not land on one method only. Prints a table and writes a JSON list
of rows with `method`, `mode`, `batch`, `prefill_tok_s`, `decode_tok_s`, `ttft_s`, `ratio_vs_base`, `peak_mem_mb`
(and the machine and date).

    python benchmarks/bench_generate.py                      # SmolLM2-135M on this machine
    python benchmarks/bench_generate.py --quick --json out.json  # tiny random model, < 2 min (CI checks the schema)
    python benchmarks/bench_generate.py --device cuda --model llama-1b   # on a GPU: a 1B-class Llama shape, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


METHODS = {
    # name: (description, mode, alpha)
    "base": ("the base model", None, None),
    "clm_weights": ("CLM, weights mode", "weights", 0.5),
    "clm_hidden": ("CLM, hidden mode", "hidden", 0.5),
    "clm_logits": ("CLM, logits mode (paths batched)", "logits", 0.5),
    "clm_logits_a0": ("CLM, logits mode at alpha 0", "logits", 0.0),
    "clm_hidden_a0": ("CLM, hidden mode at alpha 0", "hidden", 0.0),
    "clm_weights_a0": ("CLM, weights mode at alpha 0", "weights", 0.0),
    "clm_two_adapters_logits": ("CLM, two adapters, logits mode", "logits", 0.5),
    "sequential_paths": ("both paths one after the other (the authors' serving code)", "sequential", 0.5),
    "two_model_mix": ("base + a separately merged aligned copy, logits mixed (DeRa-style)", "two_models", 0.5),
    "instruction_prompt": ("base model with the preference written as a system prompt", "prompt", None),
    "lora_scale": ("LoRA r=16 on every linear layer, unmerged, its scale as the knob", "lora", 0.5),
}

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer concisely: use as few words as possible, no preamble, no lists unless "
    "asked, and never repeat the question. Prefer one short sentence. Keep a formal, neutral tone throughout."
)


MODELS = {
    "tiny": "tiny random Llama (quick schema check)",
    "smollm2": "SmolLM2-135M-Instruct",
    "llama-1b": "random-weight Llama-3.2-1B-shaped model (hidden 2048, 16 layers, GQA 32/8, vocab 128256)",
}


def _load(name: str, device: str, dtype):
    import torch

    if name == "tiny":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import tiny_model

        return tiny_model("llama").to(device, dtype), None
    if name == "smollm2":
        from peft_clm.tools.loading import load_model

        model, tokenizer = load_model("smollm2", dtype=dtype)
        return model.to(device), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a float32 build first would set the peak memory (5.7 GB)
    try:
        with torch.device(device):  # initialised where it runs: no detour through host memory
            return LlamaForCausalLM(config).eval(), None
    finally:
        torch.set_default_dtype(previous)


def _build(method: str, model_name: str, device: str, dtype):
    import torch
    from peft import get_peft_model

    from peft_clm import ClmConfig

    load = lambda: _load(model_name, device, dtype)  # noqa: E731
    model, tokenizer = load()
    _, mode, alpha = METHODS[method]
    g = torch.Generator().manual_seed(0)

    def trained(peft_model, name="default"):
        for p in peft_model.base_model.clm_layer().clm_layers[name].parameters():
            p.data.add_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))

    if mode in ("weights", "hidden", "logits"):
        model = get_peft_model(model, ClmConfig(interpolation=mode, alpha=alpha))
        trained(model)
        if method == "clm_two_adapters_logits":
            model.add_adapter("b", ClmConfig(interpolation=mode, alpha=alpha))
            trained(model, "b")
            model.base_model.set_adapter(["default", "b"])
            model.set_alpha({"default": 0.5, "b": 0.3})
        return model, tokenizer, None
    if mode == "sequential":
        model = get_peft_model(model, ClmConfig(interpolation="hidden", alpha=1.0))
        trained(model)
        return model, tokenizer, "sequential"
    if mode == "two_models":
        aligned = get_peft_model(load()[0], ClmConfig(interpolation="hidden", alpha=1.0))
        trained(aligned)
        return model, tokenizer, aligned.merge_and_unload()
    if mode == "lora":  # LoRA's knob needs the adapter unmerged: every linear layer pays its low-rank product
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, lora).to(device, dtype)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.01)
        for module in model.modules():
            if hasattr(module, "set_scale") and "default" in getattr(module, "scaling", {}):
                module.set_scale("default", alpha)
        return model.eval(), tokenizer, None
    return model, tokenizer, None


def _measure(method: str, model_name: str, device: str, batch: int, context: int, new_tokens: int,
             repeats: int, cudnn_attention: bool = False) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    if device.startswith("cuda"):
        # cuDNN's attention (SDPA's first choice on Hopper) plans for each new shape: on an H200 a decode step with
        # a new key length spent ~60 ms of host time there (bench_host_overhead.py), so what a method pays depends
        # on which shapes its process met before, not on the method. Off by default, for every method alike.
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer, extra = _build(method, model_name, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx = context
    if METHODS[method][1] == "prompt":
        extra_tokens = len(tokenizer(SYSTEM_PROMPT)["input_ids"]) if tokenizer is not None else 40
        ctx = context + extra_tokens
    ids = torch.randint(10, vocab - 1, (batch, ctx), generator=g).to(device)

    def forward(x, past):
        if extra == "sequential":  # the two paths one after the other, each with its own cache
            pb, pa = past if past is not None else (None, None)
            with model.disable_adapter():
                ob = model(input_ids=x, past_key_values=pb, use_cache=True)
            oa = model(input_ids=x, past_key_values=pa, use_cache=True)
            return 0.5 * ob.logits[:, -1] + 0.5 * oa.logits[:, -1], (ob.past_key_values, oa.past_key_values)
        if extra is not None:  # two models, logits mixed
            pb, pa = past if past is not None else (None, None)
            ob = model(input_ids=x, past_key_values=pb, use_cache=True)
            oa = extra(input_ids=x, past_key_values=pa, use_cache=True)
            return 0.5 * ob.logits[:, -1] + 0.5 * oa.logits[:, -1], (ob.past_key_values, oa.past_key_values)
        out = model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    best = None
    with torch.inference_mode():
        forward(ids[:, :8], None)  # warm-up
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            logits, past = forward(ids, None)
            sync()
            t1 = time.perf_counter()
            token = logits.argmax(-1, keepdim=True)
            for _ in range(new_tokens):
                logits, past = forward(token, past)
                token = logits.argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
            run = {"prefill_s": t1 - t0, "decode_s": t2 - t1}
            if best is None or run["decode_s"] < best["decode_s"]:
                best = run
    return {
        "method": method,
        "description": METHODS[method][0],
        "mode": METHODS[method][1] or "none",
        "alpha": METHODS[method][2],
        "batch": batch,
        "context": ctx,
        "new_tokens": new_tokens,
        "prefill_tok_s": batch * ctx / best["prefill_s"],
        "ttft_s": best["prefill_s"],
        "decode_tok_s": batch * new_tokens / best["decode_s"],
        # GPU: peak memory allocated on the device; CPU: peak RSS of the process
        "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "model": model_name,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "cudnn_attention": cudnn_attention if device.startswith("cuda") else None,
    }


def _with_ratios(rows: list) -> list:
    """Add each row's decode speed and peak memory as ratios to the base method's at the same batch (None without)."""
    for batch in {r["batch"] for r in rows}:
        base = next((r for r in rows if r["method"] == "base" and r["batch"] == batch), None)
        for r in rows:
            if r["batch"] == batch:
                r["ratio_vs_base"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
                r["mem_ratio_vs_base"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base else None
    return rows


def _write(path: str, rows: list) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_with_ratios([dict(r) for r in rows]), f, indent=1)
    os.replace(tmp, path)  # never a half-written file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few tokens (schema check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per process (best kept)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all methods (best kept)")
    parser.add_argument("--model", default="smollm2", choices=list(MODELS), help="; ".join(
        f"{k}: {v}" for k, v in MODELS.items()))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16, GPU peak memory)")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="on CUDA, leave SDPA's cuDNN backend on (it builds a plan per new shape; off by default)")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.context, args.new_tokens, args.repeats, args.rounds, args.batches = 32, 8, 1, 1, "1"
        args.model = "tiny"
    if args._one:
        method, batch = args._one.split(":")
        print(json.dumps(_measure(method, args.model, args.device, int(batch), args.context, args.new_tokens,
                                  args.repeats, args.cudnn_attention)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    threads = os.environ.get("BENCH_THREADS", os.cpu_count())
    machine = f"{platform.machine()} {os.cpu_count()} CPU threads, torch threads={threads}"
    if args.device.startswith("cuda"):
        import torch

        machine += f", {torch.cuda.get_device_name()}"
    date = time.strftime("%Y-%m-%d")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        best = {}
        for _ in range(args.rounds):
            for method in methods:
                cmd = [sys.executable, __file__, "--_one", f"{method}:{batch}", "--context", str(args.context),
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--model", args.model,
                       "--device", args.device] + (["--cudnn-attention"] if args.cudnn_attention else [])
                started = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{method} (batch {batch}) failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                took = time.perf_counter() - started
                print(f"# {method} batch {batch}: {row['decode_tok_s']:.2f} decode tok/s ({took:.0f} s with its "
                      "process's start)", file=sys.stderr, flush=True)
                if method not in best or row["decode_tok_s"] > best[method]["decode_tok_s"]:
                    best[method] = {**row, "machine": machine, "date": date}
                if args.json:  # as each method finishes, so a run stopped early keeps what it measured
                    _write(args.json, rows + list(best.values()))
        rows += [best[m] for m in methods]
    _with_ratios(rows)
    print(
        f"# bench_generate — {MODELS[args.model]} on {args.device} ({rows[0]['dtype']}), context "
        f"{args.context}, {args.new_tokens} new tokens, best of {args.repeats} x {args.rounds} rounds; "
        f"{machine}; {date}"
    )
    print(
        f"{'method':<26}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ratio':>8}{'TTFT s':>9}"
        f"{'peak MB':>9}{'mem ratio':>10}"
    )
    for r in rows:
        print(
            f"{r['method']:<26}{r['batch']:>6}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}"
            f"{(r['ratio_vs_base'] or 0):>8.3f}{r['ttft_s']:>9.3f}{r['peak_mem_mb']:>9.0f}"
            f"{(r['mem_ratio_vs_base'] or 0):>10.3f}"
        )
    if args.json:
        _write(args.json, rows)


if __name__ == "__main__":
    main()
