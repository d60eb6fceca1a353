"""Score stored sweeps again under the current definition of their metric, without generating anything.

A sweep keeps every answer it generated, so when a metric is fixed (casualness stopped counting a possessive 's
as a contraction on 2026-12-05) its figures can be brought up to date from the answers alone
(`peft_clm.tools.sweep.rescore_sweep`): each row's mean, rho, monotonicity and per-prompt reliability change;
fluency, NLL and held-out preference metrics, which do not depend on the metric, are kept. Each file is rewritten
in place (through a temporary file); a `sweep.json` gets its `sweep.csv` and `sweep.png` beside it rewritten too
(with the reference line of `--reference FILE`, as `peft-clm sweep --reference` draws it, else none). Every file is
re-scored before any is written, so a file that cannot be stops the run with nothing changed. Prints each file's
mean at alpha 0 and 1, rho and wrong-way fraction, before -> after.

    python scripts/rescore_sweeps.py results/formal/sweep.json results/modes/formal_*/sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft_clm.tools.sweep import _json_writer, rescore_sweep, write_outputs, write_sweep  # noqa: E402


def summary(result: dict) -> str:
    means = {r["alpha"]: r[f"{result['metric']}_mean"] for r in result["rows"]}
    at = " / ".join(f"{means[a]:.2f}" if a in means else "-" for a in (0.0, 1.0))
    ww = result["reliability"]["wrong_way_fraction"]
    return f"{at}, rho {result['spearman_rho']:.3f}, wrong way {'-' if ww is None else f'{ww:.3f}'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="sweep JSON files (peft-clm sweep, knob_sweep)")
    parser.add_argument("--reference", help="JSON of a reference line for the plots (e.g. full_dpo_reference.json)")
    args = parser.parse_args()
    try:
        reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reference {args.reference}: not a readable JSON file ({e}).") from None
    if reference is not None and not isinstance(reference, dict):
        raise SystemExit(f"--reference {args.reference}: expected a JSON object such as "
                         '{"casualness_mean": 0.64, "label": "full DPO"}.')
    rescored = {}
    for name in args.sweeps:  # re-score every file before writing any
        path = Path(name)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a readable JSON file ({e}).") from None
        if not isinstance(result, dict) or not {"metric", "alphas", "rows", "answers"} <= result.keys():
            raise SystemExit(f"{path}: not a sweep (needs metric, alphas, rows and answers).")
        try:
            before = summary(result)  # the figures as stored, printed beside the new ones
            rescored[path] = before, rescore_sweep(result)
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"{path}: cannot be re-scored ({e}); no file was written.") from None
    for path, (before, result) in rescored.items():
        if path.name == "sweep.json":
            title = f"{result['metric']} vs {result.get('knob', 'alpha')} ({result.get('label', 'CLM')}, re-scored)"
            write_sweep(result, path.parent, reference, title)
        else:
            write_outputs(path.parent, {path.name: _json_writer(result)})
        print(f"{path}: {before} -> {summary(result)}")


if __name__ == "__main__":
    main()
