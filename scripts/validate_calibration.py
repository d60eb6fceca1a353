"""Does a calibrated alpha carry over to prompts it was not calibrated on? Calibrate on one half of the held-out
prompts, measure on the other half.

Half A is the first `--half` held-out prompts (the ones `peft-clm sweep --max-prompts 24` answers), half B the next
`--half`. Given `--sweep` (that sweep's sweep.json, same adapter, mode and token budget), the coarse grid on half A
is scored from the sweep's recorded answers instead of generated again (decoding is greedy: the same answers).
Three targets per dimension are spread over what the knob reaches in its usable range on half A (20%, 50% and 80%
of the way from the lowest to the highest mean); each is calibrated on A (`peft_clm.tools.calibrate.calibrate`),
then the metric is measured on B at the alpha found, and called within tolerance when
|B - target| <= 10% of |target|. Beside each target: the metric's spread over the prompts at that alpha on A and B,
and the chance that B lands within 10% if the knob acted on B exactly as on A, from A's spread alone
(`peft_clm.tools.calibrate.transfer_chance`): how often the draw of prompts by itself lets an exact knob pass, so a
miss where that chance is low says little about the knob. `within_draw_band` says whether B lies within 1.96 standard
deviations of the draw (sqrt(sd_A^2/n_A + sd_B^2/n_B)) of A's value at that alpha (calibration stops near the target,
not on it): outside it, B is further off than the draw of prompts puts an exact knob more than one time in twenty,
so the knob acts otherwise on B. A knob whose usable reach lies within 10% of its middle value is reported as
`"testable": false`: its targets lie closer together than the tolerance, so the check barely tests anything.

`--extra-prompts FILE` (repeatable; with `--extra-domain D` only rows whose "domain" is D) adds prompts the knob was
never trained on, dealt alternately to half A and half B after the held-out ones, so that the two halves differ
less by chance; the answers are then all generated (no `--sweep`).

    python scripts/validate_calibration.py --adapter runs/concise --dimension concise --max-new-tokens 64 \\
        --sweep results/concise/sweep.json --out results/calibration/concise.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
METRIC = {"concise": "words", "formal": "casualness"}


def deal(half_a: list, half_b: list, extra: list) -> tuple[list, list, int]:
    """The two halves with `extra` prompts dealt alternately (A first), after dropping any extra prompt already in a
    half or dealt before (the same question in both halves would not be held out). Returns (A, B, dropped)."""
    seen = {json.dumps(p, sort_keys=True) for p in half_a + half_b}
    kept = []
    for p in extra:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return half_a + kept[0::2], half_b + kept[1::2], len(extra) - len(kept)


def transfer_check(target: float, value_a: float, sd_a: float, n_a: int, value_b: float, sd_b: float, n_b: int,
                   tolerance: float = 0.10) -> dict:
    """One target's check on half B: its relative error and whether it is within `tolerance`; the chance, known
    before B is measured, that a knob acting on B exactly as on A lands within it (from A's value and spread:
    `transfer_chance`); and whether B lies within the 95% band of the prompt draw around A's value
    (1.96 * sqrt(sd_a^2/n_a + sd_b^2/n_b), both halves' spreads, as B is measured by then).

    >>> r = transfer_check(4.0, 4.1, 3.0, 54, 3.0, 3.2, 54)
    >>> round(r["relative_error_b"], 2), r["within_10pct"], round(r["chance_within_10pct_if_exact"], 3)
    (0.25, False, 0.505)
    >>> r["within_draw_band"]   # 1.1 from A's value, against a band of 1.96 * 0.597
    True
    """
    from peft_clm.tools.calibrate import transfer_chance

    rel = abs(value_b - target) / abs(target) if target else float("inf")
    draw_sd = (sd_a**2 / n_a + sd_b**2 / n_b) ** 0.5
    return {"relative_error_b": rel, "within_10pct": rel <= tolerance,
            "chance_within_10pct_if_exact": transfer_chance(target, sd_a, n_a, n_b, tolerance, value=value_a),
            "draw_sd": draw_sd, "within_draw_band": abs(value_b - value_a) <= 1.96 * draw_sd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--dimension", required=True, choices=sorted(METRIC))
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--interpolation", default="logits", choices=["logits", "hidden", "weights"])
    parser.add_argument("--sweep", help="sweep.json of the same adapter/mode/budget on half A: its answers score the "
                                        "coarse grid")
    parser.add_argument("--alphas", default="-0.5,0,0.25,0.5,0.75,1,1.5,2", help="the coarse grid")
    parser.add_argument("--fractions", default="0.2,0.5,0.8", help="where the targets sit in the reachable span")
    parser.add_argument("--half", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--extra-prompts", action="append", default=[],
                        help="JSONL of more prompts (repeatable), dealt alternately to the halves")
    parser.add_argument("--extra-domain", help="keep only --extra-prompts rows whose 'domain' is this")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from peft import PeftModel

    from peft_clm.tools.calibrate import calibrate, measure, summarize
    from peft_clm.tools.data import DataError, read_prompts
    from peft_clm.tools.loading import load_model
    from peft_clm.tools.sweep import usable_range

    metric = METRIC[args.dimension]
    prompts = read_prompts(ROOT / "data" / args.dimension / "heldout.jsonl")[0]
    if args.half < 2:  # a spread over prompts (what the chance and the band read) needs two of them
        raise SystemExit(f"--half must be at least 2 prompts, got {args.half}.")
    half_a, half_b = prompts[: args.half], prompts[args.half : 2 * args.half]
    if len(half_b) < args.half:
        raise SystemExit(f"{len(prompts)} held-out prompts: too few for two halves of {args.half}.")
    if args.extra_prompts and args.sweep:
        raise SystemExit("--sweep scores half A from a sweep's answers to the held-out prompts alone; with "
                         "--extra-prompts half A is larger: leave --sweep out")
    if args.extra_domain and not args.extra_prompts:
        raise SystemExit("--extra-domain filters --extra-prompts; give --extra-prompts")
    try:
        extra = [p for path in args.extra_prompts for p in read_prompts(path, domain=args.extra_domain)[0]]
    except DataError as e:
        raise SystemExit(f"--extra-prompts: {e}") from None
    half_a, half_b, dropped = deal(half_a, half_b, extra)
    if extra:
        print(f"--extra-prompts: {len(extra) - dropped} more prompts ({dropped} repeats dropped): halves of "
              f"{len(half_a)} and {len(half_b)}", flush=True)
    alphas = [float(a) for a in args.alphas.split(",")]
    cache_a: dict = {}
    if args.sweep:
        sweep = json.loads(Path(args.sweep).read_text())
        if sweep["metric"] != metric or sweep.get("interpolation") != args.interpolation or sweep.get(
                "max_new_tokens") != args.max_new_tokens or len(sweep["answers"][str(alphas[0])]) != args.half:
            raise SystemExit(f"{args.sweep} is not a sweep of {metric} in {args.interpolation} mode at "
                             f"{args.max_new_tokens} new tokens on {args.half} prompts.")
        for a in alphas:
            cache_a[a] = summarize(sweep["answers"][str(a)], metric)
    t0 = time.perf_counter()
    base, tokenizer = load_model("smollm2")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    model.set_interpolation(args.interpolation)
    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    coarse = measure(model, tokenizer, half_a, alphas, metric, cache=cache_a, **kw)
    usable = usable_range(alphas, [coarse[a]["degenerate_rate"] for a in alphas])
    lo, hi = usable["range"]
    reach = sorted(coarse[a]["value"] for a in alphas if lo <= a <= hi)
    targets = [round(reach[0] + float(f) * (reach[-1] - reach[0]), 2) for f in args.fractions.split(",")]
    # A knob whose whole usable reach lies within 10% of its middle: targets closer together than the tolerance.
    middle = (reach[0] + reach[-1]) / 2
    testable = not all(abs(v - middle) <= 0.10 * abs(middle) for v in (reach[0], reach[-1]))
    found = [calibrate(model, tokenizer, half_a, metric, t, alphas=alphas, max_steps=args.max_steps, cache=cache_a,
                       **kw) for t in targets]
    on_b = measure(model, tokenizer, half_b, [c.alpha for c in found], metric, **kw)
    rows = []
    for t, c in zip(targets, found):
        at_b = on_b[c.alpha]
        rows.append({"target": t, "alpha": c.alpha, "value_a": c.value, "value_b": at_b["value"],
                     "degenerate_rate_b": at_b["degenerate_rate"], "sd_a": c.sd, "sd_b": at_b["sd"],
                     **transfer_check(t, c.value, c.sd, len(half_a), at_b["value"], at_b["sd"], len(half_b))})
    result = {
        "dimension": args.dimension, "metric": metric, "adapter": args.adapter, "interpolation": args.interpolation,
        "max_new_tokens": args.max_new_tokens, "half_a": len(half_a), "half_b": len(half_b),
        "extra_prompts": args.extra_prompts, "extra_domain": args.extra_domain, "n_extra": len(extra) - dropped,
        "coarse_alphas": alphas, "usable_range": [lo, hi], "reachable_a": [reach[0], reach[-1]],
        "testable": testable, "rows": rows, "probes_a": found[-1].probes,
        "expected_within_if_exact": sum(r["chance_within_10pct_if_exact"] for r in rows),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # never a half-written result where an earlier one stood
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"# {args.dimension} ({metric}), {args.interpolation} mode: usable alphas [{lo:g}, {hi:g}] on half A, "
          f"reaching {metric} [{reach[0]:.2f}, {reach[-1]:.2f}]")
    print(f"| target {metric} | alpha (calibrated on A) | {metric} on A (sd) | {metric} on B, held out (sd) "
          f"| error on B | within 10% | chance within 10% for an exact knob | within the draw's 95% band |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['target']:.2f} | {r['alpha']:.3g} | {r['value_a']:.2f} ({r['sd_a']:.2f}) | {r['value_b']:.2f} "
              f"({r['sd_b']:.2f}) | {r['relative_error_b']:.1%} | {'yes' if r['within_10pct'] else 'no'} "
              f"| {r['chance_within_10pct_if_exact']:.0%} | {'yes' if r['within_draw_band'] else 'no'} "
              f"(+-{1.96 * r['draw_sd']:.2f}) |")
    print(f"targets within 10%: {sum(r['within_10pct'] for r in rows)} of {len(rows)}; expected for a knob that "
          f"acts on B exactly as on A: {result['expected_within_if_exact']:.2f} of {len(rows)}")
    if not testable:
        print(f"not a test: the usable reach [{reach[0]:.2f}, {reach[-1]:.2f}] lies within 10% of its middle "
              f"({middle:.2f}): the targets lie closer together than the tolerance")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
