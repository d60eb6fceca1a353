"""Each per-level alignment vector alone at a few scales: its own domain's share of its level and its leakage.

The `knob-search --kind vectors` stage of `domains_experiment.py` scores these 1-D sweeps too, but always goes on
to the 27-combination search (about 40 s a point on 2 CPU cores); this reads the sweeps alone, e.g. at scales
below the search's grid:

    python scripts/domains_vector_sweep.py --runs runs/domains_more_vectors --data data/domains_more \\
        --alphas 0.25 --out results/domains/more_vectors/scale_0.25.json
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace


ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="holds vectors/<knob>.safetensors or full/<knob>/")
    parser.add_argument("--data", required=True, help="holds heldout.jsonl")
    parser.add_argument("--alphas", required=True, help="scales, comma-separated (0 is always scored)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("domains_experiment", ROOT / "scripts" / "domains_experiment.py")
    dx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dx)
    from peft_clm.tools.levels import knob_leakage

    alphas = sorted({0.0, *(float(a) for a in args.alphas.split(","))})
    knobs = SimpleNamespace(design="per-level", runs=args.runs)
    model, tokenizer, vectors = dx.load("vectors", knobs)
    rows = dx.read_jsonl(Path(args.data) / "heldout.jsonl")
    row_domains = [r["domain"] for r in rows]
    names = dx.knob_names(knobs)
    zero = dict.fromkeys(names, 0.0)
    t0 = time.perf_counter()
    base = dx.score_points("vectors", model, tokenizer, rows, [zero], vectors)[0]
    result = {}
    for name in names:
        domain, level = name.rsplit("_", 1)
        scales = [a for a in alphas if a]
        scores = dx.score_points("vectors", model, tokenizer, rows, [{**zero, name: a} for a in scales], vectors)
        sweep = [{"alpha": 0.0, "levels": dx.distribution(base, row_domains)}]
        sweep += [{"alpha": a, "levels": dx.distribution(s, row_domains)} for a, s in zip(scales, scores)]
        result[name] = {"sweep": sweep, "leakage": {p["alpha"]: knob_leakage(sweep, domain, p["alpha"])["max"]
                                                    for p in sweep if p["alpha"]}}
        for p in sweep[1:]:
            shares = " ".join(f"{d[:3]} {p['levels'][d][level]:.2f}" for d in dx.DOMAINS)
            print(f"{name:17s} {p['alpha']:g}: at {level} {shares}; leakage {result[name]['leakage'][p['alpha']]}")
    dx.write_json(Path(args.out), {"alphas": alphas, "knobs": result, "seconds": time.perf_counter() - t0})
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
