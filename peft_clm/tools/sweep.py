"""The alpha sweep and the grid of several knobs: answer at each alpha, score, write table, CSV, JSON and plots."""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

from .generation import generate_answers
from .preference import metrics_from_logprobs, preference_logprobs_at
from .text_metrics import METRICS


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


def plot_sweep(rows: list[dict], metric: str, path: Path, base_value: float,
               reference: Optional[dict] = None, title: str = "") -> None:
    """Metric and held-out reward accuracy against alpha, with the base (and a full-DPO reference) as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, axes = plt.subplots(1, 2 if "reward_accuracy" in rows[0] else 1, figsize=(10, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(alphas, [r[f"{metric}_mean"] for r in rows], "o-", label="CLM")
    ax.axhline(base_value, color="gray", ls="--", label="base model")
    if reference and reference.get(f"{metric}_mean") is not None:
        ax.axhline(reference[f"{metric}_mean"], color="tab:red", ls=":", label=reference.get("label", "full DPO"))
    ax.axvline(1.0, color="k", lw=0.5, alpha=0.3)
    ax.set_xlabel("alpha")
    ax.set_ylabel(f"{metric} (mean over prompts)")
    ax.legend()
    if "reward_accuracy" in rows[0]:
        ax2 = axes[0][1]
        ax2.plot(alphas, [r["reward_accuracy"] for r in rows], "s-", color="tab:green", label="CLM")
        if reference and reference.get("reward_accuracy") is not None:
            label = reference.get("label", "full DPO")
            ax2.axhline(reference["reward_accuracy"], color="tab:red", ls=":", label=label)
        ax2.axhline(0.5, color="gray", ls="--", label="chance")
        ax2.set_xlabel("alpha")
        ax2.set_ylabel("held-out reward accuracy")
        ax2.legend()
    _save_figure(fig, path, title)


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
    """Generate at each alpha, score with `metric` and (given pairs) held-out preference metrics; write
    sweep.json, sweep.csv and sweep.png to `out`; return the result.

    Example:
        ```py
        >>> result = sweep(model, tokenizer, [0, 0.5, 1, 1.5], prompts, "out", metric="words")
        >>> result["spearman_rho"]
        ```
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    alphas = [float(a) for a in alphas]
    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, alphas, max_new_tokens, batch_size)
    gen_s = time.perf_counter() - t0
    score = METRICS[metric]
    if pairs:  # log-probs at 0 (the reference) and at every alpha, in as few passes as the mode allows
        chosen_lp, rejected_lp = preference_logprobs_at(model, tokenizer, pairs, [0.0, *alphas], batch_size=8)
    rows = []
    for j, a in enumerate(alphas):
        values = [score(ans) for ans in answers[j]]
        row = {"alpha": a, f"{metric}_mean": sum(values) / len(values), "n_prompts": len(values)}
        if pairs:
            pm = metrics_from_logprobs((chosen_lp[j + 1], rejected_lp[j + 1]), (chosen_lp[0], rejected_lp[0]), beta)
            row.update(reward_accuracy=pm["reward_accuracy"], mean_margin=pm["mean_margin"], dpo_loss=pm["dpo_loss"])
        rows.append(row)
    means = [r[f"{metric}_mean"] for r in rows]
    base_value = means[alphas.index(0.0)] if 0.0 in alphas else None
    result = {
        "metric": metric,
        "alphas": alphas,
        "rows": rows,
        "spearman_rho": spearman(alphas, means),
        # the held-out implicit reward margin: the preference signal itself, before decoding turns it into text
        "spearman_rho_margin": spearman(alphas, [r["mean_margin"] for r in rows]) if pairs else None,
        "monotone": all(b >= a for a, b in zip(means, means[1:])) or all(b <= a for a, b in zip(means, means[1:])),
        "interpolation": model.base_model.clm_layer().interpolation,
        "generation_seconds": gen_s,
        "total_seconds": time.perf_counter() - t0,
        "examples": {str(a): answers[j][:3] for j, a in enumerate(alphas)},
    }
    base = base_value if base_value is not None else means[0]
    write_outputs(out, {
        "sweep.json": _json_writer(result),
        "sweep.csv": _csv_writer(rows),
        "sweep.png": lambda path: plot_sweep(rows, metric, path, base, reference, title),
    })
    return result


def format_table(result: dict) -> str:
    metric = result["metric"]
    keys = list(result["rows"][0])
    lines = ["  ".join(f"{k:>16}" for k in keys)]
    for r in result["rows"]:
        lines.append("  ".join(f"{r[k]:>16.4f}" if isinstance(r[k], float) else f"{r[k]:>16}" for k in keys))
    lines.append(f"Spearman rho(alpha, {metric}) = {result['spearman_rho']:.3f}; monotone: {result['monotone']}")
    if result.get("spearman_rho_margin") is not None:
        lines.append(f"Spearman rho(alpha, held-out reward margin) = {result['spearman_rho_margin']:.3f}")
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
