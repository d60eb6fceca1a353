"""The side-by-side table of knobs from their sweep.json files (CLM's alpha in each mode, LoRA's scale, a steering
vector's multiplier): the metric's rho over [-0.5, 1.5], the per-prompt wrong-way fraction from 0 to 1, the largest
rise in degeneration over alpha 0 inside [-0.5, 1.5], the usable range, and held-out reward accuracy at 1.

    python scripts/baseline_table.py --out results/baselines/table.md \\
        "concise CLM logits=results/concise/sweep.json" \\
        "concise steering=results/baselines/concise_steering/sweep.json"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(label: str, result: dict, core: tuple[float, float] = (-0.5, 1.5)) -> dict:
    """One knob's figures from its sweep result."""
    rows = {r["alpha"]: r for r in result["rows"]}
    metric = result["metric"]
    inside = [a for a in rows if core[0] <= a <= core[1]]
    rise = max(rows[a]["degenerate_rate"] for a in inside) - rows[0.0]["degenerate_rate"]
    rel = result["reliability"]
    return {
        "knob": label,
        "metric": metric,
        "metric_at": {str(a): rows[a][f"{metric}_mean"] for a in (0.0, 1.0, 2.0) if a in rows},
        "rho_core": result["spearman_rho_core"]["rho"],
        "wrong_way": rel["wrong_way_fraction"],
        "rho_median": rel["rho_quantiles"]["median"],
        "degeneration_rise_core": rise,
        "degeneration_at_2": rows[2.0]["degenerate_rate"] if 2.0 in rows else None,
        "usable_range": result["usable"]["range"],
        "reward_accuracy_at_1": rows[1.0].get("reward_accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="LABEL=PATH/sweep.json")
    parser.add_argument("--out", help="write the table (markdown) here, and its figures beside it as JSON")
    args = parser.parse_args()
    table = []
    for item in args.sweeps:
        label, _, path = item.partition("=")
        table.append(row(label, json.loads(Path(path).read_text())))
    lines = [
        "| knob | metric at 0 / 1 / 2 | rho over [-0.5, 1.5] | wrong way 0 -> 1 | median per-prompt rho "
        "| degeneration rise in [-0.5, 1.5] | degenerate at 2 | usable range | held-out reward acc. at 1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in table:
        acc = "n/a" if t["reward_accuracy_at_1"] is None else f"{t['reward_accuracy_at_1']:.2f}"
        deg2 = "n/a" if t["degeneration_at_2"] is None else f"{t['degeneration_at_2']:.0%}"
        lines.append(
            f"| {t['knob']} | {' / '.join(f'{v:.2f}' for v in t['metric_at'].values())} ({t['metric']}) "
            f"| {t['rho_core']:.3f} | {t['wrong_way']:.0%} | {t['rho_median']:.2f} "
            f"| {100 * t['degeneration_rise_core']:+.0f} pts | {deg2} | {t['usable_range']} | {acc} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
