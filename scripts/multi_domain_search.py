"""Multi-domain control by searching knobs instead of retraining, timed against training one extra adapter.

Two trained CLM adapters (one per preference domain, e.g. concise and formal) give two knobs. The search is
`peft_clm.tools.sweep.grid_sweep` (what `peft-clm sweep --adapter A --adapter B` runs): every grid point of their
alphas, scored by each domain's metric on held-out prompts of both domains, and the point nearest the targets picked.
The alternative is to train one more adapter on the pooled pairs of both domains (same steps, batch, lr as the
single-domain adapters) and score it the same way. Writes `search.json` and prints both, with their times.

    python scripts/multi_domain_search.py --adapter runs/compare/concise/clm --adapter runs/compare/formal/clm \\
        --out runs/search                                                      # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peft_clm.tools.text_metrics import DIMENSION_METRIC  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", required=True, help="one trained adapter per domain")
    parser.add_argument("--domains", default="concise,formal", help="the adapters' domains, in the same order")
    parser.add_argument("--alphas", default="0,0.5,1,1.5")
    parser.add_argument("--interpolation", default="logits", choices=["logits", "hidden", "weights"])
    parser.add_argument(
        "--target",
        action="append",
        help="METRIC=VALUE; default: for each domain, the most aligned "
        "value its own adapter reaches alone on the grid (every domain as aligned as its own knob "
        "can make it, at once)",
    )
    parser.add_argument("--prompts-per-domain", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/search")
    args = parser.parse_args()

    from peft import PeftModel

    from peft_clm.tools.cli import _parse_targets
    from peft_clm.tools.data import read_jsonl
    from peft_clm.tools.generation import generate_answers
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.sweep import format_grid, grid_sweep, target_distances
    from peft_clm.tools.text_metrics import METRICS
    from peft_clm.tools.train import train

    domains = args.domains.split(",")
    if len(domains) != len(args.adapter):
        raise SystemExit(f"{len(args.adapter)} adapters but {len(domains)} domains ({args.domains}).")
    metrics = [DIMENSION_METRIC[d] for d in domains]
    prompts = [
        r["prompt"]
        for d in domains
        for r in read_jsonl(ROOT / "data" / d / "heldout.jsonl", "dpo")[: args.prompts_per_domain]
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alphas = [float(a) for a in args.alphas.split(",")]

    # the search: load the adapters, sweep the grid, pick the point nearest the targets
    t0 = time.perf_counter()
    names = domains  # the knobs are named after their domains in tables and heat maps
    model, tokenizer = load_model("smollm2")
    model = PeftModel.from_pretrained(model, args.adapter[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapter[1:]):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    model.set_interpolation(args.interpolation)
    model.eval()
    targets = _parse_targets(args.target)
    grid = grid_sweep(
        model,
        tokenizer,
        {n: alphas for n in names},
        dict(zip(names, metrics)),
        prompts,
        out / "grid",
        max_new_tokens=args.max_new_tokens,
        batch_size=32,
        title=" x ".join(domains),
    )
    if not targets:  # each domain as aligned (lowest metric) as its own knob alone makes it, all at once
        for n, m in zip(names, metrics):
            alone = [r for r in grid["rows"] if all(r[f"alpha_{o}"] == 0.0 for o in names if o != n)]
            targets[m] = min(r[f"{m}_mean"] for r in alone)
    dist = target_distances(grid["rows"], targets)
    best = min(range(len(dist)), key=dist.__getitem__)
    search_s = time.perf_counter() - t0
    print(format_grid({**grid, "best": best}))

    # the alternative: one more adapter trained on the pooled pairs of all domains, then scored the same way
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pooled = Path(tmp) / "pooled.jsonl"
        pooled.write_text(
            "".join(
                json.dumps(r) + "\n" for d in domains for r in read_jsonl(ROOT / "data" / d / "train.jsonl", "dpo")
            )
        )
        trained = train(
            "smollm2",
            str(pooled),
            str(out / "pooled_adapter"),
            method="dpo",
            max_steps=args.steps,
            batch_size=4,
            lr=5e-5,
            beta=0.1,
            sft_weight=1.0,
            seed=0,
            progress=False,
        )
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base, tokenizer = load_model("smollm2")
    pooled_model = PeftModel.from_pretrained(base, out / "pooled_adapter").eval()
    answers = generate_answers(pooled_model, tokenizer, prompts, [1.0], args.max_new_tokens, batch_size=32)[0]
    pooled_scores = {m: sum(METRICS[m](a) for a in answers) / len(answers) for m in dict.fromkeys(metrics)}
    pooled_eval_s = time.perf_counter() - t0
    pooled_row = {f"{m}_mean": v for m, v in pooled_scores.items()}
    pooled_distance = target_distances([pooled_row], targets, scale_rows=grid["rows"])[0]
    result = {
        "domains": domains,
        "adapters": args.adapter,
        "interpolation": args.interpolation,
        "alphas": alphas,
        "n_prompts": len(prompts),
        "targets": targets,
        "search": {
            "seconds": search_s,
            "grid_points": len(grid["rows"]),
            "best": grid["rows"][best],
            "distance_to_targets": dist[best],
        },
        "pooled_adapter": {
            "train_seconds": train_s,
            "eval_seconds": pooled_eval_s,
            "steps": trained.steps,
            "scores": pooled_scores,
            "distance_to_targets": pooled_distance,
        },
        "search_seconds_vs_train": search_s / (train_s + pooled_eval_s),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "search.json").write_text(json.dumps(result, indent=1))
    print(f"targets: {targets}")
    print(
        f"grid search ({len(grid['rows'])} points x {len(prompts)} prompts, {args.interpolation} mode): "
        f"{search_s:.0f} s; best {grid['rows'][best]} (distance {dist[best]:.2f})"
    )
    print(
        f"pooled adapter ({trained.steps} steps on both domains' pairs): train {train_s:.0f} s + score "
        f"{pooled_eval_s:.0f} s; {pooled_scores} (distance {result['pooled_adapter']['distance_to_targets']:.2f})"
    )
    print(f"search / (train + score) = {result['search_seconds_vs_train']:.2f}; wrote {out}/search.json, {out}/grid/")


if __name__ == "__main__":
    main()
