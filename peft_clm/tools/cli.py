"""`peft-clm` command line: thin shells over the library calls."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Optional


def _train(args: argparse.Namespace) -> int:
    from .train import train

    result = train(
        model=args.model, data=args.data, out=args.out, method=args.method, adapter=args.adapter_type, rank=args.rank,
        lowrank_modules=[m.strip() for m in args.lowrank_modules.split(",") if m.strip()] if args.lowrank_modules
        else None,
        interpolation=args.interpolation, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, beta=args.beta,
        sft_weight=args.sft_weight, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite, hold=args.hold, hold_weight=args.hold_weight,
    )
    if result.is_main_process:  # one summary, not one per process
        print(result.summary())
    return 0


def _load_clm(args: argparse.Namespace):
    from peft import PeftModel

    from .loading import load_model, read_adapter_config

    adapters = args.adapter
    for path in adapters:  # checked before the model loads
        read_adapter_config(path)
    names = adapter_names(adapters)
    model, tokenizer = load_model(args.model)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    if len(adapters) > 1:
        peft_model.base_model.set_adapter(names)
    if args.interpolation:
        peft_model.set_interpolation(args.interpolation)
    return peft_model.eval(), tokenizer


def adapter_names(paths: Sequence[str]) -> list[str]:
    """Adapter names from their directories (what tables and plots show): the last path component, with as many
    parent components as it takes to tell them apart (runs/concise/clm, runs/formal/clm -> concise_clm, formal_clm)."""
    import re
    from pathlib import Path

    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = [re.sub(r"\W", "_", "_".join(p[-depth:])).strip("_") or "adapter" for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"adapter_{i}" for i in range(len(paths))]  # the same directory given twice


def _parse_alphas(text: str, what: str = "--alphas") -> list[float]:
    """Comma-separated alphas (or scales), each checked as alpha is; before any model loads."""
    from ..alpha import check_alpha

    items = [a.strip() for a in text.split(",")]
    if not all(items):
        raise ValueError(f"{what} must be comma-separated numbers such as -0.5,0,1; got {text!r}.")
    values = []
    for item in items:
        try:
            number = float(item)
        except ValueError:
            raise ValueError(f"{what} must be comma-separated numbers such as -0.5,0,1; {item!r} is not a number.") \
                from None
        values.append(check_alpha(number, what, rows=False))
    if len(set(values)) != len(values):
        raise ValueError(f"{what} lists a value twice: {text!r}.")
    return values


def _check_out(path: str) -> None:
    """An output directory may exist (its files are replaced), but not as a file; checked before anything loads."""
    from pathlib import Path

    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"--out {path} is an existing file; give a directory.")


def _read_reference(path: str) -> dict:
    import json

    try:
        reference = json.loads(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--reference {path} is not a readable JSON file ({e}).") from None
    bad = {k: v for k, v in reference.items() if k != "label" and not isinstance(v, (int, float))} if isinstance(
        reference, dict) else None
    if bad is None or bad:
        example = '{"words_mean": 20.5, "reward_accuracy": 1.0, "label": "full DPO"}'
        got = bad or type(reference).__name__
        raise ValueError(f"--reference {path} must be a JSON object of numbers (e.g. {example}); got {got}.")
    return reference


def _generate(args: argparse.Namespace) -> int:
    from .data import read_prompts
    from .generation import generate_answers

    if not args.prompt and not args.prompts:
        raise ValueError("give a prompt, or --prompts FILE.")
    prompts = [args.prompt] if args.prompt else read_prompts(args.prompts)[0]
    alphas = _parse_alphas(",".join(args.alpha), "--alpha") if args.alpha else [1.0]
    model, tokenizer = _load_clm(args)
    answers = generate_answers(model, tokenizer, prompts, alphas, args.max_new_tokens, args.batch_size)
    for i, prompt in enumerate(prompts):
        print(f"### {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
        for j, a in enumerate(alphas):
            print(f"[alpha={a:g}] {answers[j][i]}")
        print()
    return 0


def _parse_targets(items: Sequence[str]) -> dict:
    targets = {}
    for item in items or []:
        metric, sep, value = item.partition("=")
        try:
            targets[metric] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--target takes METRIC=VALUE (e.g. words=20), got {item!r}.")
    return targets


def _grid(args: argparse.Namespace, prompts: list) -> int:
    from .sweep import format_grid, grid_sweep

    n = len(args.adapter)
    alphas = args.alphas or ["0,0.5,1,1.5"]
    metrics = args.metric or []
    if len(alphas) not in (1, n) or len(metrics) != n:
        raise ValueError(f"{n} adapters: give --alphas once (shared) or once per adapter, and --metric once per "
                         f"adapter (in the same order); got {len(alphas)} --alphas and {len(metrics)} --metric.")
    values = [_parse_alphas(alphas[i if len(alphas) > 1 else 0]) for i in range(n)]  # checked before loading
    targets = _parse_targets(args.target)
    _check_out(args.out)
    model, tokenizer = _load_clm(args)
    names = list(model.base_model.active_adapters)
    knobs = dict(zip(names, values))
    result = grid_sweep(model, tokenizer, knobs, dict(zip(names, metrics)), prompts, args.out, targets=targets,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        title=f"{' x '.join(names)} ({model.base_model.clm_layer().interpolation})")
    print(format_grid(result))
    print(f"generation {result['generation_seconds']:.0f} s; wrote {args.out}/grid.json, grid.csv, grid.png")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .data import read_prompts
    from .sweep import format_table, sweep

    if args.metric:
        from .text_metrics import METRICS

        bad = [m for m in args.metric if m not in METRICS]
        if bad:
            raise ValueError(f"--metric {bad[0]!r} is not one of {sorted(METRICS)}.")
    prompts, pairs = read_prompts(args.prompts)
    if args.max_prompts:
        prompts, pairs = prompts[: args.max_prompts], pairs[: args.max_prompts]
    if len(args.adapter) > 1:
        return _grid(args, prompts)
    if len(args.metric or []) > 1 or len(args.alphas or []) > 1:
        raise ValueError("one adapter takes one --metric and one --alphas; several are for a grid of adapters.")
    alphas = _parse_alphas((args.alphas or ["-0.5,0,0.25,0.5,0.75,1,1.5,2"])[0])
    metric = (args.metric or ["words"])[0]
    reference = _read_reference(args.reference) if args.reference else None
    _check_out(args.out)
    model, tokenizer = _load_clm(args)
    result = sweep(model, tokenizer, alphas, prompts, args.out, metric=metric, pairs=pairs,
                   beta=args.beta, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   reference=reference, title=f"{metric} vs alpha ({model.base_model.clm_layer().interpolation})")
    print(format_table(result))
    print(f"generation {result['generation_seconds']:.0f} s, total {result['total_seconds']:.0f} s; "
          f"wrote {args.out}/sweep.json, sweep.csv, sweep.png")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json
    import math
    from pathlib import Path

    from .calibrate import calibrate
    from .data import read_prompts
    from .text_metrics import METRICS

    # every argument is checked before the model loads
    if args.metric not in METRICS:
        raise ValueError(f"--metric {args.metric!r} is not one of {sorted(METRICS)}.")
    try:
        target = float(args.target)
    except ValueError:
        raise ValueError(f"--target must be a number, got {args.target!r}.") from None
    if not math.isfinite(target):
        raise ValueError(f"--target must be a finite number, got {args.target!r}.")
    alphas = _parse_alphas(args.alphas) if args.alphas else None
    if alphas is not None and len(set(alphas) | {0.0}) < 2:
        raise ValueError(f"--alphas needs at least one alpha besides 0, got {args.alphas!r}.")
    if not 0 < args.tolerance < 1:
        raise ValueError(f"--tolerance is a fraction of the target in (0, 1), got {args.tolerance}.")
    if args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}.")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {args.max_prompts}.")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a JSON file name.")
    prompts = read_prompts(args.prompts)[0][: args.max_prompts]
    args.adapter = [args.adapter]
    model, tokenizer = _load_clm(args)
    kwargs = {} if alphas is None else {"alphas": alphas}
    result = calibrate(model, tokenizer, prompts, args.metric, target, tolerance=args.tolerance,
                       max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       **kwargs)
    print(f"{'alpha':>10}{args.metric:>14}{'sd':>10}{'degenerate':>12}")
    for p in result.probes:
        print(f"{p['alpha']:>10.4g}{p['value']:>14.4g}{p.get('sd', float('nan')):>10.3g}{p['degenerate_rate']:>12.0%}")
    print(result.summary())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def _parse_vector(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if not sep or not path:
        raise ValueError(f"--vector takes PATH:SCALE, got {text!r}.")
    return path, _parse_alphas(scale, f"--vector {text!r}: the scale")[0]


def _vector_grid(args: argparse.Namespace) -> int:
    from .data import read_prompts
    from .loading import load_model
    from .sweep import format_grid, vector_grid_sweep

    named = {}
    for item in args.vector:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--vector takes NAME=PATH for a grid (e.g. concise=c.safetensors), got {item!r}.")
        if name in named:
            raise ValueError(f"--vector: the name {name!r} is given twice; each vector needs its own name.")
        named[name] = path
    n = len(named)
    if len(args.scales) not in (1, n) or len(args.metric) != n:
        raise ValueError(f"{n} vectors: give --scales once (shared) or once per vector, and --metric once per "
                         f"vector; got {len(args.scales)} --scales and {len(args.metric)} --metric.")
    prompts = read_prompts(args.prompts)[0][: args.max_prompts]
    knobs = {name: _parse_alphas(args.scales[i if len(args.scales) > 1 else 0], "--scales")
             for i, name in enumerate(named)}
    targets = _parse_targets(args.target)
    _check_out(args.out)
    model, tokenizer = load_model(args.base)
    result = vector_grid_sweep(model.eval(), tokenizer, named, knobs, dict(zip(named, args.metric)), prompts,
                               args.out, targets=targets, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, title=" x ".join(named) + " (vectors)")
    print(format_grid(result))
    print(f"generation {result['generation_seconds']:.0f} s; wrote {args.out}/grid.json, grid.csv, grid.png")
    return 0


def _vectors(args: argparse.Namespace) -> int:
    import json

    from . import vectors

    if args.action == "extract":
        meta = vectors.extract(args.base, args.aligned, args.out)
        print(f"wrote {args.out}: {meta['n_tensors_differ']} of {meta['n_tensors_total']} tensors differ, "
              f"total norm {float(meta['total_norm']):.4g}")
    elif args.action == "apply":
        pairs = [_parse_vector(v) for v in args.vector]
        out = vectors.apply_to_checkpoint(args.base, pairs, args.out)
        print(f"wrote {out} = {args.base} + " + " + ".join(f"{s:g} * {p}" for p, s in pairs))
    elif args.action == "grid":
        return _vector_grid(args)
    else:
        meta = vectors.inspect_vector(args.path)
        norms = meta.pop("norms")
        tensors = meta.pop("tensors")
        print(json.dumps(meta, indent=1))
        for name, norm in sorted(norms.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"{norm:12.5g}  {name}  {tensors.get(name, {}).get('shape')}")
    return 0


def _router_fit(args: argparse.Namespace) -> int:
    import time

    from .data import read_labelled
    from .loading import load_model
    from .router import PromptRouter, check_router_dir, routing_report

    try:  # everything is checked before the model loads
        check_router_dir(args.out)
    except FileExistsError as e:
        raise ValueError(f"--out: {e}") from None
    prompts, labels = read_labelled(args.data, args.label_field)
    heldout = read_labelled(args.heldout, args.label_field) if args.heldout else None
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers must be hidden-state indices separated by commas; got {args.layers!r}.") from None
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    router = PromptRouter.fit(model.eval(), tokenizer, prompts, labels, layers=layers, weight_decay=args.weight_decay)
    seconds = time.perf_counter() - start
    fitted = routing_report(router.route(model, tokenizer, prompts), labels)
    print(f"fitted on {len(prompts)} prompts ({', '.join(f'{n} {labels.count(n)}' for n in router.labels)}) at "
          f"layers {router.layers} in {seconds:.1f} s; accuracy on them {fitted['accuracy']:.3f}")
    if heldout:
        report = routing_report(router.route(model, tokenizer, heldout[0]), heldout[1])
        print(f"held-out ({args.heldout}): accuracy {report['accuracy']:.3f}; rows: true label, columns: route")
        names = list(report["confusion"])
        print(" " * 12 + " ".join(f"{n[:8]:>8s}" for n in names))
        for true, row in report["confusion"].items():
            print(f"{true[:12]:12s}" + " ".join(f"{row[n]:8d}" for n in names))
    router.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve.server import run_server
    except ImportError as e:
        raise ValueError(f"peft-clm serve needs the serve extra ({e.name} is missing): pip install 'peft-clm[serve]'")
    named, plain = {}, []
    for item in args.adapter:  # NAME=DIR, or DIR (named after its directory, as elsewhere)
        name, sep, path = item.partition("=")
        if sep and name and path and name.replace("-", "_").replace(".", "_").isidentifier():
            if name in named:
                raise ValueError(f"--adapter: the name {name!r} is given twice; each adapter needs its own name.")
            named[name] = path
        else:
            plain.append(item)
    adapters = dict(named)
    for name, path in zip(adapter_names(plain), plain) if plain else ():
        if name in adapters:
            raise ValueError(f"--adapter {path}: its name {name!r} is taken; give it one with NAME={path}.")
        adapters[name] = path
    return run_server(
        args.model, adapters, interpolation=args.interpolation, alpha=args.alpha, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        max_new_tokens_limit=args.max_new_tokens_limit, max_body_bytes=args.max_body_bytes, dtype=args.dtype,
        device=args.device, served_model_name=args.served_model_name, context_length=args.context_length,
        drain_timeout=args.drain_timeout, log_level=args.log_level, threads=args.threads, router=args.router,
        policy=args.policy,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-clm", description="Controllable-alignment layers (CLM) for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a CLM adapter with DPO or SFT (TRL)")
    t.add_argument("--model", required=True, help="local HF directory, a .gguf file, or 'smollm2'")
    t.add_argument("--data", required=True, help="JSONL: prompt/chosen/rejected (dpo) or prompt/completion (sft)")
    t.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    t.add_argument("--out", required=True, help="adapter directory to write")
    t.add_argument("--interpolation", choices=["logits", "hidden", "weights"], default="logits")
    t.add_argument("--rank", type=int, help="a low-rank CLM layer: train (and save) rank-r factors only")
    t.add_argument("--lowrank-modules", help="with --rank: comma-separated linear modules of the layer that get "
                   "factors (default: all; the zeroed two, self_attn.o_proj,mlp.down_proj, give the smallest file)")
    t.add_argument("--adapter-type", choices=["clm", "lora", "full"], default="clm",
                   help="what to train: the CLM layer (default), or the LoRA / full fine-tuning baselines")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--sft-weight", type=float, default=0.0, help="weight of the chosen answers' NLL added to DPO")
    t.add_argument("--hold", help="dpo: JSONL of prompt/completion rows whose answer tokens the adapter must leave "
                   "alone (a KL term towards the base on them)")
    t.add_argument("--hold-weight", type=float, help="weight of the --hold KL term (default 1)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--resume", help="checkpoint directory, or 'last'")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="answer prompts at one or several alphas, side by side")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", required=True, action="append", help="adapter directory (repeat for several)")
    g.add_argument("--alpha", action="append", help="repeat for several alphas")
    g.add_argument("--interpolation", choices=["logits", "hidden", "weights"])
    g.add_argument("--prompts", help="file of prompts (JSONL with 'prompt', or text lines)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("prompt", nargs="?")
    g.set_defaults(func=_generate)

    w = sub.add_parser("sweep", help="generate at each alpha, score, write table/JSON/CSV/plot; several adapters "
                                     "give a grid of their alphas and heat maps")
    w.add_argument("--model", required=True)
    w.add_argument("--adapter", required=True, action="append", help="repeat for a grid over several adapters")
    w.add_argument("--alphas", action="append", help="comma-separated (default -0.5,0,0.25,0.5,0.75,1,1.5,2; "
                   "grid: 0,0.5,1,1.5); with several adapters once for all or once per adapter")
    w.add_argument("--prompts", required=True, help="JSONL (held-out pairs give preference metrics too) or text")
    w.add_argument("--metric", action="append", help="words (default) or casualness; once per adapter for a grid")
    w.add_argument("--target", action="append", help="grid: METRIC=VALUE, pick the grid point nearest the targets")
    w.add_argument("--out", required=True)
    w.add_argument("--interpolation", choices=["logits", "hidden", "weights"])
    w.add_argument("--reference", help="JSON of a full-DPO run to draw as a line")
    w.add_argument("--max-prompts", type=int)
    w.add_argument("--max-new-tokens", type=int, default=48)
    w.add_argument("--batch-size", type=int, default=32)
    w.add_argument("--beta", type=float, default=0.1)
    w.set_defaults(func=_sweep)

    c = sub.add_parser("calibrate", help="find the alpha that gives a target value of a metric on prompts, within "
                                         "the usable (non-degenerate) range; refuse targets out of reach")
    c.add_argument("--model", required=True)
    c.add_argument("--adapter", required=True, help="one CLM adapter directory")
    c.add_argument("--metric", required=True, help="words or casualness")
    c.add_argument("--target", required=True, help="the metric's mean to reach, e.g. 25")
    c.add_argument("--prompts", required=True, help="JSONL with 'prompt', or text lines")
    c.add_argument("--interpolation", "--mode", dest="interpolation", choices=["logits", "hidden", "weights"])
    c.add_argument("--alphas", help="the coarse grid, comma-separated (default -1,-0.5,0,0.5,1,1.5,2)")
    c.add_argument("--tolerance", type=float, default=0.02, help="stop once within this fraction of the target "
                   "(and of the metric's span)")
    c.add_argument("--max-steps", type=int, default=5, help="measurements after the coarse grid")
    c.add_argument("--max-prompts", type=int)
    c.add_argument("--max-new-tokens", type=int, default=48)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--out", help="also write the result as JSON to this file")
    c.set_defaults(func=_calibrate)

    v = sub.add_parser("vectors", help="alignment vectors: extract, apply, inspect")
    vsub = v.add_subparsers(dest="action", required=True)
    ve = vsub.add_parser("extract", help="vector = aligned - base (streamed, tensor by tensor)")
    ve.add_argument("--base", required=True)
    ve.add_argument("--aligned", required=True)
    ve.add_argument("--out", required=True, help="V.safetensors")
    va = vsub.add_parser("apply", help="base + sum scale * vector, to a new checkpoint directory")
    va.add_argument("--base", required=True)
    va.add_argument("--vector", required=True, action="append", help="V.safetensors:SCALE (repeatable)")
    va.add_argument("--out", required=True)
    vg = vsub.add_parser("grid", help="multi-domain search: answer prompts at every point of a grid of vector "
                         "scales, score each domain's metric, write table/JSON/heat maps")
    vg.add_argument("--base", required=True, help="the checkpoint the vectors are applied to")
    vg.add_argument("--vector", required=True, action="append", help="NAME=V.safetensors (one per domain)")
    vg.add_argument("--scales", required=True, action="append", help="comma-separated; once, or once per vector")
    vg.add_argument("--metric", required=True, action="append", help="words or casualness, once per vector")
    vg.add_argument("--prompts", required=True)
    vg.add_argument("--target", action="append", help="METRIC=VALUE: pick the grid point nearest the targets")
    vg.add_argument("--out", required=True)
    vg.add_argument("--max-prompts", type=int)
    vg.add_argument("--max-new-tokens", type=int, default=48)
    vg.add_argument("--batch-size", type=int, default=32)
    vi = vsub.add_parser("inspect", help="metadata and the largest tensor norms of a vector")
    vi.add_argument("path")
    vi.add_argument("--top", type=int, default=10)
    v.set_defaults(func=_vectors)

    r = sub.add_parser("router", help="a prompt router for serve --router: fit one on labelled prompts")
    rsub = r.add_subparsers(dest="router_command", required=True)
    rf = rsub.add_parser("fit", help="fit a PromptRouter on the base model's hidden states and save it")
    rf.add_argument("--model", required=True, help="local HF directory, a .gguf file, or 'smollm2'")
    rf.add_argument("--data", required=True, help='JSONL rows {"prompt": text or chat, "label": ...}')
    rf.add_argument("--label-field", default="label", help="the field that holds each row's label (default: label)")
    rf.add_argument("--heldout", help="JSONL rows of the same form to report accuracy and confusion on")
    rf.add_argument("--layers", help="hidden-state indices, comma-separated (default: five evenly spaced)")
    rf.add_argument("--weight-decay", type=float, default=1e-2)
    rf.add_argument("--out", required=True, help="the router's directory (router.safetensors, router_config.json)")
    r.set_defaults(func=_router_fit)

    s = sub.add_parser("serve", help="OpenAI-compatible server: every request carries its own alpha, batched together")
    s.add_argument("--model", required=True, help="local HF directory, a .gguf file, or 'smollm2'")
    s.add_argument("--adapter", required=True, action="append", help="[NAME=]DIR of a CLM adapter (repeatable)")
    s.add_argument("--interpolation", choices=["logits", "hidden", "weights"], help="default: the adapter's own")
    s.add_argument("--alpha", type=float, default=1.0, help="alpha of a request that sends none (default 1)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch-size", type=int, default=8, help="rows per generate() call (1: no batching)")
    s.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="a batch starts once this long passes without a new request (at most 4x this in all)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 + Retry-After")
    s.add_argument("--max-new-tokens-limit", type=int, default=1024, help="the largest max_tokens accepted")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--context-length", type=int, help="default: the model's max_position_embeddings")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    s.add_argument("--device", help="default: cuda if available, else cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    s.add_argument("--served-model-name", help="the base model's id in the API (default: the --model name)")
    s.add_argument("--router", help="a PromptRouter directory (router.safetensors + router_config.json): requests "
                   "to the base model that send no alpha get their route's alphas from --policy")
    s.add_argument("--policy", help='a JSON file {route: {adapter: alpha}}, e.g. {"medical": {"medical_avoid": 1}}; '
                   "a route it leaves out is the base model (every knob at 0)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM, seconds to let requests in flight finish")
    s.add_argument("--log-level", choices=["debug", "info", "warning"], default="info",
                   help="info: one line per request; debug: also the batches formed")
    s.set_defaults(func=_serve)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    # `--alphas -0.5,0,1` and `--alpha -1`: argparse would read a value starting with '-' as an option.
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--alphas", "--alpha", "--scales") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_join_negative_values(argv))
    from .train import TrainingDiverged

    # PEFT and TRL still read transformers' old `gradient_checkpointing` names (peft-clm passes the new ones); a
    # user of the command cannot act on that warning, so it is not shown
    warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)

    try:
        return args.func(args)
    except TrainingDiverged as e:  # the run failed loudly; nothing was saved
        print(f"peft-clm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        print(f"peft-clm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
