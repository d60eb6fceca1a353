"""The alpha sweep and the grid of several knobs: answer at each alpha, score, write table, CSV, JSON and plots.

Every sweep reports, beside the target metric, what a user meets: fluency at every alpha (degeneration rate,
distinct-2, the answers' NLL under the base model), the usable range (alphas where degeneration stays within 5 points
of alpha 0) and per-prompt reliability (which prompts move the wrong way from alpha 0 to 1, each prompt's rho).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Optional, Union

from .generation import generate_answers
from .preference import answer_nll, metrics_from_logprobs, preference_logprobs_at
from .text_metrics import ALIGNED_DIRECTION, METRICS, fluency


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def write_outputs(out: Union[str, Path], files: dict[str, Callable[[Path], None]]) -> None:
    """Write several result files into `out` together: each is written to a temporary file first, and only when all
    are written are they renamed into place, so a failure never leaves new JSON beside an old plot.

    `files` maps a file name to a function that writes that file's content to the path it is given.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    try:
        for name, write in files.items():
            tmps[name] = out / f".tmp-{name}"  # the suffix stays, so writers that look at it still work
            write(tmps[name])
        for name, tmp in tmps.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def _json_writer(result: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(result, indent=1), encoding="utf-8")


def _csv_writer(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return write


def _save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out and write a figure (PNG), and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _shade_unusable(ax, alphas: Sequence[float], unusable: Sequence[float]) -> None:
    """Shade each alpha outside the usable range (half-way to its neighbours) on `ax`."""
    grid = sorted(alphas)
    for i, a in enumerate(grid):
        if a not in unusable:
            continue
        left = (a + grid[i - 1]) / 2 if i > 0 else a - 0.125
        right = (a + grid[i + 1]) / 2 if i + 1 < len(grid) else a + 0.125
        first = not any(p.get_label() == _UNUSABLE_LABEL for p in ax.patches)
        ax.axvspan(left, right, color="tab:red", alpha=0.12, lw=0, label=_UNUSABLE_LABEL if first else None)


_UNUSABLE_LABEL = "degeneration > alpha 0 + 5 pts"


def plot_sweep(result: dict, path: Path, reference: Optional[dict] = None, title: str = "") -> None:
    """Four panels against alpha: the metric (mean, and each prompt as a thin line), held-out reward accuracy,
    fluency (degeneration rate, distinct-2, base-model NLL), and the distribution of per-prompt Spearman rho. Alphas
    where degeneration rises more than the tolerance above alpha 0 are shaded: outside the usable range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric = result["rows"], result["metric"]
    knob = result.get("knob", "alpha")
    alphas = [r["alpha"] for r in rows]
    unusable = result["usable"]["degenerate_alphas"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    per_prompt = result["reliability"]["values"]
    for i in range(len(per_prompt[0])):
        ax.plot(alphas, [v[i] for v in per_prompt], "-", color="gray", lw=0.6, alpha=0.35)
    ax.plot(alphas, [r[f"{metric}_mean"] for r in rows], "o-", lw=2, label=f"{result.get('label', 'CLM')} (mean)")
    ax.axhline(result["base_value"], color="gray", ls="--", label="base model")
    if reference and reference.get(f"{metric}_mean") is not None:
        ax.axhline(reference[f"{metric}_mean"], color="tab:red", ls=":", label=reference.get("label", "full DPO"))
    _shade_unusable(ax, alphas, unusable)
    ax.axvline(1.0, color="k", lw=0.5, alpha=0.3)
    ax.set_xlabel(knob)
    ax.set_ylabel(f"{metric} (thin: each prompt)")
    ax.legend(fontsize=8)
    ax2 = axes[0][1]
    if "reward_accuracy" in rows[0]:
        ax2.plot(alphas, [r["reward_accuracy"] for r in rows], "s-", color="tab:green", label="reward accuracy")
        if reference and reference.get("reward_accuracy") is not None:
            label = reference.get("label", "full DPO")
            ax2.axhline(reference["reward_accuracy"], color="tab:red", ls=":", label=label)
        ax2.axhline(0.5, color="gray", ls="--", label="chance")
        ax2.set_ylabel("held-out reward accuracy")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no held-out pairs", ha="center", va="center", transform=ax2.transAxes)
    _shade_unusable(ax2, alphas, unusable)
    ax2.set_xlabel(knob)
    ax3 = axes[1][0]
    ax3.plot(alphas, [r["degenerate_rate"] for r in rows], "o-", color="tab:red", label="degenerate (fraction)")
    ax3.plot(alphas, [r["distinct2"] for r in rows], "^-", color="tab:purple", label="distinct-2")
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_xlabel(knob)
    ax3.set_ylabel("fraction")
    _shade_unusable(ax3, alphas, unusable)
    if "base_nll" in rows[0]:
        twin = ax3.twinx()
        twin.plot(alphas, [r["base_nll"] for r in rows], "d--", color="tab:brown", label="base-model NLL/token")
        twin.set_ylabel("NLL per token under the base model")
        twin.legend(loc="center right", fontsize=8)
    ax3.legend(loc="center left", fontsize=8)
    ax3.set_title(f"fluency; usable range {result['usable']['range']}", fontsize=9)
    ax4 = axes[1][1]
    rel = result["reliability"]
    rhos = [p["rho"] for p in rel["per_prompt"] if p["rho"] == p["rho"]]
    ax4.hist(rhos, bins=[x / 10 for x in range(-10, 11)], color="tab:blue", alpha=0.8)
    ax4.set_xlabel(f"per-prompt Spearman rho({knob}, {metric})")
    ax4.set_ylabel("prompts")
    wrong = rel.get("wrong_way_fraction")
    ax4.set_title(f"wrong way 0 -> 1: {wrong:.0%} of prompts" if wrong is not None else "per-prompt rho", fontsize=9)
    _save_figure(fig, path, title)


def per_prompt_reliability(alphas: Sequence[float], values: Sequence[Sequence[float]], direction: int = -1,
                           prompts: Optional[Sequence] = None) -> dict:
    """What each prompt does, not just the mean: `values[j][i]` is prompt i's metric at `alphas[j]`.

    Per prompt: the change from alpha 0 to alpha 1 and its sign, and Spearman's rho over the whole grid (nan when
    the metric does not change at all). Summary: the fractions of prompts that move the aligned way (`direction`,
    -1 = the metric falls, as for every metric in METRICS), the wrong way, or not at all between 0 and 1 (None
    when the grid lacks 0 or 1), and the distribution of the per-prompt rho (quantiles, mean, the fraction whose
    rho has the aligned sign).

    Example:
        ```py
        >>> r = per_prompt_reliability([0, 1, 2], [[10, 5], [8, 6], [6, 7]])
        >>> r["wrong_way_fraction"], r["rho_quantiles"]["median"]
        (0.5, 0.0)
        ```
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 or 1, got {direction!r}.")
    n = len(values[0])
    j0 = alphas.index(0.0) if 0.0 in alphas else None
    j1 = alphas.index(1.0) if 1.0 in alphas else None
    per_prompt = []
    for i in range(n):
        column = [values[j][i] for j in range(len(alphas))]
        item = {"rho": spearman(alphas, column)}
        if j0 is not None and j1 is not None:
            delta = column[j1] - column[j0]
            item.update(delta=delta, moves=(delta > 0) - (delta < 0))
        if prompts is not None:
            p = prompts[i]
            item["prompt"] = p if isinstance(p, str) else p[-1]["content"]
        per_prompt.append(item)
    rhos = sorted(p["rho"] for p in per_prompt if p["rho"] == p["rho"])

    def quantile(q: float) -> float:  # linear interpolation between order statistics
        if not rhos:
            return float("nan")
        pos = q * (len(rhos) - 1)
        lo = int(pos)
        return rhos[lo] + (rhos[min(lo + 1, len(rhos) - 1)] - rhos[lo]) * (pos - lo)

    out = {
        "direction": direction,
        "n_prompts": n,
        "wrong_way_fraction": None,
        "aligned_way_fraction": None,
        "unmoved_fraction": None,
        "rho_quantiles": {name: quantile(q) for name, q in
                          (("min", 0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9),
                           ("max", 1))},
        "rho_mean": sum(rhos) / len(rhos) if rhos else float("nan"),
        "rho_aligned_sign_fraction": sum(r * direction > 0 for r in rhos) / n,
        "rho_undefined_fraction": (n - len(rhos)) / n,
        "per_prompt": per_prompt,
        "values": [list(map(float, v)) for v in values],
    }
    if j0 is not None and j1 is not None:
        moves = [p["moves"] for p in per_prompt]
        out.update(
            wrong_way_fraction=sum(m == -direction for m in moves) / n,
            aligned_way_fraction=sum(m == direction for m in moves) / n,
            unmoved_fraction=sum(m == 0 for m in moves) / n,
        )
    return out


def usable_range(alphas: Sequence[float], degenerate_rates: Sequence[float], tolerance: float = 0.05) -> dict:
    """The alphas a user can dial without the answers breaking: the contiguous stretch of the grid around alpha 0
    where the degeneration rate is at most `tolerance` (5 points) above its rate at alpha 0 (or at the alpha
    nearest 0 when the grid lacks it).

    Returns {"range": [lowest, highest usable alpha], "degenerate_alphas": the grid's alphas above the tolerance,
    "base_rate": the rate at alpha 0, "tolerance": tolerance}.

    Example:
        ```py
        >>> usable_range([-1, 0, 1, 2], [0.3, 0.0, 0.02, 0.4])["range"]
        [0.0, 1.0]
        ```
    """
    order = sorted(range(len(alphas)), key=lambda j: alphas[j])
    zero = min(order, key=lambda j: abs(alphas[j]))
    base = degenerate_rates[zero]
    ok = {j: degenerate_rates[j] <= base + tolerance + 1e-12 for j in order}
    k = order.index(zero)
    lo = hi = k
    while lo > 0 and ok[order[lo - 1]]:
        lo -= 1
    while hi + 1 < len(order) and ok[order[hi + 1]]:
        hi += 1
    return {
        "range": [float(alphas[order[lo]]), float(alphas[order[hi]])],
        "degenerate_alphas": [float(alphas[j]) for j in order if not ok[j]],
        "base_rate": base,
        "tolerance": tolerance,
    }


def score_sweep(alphas: Sequence[float], prompts: Sequence, answers: dict, metric: str,
                nll: Optional[dict] = None, preference: Optional[dict] = None, direction: Optional[int] = None,
                core_range: tuple[float, float] = (-0.5, 1.5), tolerance: float = 0.05, extra: Optional[dict] = None
                ) -> dict:
    """Score the answers of a sweep of any knob (CLM alpha, a LoRA scale, a steering multiplier): per alpha the
    metric's mean, fluency (`degenerate_rate`, `distinct2`, `base_nll`) and, given `preference` ({index of the
    alpha: metrics_from_logprobs(...)}), held-out reward accuracy, margin and DPO loss; overall Spearman's rho
    (over the grid and over `core_range`), the usable range, and per-prompt reliability.

    `answers` and `nll` map the index of each alpha to one answer (one NLL) per prompt.

    Example:
        ```py
        >>> r = score_sweep([0.0, 1.0], ["Hi?"], {0: ["Hello there, friend."], 1: ["Hello."]}, "words")
        >>> r["rows"][1]["words_mean"], r["reliability"]["wrong_way_fraction"]
        (1.0, 0.0)
        ```
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    alphas = [float(a) for a in alphas]
    if len(set(alphas)) != len(alphas):  # answers are stored by alpha, so a repeated alpha would share one list
        raise ValueError(f"alphas {alphas} repeat a value; give each alpha once.")
    rows = []
    for j, a in enumerate(alphas):
        row = {"alpha": a, f"{metric}_mean": None, "n_prompts": len(answers[j])}  # the mean: `_score_metric`
        row.update(fluency(answers[j], nll[j] if nll is not None else None))
        if preference is not None:
            pm = preference[j]
            row.update(reward_accuracy=pm["reward_accuracy"], mean_margin=pm["mean_margin"], dpo_loss=pm["dpo_loss"])
        rows.append(row)
    result = {
        "metric": metric,
        **(extra or {}),
        "alphas": alphas,
        "rows": rows,
        **dict.fromkeys(("base_value", "spearman_rho", "spearman_rho_core")),  # `_score_metric`'s, in this order
        # the held-out implicit reward margin: the preference signal itself, before decoding turns it into text
        "spearman_rho_margin": spearman(alphas, [r["mean_margin"] for r in rows]) if preference else None,
        "monotone": None,
        "usable": usable_range(alphas, [r["degenerate_rate"] for r in rows], tolerance),
        "reliability": None,
        "examples": {str(a): answers[j][:3] for j, a in enumerate(alphas)},
        "answers": {str(a): list(answers[j]) for j, a in enumerate(alphas)},
    }
    return _score_metric(result, prompts, direction, core_range)


def _score_metric(result: dict, prompts: Optional[Sequence], direction: Optional[int] = None,
                  core_range: tuple[float, float] = (-0.5, 1.5)) -> dict:
    """The fields of a sweep that its metric decides, from its stored answers: each row's mean, the base value,
    Spearman's rho (over the grid and over `core_range`), monotonicity and per-prompt reliability. The one owner of
    these fields, for `score_sweep` and `rescore_sweep` alike."""
    metric, alphas = result["metric"], result["alphas"]
    direction = ALIGNED_DIRECTION[metric] if direction is None else direction
    score = METRICS[metric]
    values = [[score(a) for a in result["answers"][str(alpha)]] for alpha in alphas]
    for row, v in zip(result["rows"], values, strict=True):
        row[f"{metric}_mean"] = sum(v) / len(v)
    means = [r[f"{metric}_mean"] for r in result["rows"]]
    core = [j for j, a in enumerate(alphas) if core_range[0] <= a <= core_range[1]]
    zero = min(range(len(alphas)), key=lambda j: abs(alphas[j]))
    result.update(
        base_value=means[zero],
        spearman_rho=spearman(alphas, means),
        spearman_rho_core={"range": list(core_range),
                           "rho": spearman([alphas[j] for j in core], [means[j] for j in core])},
        monotone=all(b >= a for a, b in zip(means, means[1:])) or all(b <= a for a, b in zip(means, means[1:])),
        reliability=per_prompt_reliability(alphas, values, direction, prompts),
    )
    return result


def rescore_sweep(result: dict) -> dict:
    """Score a stored sweep's answers again under the current definition of its metric (after a fix of the metric):
    only the fields the metric decides change (`_score_metric`); fluency, NLL and preference metrics, which do not
    depend on it, are kept. The prompts come from the stored per-prompt reliability. Returns `result`, updated.

    Example:
        ```py
        >>> result = rescore_sweep(json.loads(Path("results/formal/sweep.json").read_text()))
        >>> result["reliability"]["wrong_way_fraction"]
        ```
    """
    if result.get("metric") not in METRICS:
        raise ValueError(f"metric={result.get('metric')!r} is not one of {sorted(METRICS)}.")
    result["alphas"] = alphas = [float(a) for a in result["alphas"]]
    answers = result.get("answers") or {}
    missing = [a for a in alphas if not isinstance(answers.get(str(a)), list)]
    if missing or len(set(alphas)) != len(alphas) or len(result.get("rows", ())) != len(alphas):
        raise ValueError(f"a sweep needs one row and one list of answers per alpha, each alpha once; alphas {alphas}, "
                         f"{len(result.get('rows', ()))} rows, answers missing at {missing}.")
    n = len(answers[str(alphas[0])])
    if any(len(answers[str(a)]) != n for a in alphas):
        raise ValueError(f"the sweep stores {[len(answers[str(a)]) for a in alphas]} answers at alphas {alphas}; "
                         "expected the same number at each.")
    old = result.get("reliability") or {}
    per_prompt = old.get("per_prompt") or []
    prompts = [p["prompt"] for p in per_prompt] if per_prompt and all("prompt" in p for p in per_prompt) else None
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"the sweep stores {n} answers per alpha but {len(prompts)} prompts.")
    core = tuple((result.get("spearman_rho_core") or {}).get("range", (-0.5, 1.5)))
    return _score_metric(result, prompts, old.get("direction"), core)


def write_sweep(result: dict, out: Union[str, Path], reference: Optional[dict] = None, title: str = "") -> None:
    """sweep.json, sweep.csv and sweep.png, written together (`write_outputs`)."""
    write_outputs(out, {
        "sweep.json": _json_writer(result),
        "sweep.csv": _csv_writer(result["rows"]),
        "sweep.png": lambda path: plot_sweep(result, path, reference, title),
    })


def sweep(
    model,
    tokenizer,
    alphas: Sequence[float],
    prompts: Sequence,
    out: Union[str, Path],
    metric: str = "words",
    pairs: Sequence[dict] = (),
    beta: float = 0.1,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    reference: Optional[dict] = None,
    title: str = "",
) -> dict:
    """Generate at each alpha, score with `metric`, fluency (degeneration, distinct-2, the answers' NLL under the
    base model), per-prompt reliability and (given pairs) held-out preference metrics; write sweep.json, sweep.csv
    and sweep.png to `out`; return the result (`score_sweep`).

    Example:
        ```py
        >>> result = sweep(model, tokenizer, [0, 0.5, 1, 1.5], prompts, "out", metric="words")
        >>> result["spearman_rho"], result["usable"]["range"], result["reliability"]["wrong_way_fraction"]
        ```
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    alphas = [float(a) for a in alphas]
    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, alphas, max_new_tokens, batch_size)
    gen_s = time.perf_counter() - t0
    nll = {j: answer_nll(model, tokenizer, prompts, answers[j]) for j in range(len(alphas))}
    preference = None
    if pairs:  # log-probs at 0 (the reference) and at every alpha, in as few passes as the mode allows
        chosen_lp, rejected_lp = preference_logprobs_at(model, tokenizer, pairs, [0.0, *alphas], batch_size=8)
        preference = {
            j: metrics_from_logprobs((chosen_lp[j + 1], rejected_lp[j + 1]), (chosen_lp[0], rejected_lp[0]), beta)
            for j in range(len(alphas))
        }
    extra = {
        "interpolation": model.base_model.clm_layer().interpolation,
        "knob": "alpha",
        "label": "CLM",
        "max_new_tokens": max_new_tokens,
        "generation_seconds": gen_s,
    }
    result = score_sweep(alphas, prompts, answers, metric, nll, preference, extra=extra)
    result["total_seconds"] = time.perf_counter() - t0
    write_sweep(result, out, reference, title)
    return result


def knob_sweep(
    model,
    tokenizer,
    knob: Callable[[float], AbstractContextManager],
    values: Sequence[float],
    prompts: Sequence,
    out: Union[str, Path],
    metric: str = "words",
    pairs: Sequence[dict] = (),
    beta: float = 0.1,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    label: str = "knob",
    knob_name: str = "scale",
    title: str = "",
) -> dict:
    """The same sweep for a knob that is not CLM's alpha: `knob(value)` is a context manager under which the plain
    (or LoRA) model answers at that value (a LoRA scale, a steering multiplier); outside it the model must be the
    base model again, which the base-model NLL relies on (a LoRA model is also scored with its adapter disabled).
    Implicit rewards compare each value with value 0, as CLM's compare each alpha with alpha 0.

    Example:
        ```py
        >>> knob_sweep(model, tok, lambda m: vector.apply(model, multiplier=m), [0, 1, 2], prompts, "out")
        ```
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    values = [float(v) for v in values]
    if 0.0 not in values:
        raise ValueError(f"the values of a knob sweep must include 0 (the base model), got {values}.")
    t0 = time.perf_counter()
    answers, logprobs = {}, {}
    for j, v in enumerate(values):
        with knob(v):
            answers[j] = generate_answers(model, tokenizer, prompts, [None], max_new_tokens, batch_size)[0]
            if pairs:
                logprobs[j] = preference_logprobs_at(model, tokenizer, pairs, [None], batch_size=8)
    gen_s = time.perf_counter() - t0
    nll = {j: answer_nll(model, tokenizer, prompts, answers[j]) for j in range(len(values))}
    preference = None
    if pairs:
        z = values.index(0.0)
        ref = (logprobs[z][0][0], logprobs[z][1][0])
        preference = {j: metrics_from_logprobs((lp[0][0], lp[1][0]), ref, beta) for j, lp in logprobs.items()}
    extra = {"interpolation": label, "knob": knob_name, "label": label, "max_new_tokens": max_new_tokens,
             "generation_seconds": gen_s}
    result = score_sweep(values, prompts, answers, metric, nll, preference, extra=extra)
    result["total_seconds"] = time.perf_counter() - t0
    write_sweep(result, out, None, title)
    return result


def format_table(result: dict) -> str:
    metric = result["metric"]
    keys = list(result["rows"][0])
    lines = ["  ".join(f"{k:>16}" for k in keys)]
    for r in result["rows"]:
        lines.append("  ".join(f"{r[k]:>16.4f}" if isinstance(r[k], float) else f"{r[k]:>16}" for k in keys))
    lines.append(f"Spearman rho(alpha, {metric}) = {result['spearman_rho']:.3f}; monotone: {result['monotone']}")
    core = result.get("spearman_rho_core")
    if core:
        lines.append(f"Spearman rho over alpha in {core['range']} = {core['rho']:.3f}")
    if result.get("spearman_rho_margin") is not None:
        lines.append(f"Spearman rho(alpha, held-out reward margin) = {result['spearman_rho_margin']:.3f}")
    usable = result.get("usable")
    if usable:
        lines.append(f"usable range (degeneration at most {usable['tolerance']:.0%} above alpha 0's "
                     f"{usable['base_rate']:.0%}): {usable['range']}; degenerate at {usable['degenerate_alphas']}")
    rel = result.get("reliability")
    if rel:
        q = rel["rho_quantiles"]
        if rel["wrong_way_fraction"] is not None:
            lines.append(f"per prompt, alpha 0 -> 1: {rel['wrong_way_fraction']:.1%} move the wrong way, "
                         f"{rel['unmoved_fraction']:.1%} do not move, "
                         f"{rel['aligned_way_fraction']:.1%} the aligned way")
        lines.append(f"per-prompt Spearman rho: min {q['min']:.2f}, p10 {q['p10']:.2f}, median {q['median']:.2f}, "
                     f"p90 {q['p90']:.2f}, max {q['max']:.2f}; aligned sign {rel['rho_aligned_sign_fraction']:.0%}")
    return "\n".join(lines)


def pareto_front(rows: list[dict], keys: Sequence[str]) -> list[int]:
    """Indices of the rows no other row beats on every key (lower is better, as for every metric in METRICS)."""
    front = []
    for i, r in enumerate(rows):
        dominated = any(
            all(o[k] <= r[k] for k in keys) and any(o[k] < r[k] for k in keys) for j, o in enumerate(rows) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def target_distances(rows: list[dict], targets: dict, scale_rows: Optional[list[dict]] = None) -> list[float]:
    """Each row's distance to {metric: value} targets: the sum over metrics of the gap in units of that metric's
    spread over `scale_rows` (default: the rows), so words and casualness weigh alike."""
    scale_rows = scale_rows or rows
    spread = {
        m: (max(r[f"{m}_mean"] for r in scale_rows) - min(r[f"{m}_mean"] for r in scale_rows)) or 1.0 for m in targets
    }
    return [sum(abs(r[f"{m}_mean"] - t) / spread[m] for m, t in targets.items()) for r in rows]


def plot_grid(rows: list[dict], knobs: Sequence[str], metrics: Sequence[str], path: Path, title: str = "") -> None:
    """Heat maps of each metric over the first two knobs (one row of maps per value of a third knob)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a_name, b_name = knobs[0], knobs[1]
    a_vals = sorted({r[f"alpha_{a_name}"] for r in rows})
    b_vals = sorted({r[f"alpha_{b_name}"] for r in rows})
    c_vals = sorted({r[f"alpha_{knobs[2]}"] for r in rows}) if len(knobs) > 2 else [None]
    fig, axes = plt.subplots(len(c_vals), len(metrics), figsize=(4.6 * len(metrics), 3.8 * len(c_vals)), squeeze=False)
    for ci, c in enumerate(c_vals):
        for mi, metric in enumerate(metrics):
            ax = axes[ci][mi]
            grid = [[float("nan")] * len(a_vals) for _ in b_vals]
            for r in rows:
                if c is None or r[f"alpha_{knobs[2]}"] == c:
                    grid[b_vals.index(r[f"alpha_{b_name}"])][a_vals.index(r[f"alpha_{a_name}"])] = r[f"{metric}_mean"]
            im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
            for bi in range(len(b_vals)):
                for ai in range(len(a_vals)):
                    ax.text(ai, bi, f"{grid[bi][ai]:.1f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xticks(range(len(a_vals)), [f"{v:g}" for v in a_vals])
            ax.set_yticks(range(len(b_vals)), [f"{v:g}" for v in b_vals])
            ax.set_xlabel(f"alpha {a_name}")
            ax.set_ylabel(f"alpha {b_name}")
            ax.set_title(f"{metric}" + (f" ({knobs[2]} = {c:g})" if c is not None else ""))
            fig.colorbar(im, ax=ax)
    _save_figure(fig, path, title)


def _check_grid(knobs: dict, metrics: dict, targets: Optional[dict]) -> list[str]:
    names = list(knobs)
    if len(names) < 2:
        raise ValueError(f"a grid needs two or more knobs, got {names}; use sweep() for one.")
    if set(metrics) != set(names):
        raise ValueError(f"give one metric per knob: knobs {names}, metrics for {sorted(metrics)}.")
    for n, m in metrics.items():
        if m not in METRICS:
            raise ValueError(f"metric {m!r} (knob {n!r}) is not one of {sorted(METRICS)}.")
    metric_names = list(dict.fromkeys(metrics[n] for n in names))
    for m in targets or {}:
        if m not in metric_names:
            raise ValueError(f"target for {m!r}, which is not a metric of this grid ({metric_names}).")
    return names


def _grid_points(knobs: dict) -> list[dict]:
    names = list(knobs)
    return [dict(zip(names, map(float, values))) for values in itertools.product(*(knobs[n] for n in names))]


def _write_grid(
    points: list[dict],
    answers: dict,
    knobs: dict,
    metrics: dict,
    out: Union[str, Path],
    targets: Optional[dict],
    extra: dict,
    title: str,
) -> dict:
    """Score every grid point with every metric; write grid.json, grid.csv and grid.png; return the result."""
    names = list(knobs)
    metric_names = list(dict.fromkeys(metrics[n] for n in names))
    rows = []
    for j, point in enumerate(points):
        row = {f"alpha_{n}": a for n, a in point.items()}
        for m in metric_names:
            values = [METRICS[m](ans) for ans in answers[j]]
            row[f"{m}_mean"] = sum(values) / len(values)
        rows.append(row)
    keys = [f"{m}_mean" for m in metric_names]
    result = {
        "knobs": {n: [float(a) for a in knobs[n]] for n in names},
        "metrics": dict(metrics),
        **extra,
        "rows": rows,
        # does each knob move its own metric (and leave the others alone)? rank correlation over the whole grid
        "spearman_rho": {
            n: {m: spearman([r[f"alpha_{n}"] for r in rows], [r[f"{m}_mean"] for r in rows]) for m in metric_names}
            for n in names
        },
        "pareto_front": pareto_front(rows, keys),
        "n_prompts": len(answers[0]),
        "examples": {json.dumps(p): answers[j][:2] for j, p in enumerate(points)},
    }
    if targets:
        dist = target_distances(rows, targets)
        result["targets"] = dict(targets)
        result["best"] = min(range(len(rows)), key=dist.__getitem__)
    write_outputs(out, {
        "grid.json": _json_writer(result),
        "grid.csv": _csv_writer(rows),
        "grid.png": lambda path: plot_grid(rows, names, metric_names, path, title),
    })
    return result


def grid_sweep(
    model,
    tokenizer,
    knobs: dict,
    metrics: dict,
    prompts: Sequence,
    out: Union[str, Path],
    targets: Optional[dict] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    title: str = "",
) -> dict:
    """Several CLM adapters, one knob each: generate at every point of the grid of their alphas, score every
    dimension's metric, write grid.json, grid.csv and grid.png (heat maps); return the result.

    `knobs` maps each active adapter to its alphas; `metrics` maps it to the name of its dimension's metric.
    `targets` ({metric: value}) picks the grid point nearest to them (distance in units of each metric's spread
    over the grid) as `best`; the Pareto front (lower is more aligned for every metric) is reported either way.
    In hidden and logits modes the whole grid shares batches, each row with its own alphas.

    Example:
        ```py
        >>> model.base_model.set_adapter(["concise", "formal"])
        >>> r = grid_sweep(model, tok, {"concise": [0, 1], "formal": [0, 1]},
        ...                {"concise": "words", "formal": "casualness"}, prompts, "out")
        >>> r["rows"][r["pareto_front"][0]]
        ```
    """
    names = _check_grid(knobs, metrics, targets)
    active = set(model.base_model.active_adapters)
    missing = [n for n in names if n not in active]
    if missing:
        raise ValueError(f"knobs {missing} are not active adapters; active: {sorted(active)}.")
    points = _grid_points(knobs)
    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, points, max_new_tokens, batch_size)
    extra = {
        "interpolation": model.base_model.clm_layer().interpolation,
        "generation_seconds": time.perf_counter() - t0,
    }
    return _write_grid(points, answers, knobs, metrics, out, targets, extra, title)


def vector_grid_sweep(
    model,
    tokenizer,
    vectors: dict,
    knobs: dict,
    metrics: dict,
    prompts: Sequence,
    out: Union[str, Path],
    targets: Optional[dict] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    title: str = "",
) -> dict:
    """The same grid for alignment vectors of full checkpoints: at each point, `theta + sum_i s_i * vector_i` is
    applied to the loaded model in place, the prompts are answered, and the model is restored bit for bit.

    `vectors` maps each knob to a vector file (`peft_clm.tools.vectors.extract`); `knobs` maps it to its scales.

    Example:
        ```py
        >>> r = vector_grid_sweep(model, tok, {"concise": "c.safetensors", "formal": "f.safetensors"},
        ...                       {"concise": [0, 1], "formal": [0, 1]},
        ...                       {"concise": "words", "formal": "casualness"}, prompts, "out")
        ```
    """
    from .vectors import applied

    names = _check_grid(knobs, metrics, targets)
    if set(vectors) != set(names):
        raise ValueError(f"give one vector per knob: knobs {names}, vectors for {sorted(vectors)}.")
    points = _grid_points(knobs)
    t0 = time.perf_counter()
    answers = {}
    for j, point in enumerate(points):
        with applied(model, [(vectors[n], s) for n, s in point.items() if s != 0.0]):
            answers[j] = generate_answers(model, tokenizer, prompts, [None], max_new_tokens, batch_size)[0]
    extra = {
        "interpolation": "vectors",
        "vectors": {n: str(v) for n, v in vectors.items()},
        "generation_seconds": time.perf_counter() - t0,
    }
    return _write_grid(points, answers, knobs, metrics, out, targets, extra, title)


def format_grid(result: dict) -> str:
    keys = list(result["rows"][0])
    front = set(result["pareto_front"])
    lines = ["  ".join(f"{k:>16}" for k in keys) + "  pareto"]
    for i, r in enumerate(result["rows"]):
        mark = ("  *" if i in front else "   ") + ("  <- best for the targets" if result.get("best") == i else "")
        lines.append("  ".join(f"{r[k]:>16.4f}" for k in keys) + mark)
    for n, rhos in result["spearman_rho"].items():
        lines.append(f"Spearman rho(alpha_{n}, ·): " + ", ".join(f"{m} {v:.3f}" for m, v in rhos.items()))
    return "\n".join(lines)
