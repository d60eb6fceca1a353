"""Calibrating the knob: the alpha that gives a target value of a metric ("answers of about 25 words") on a set of
prompts, within the range where the answers stay fluent.

How: a coarse sweep (default alphas -1, -0.5, 0, 0.5, 1, 1.5, 2) measures the metric's mean and the degeneration
rate at each alpha; the usable range is the stretch of the grid around alpha 0 whose degeneration stays within 5
points of alpha 0's (`peft_clm.tools.sweep.usable_range`). The target is refused when no usable alpha reaches it
(saying whether it lies beyond what the knob reaches at all, or is reached only where the answers degenerate).
Otherwise the adjacent pair of usable grid alphas whose means bracket the target (the pair nearest alpha 0 if
several do) is narrowed by interpolation (false position, each new alpha kept inside the middle 80% of the bracket
so a flat stretch cannot stall it) for at most `max_steps` measurements, or until the mean is within `tolerance` of
the target (a fraction of its size, and never more than that fraction of the metric's usable span, so a target near
the metric's zero is refined as finely as its size asks, and a target of 0 stops early only when met exactly); the
measured alpha nearest the target is returned.

What it assumes: the mean metric moves monotonically with alpha between adjacent grid alphas (so a bracket holds a
crossing; greedy answers make it a step function, which interpolation handles), and the prompts given stand for the
prompts it will be used on (`scripts/validate_calibration.py` checks that on prompts not used to calibrate).

How far a calibrated alpha can carry: each measurement keeps the spread of the metric over the prompts (`sd`), and
`transfer_chance` turns it into the chance that another set of prompts lands within a tolerance of the target at
that alpha even if the knob acts on it exactly as on these (the two means then differ only by which prompts were
drawn). A target whose tolerance is small against that spread (10% of a target near the metric's zero) cannot be
met reliably by any knob; the chance says so before anything is measured on the other prompts.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

from .generation import generate_answers
from .sweep import usable_range
from .text_metrics import METRICS, is_degenerate


DEFAULT_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


class CalibrationError(ValueError):
    """The target cannot be reached by the knob within its usable range; the message says why."""


@dataclass
class Calibration:
    """What `calibrate` found: `alpha` gives `value` (the metric's mean on the prompts) for `target`."""

    metric: str
    target: float
    alpha: float
    value: float
    degenerate_rate: float
    usable_range: list[float]
    reachable: list[float]  # the metric's means at the usable grid alphas: [lowest, highest]
    probes: list[dict] = field(default_factory=list)  # every alpha measured: alpha, value, degenerate_rate, sd
    n_prompts: int = 0
    sd: float = float("nan")  # the metric's standard deviation over the prompts at `alpha` (NaN: one prompt)

    @property
    def standard_error(self) -> float:
        """The standard error of `value` as a mean over `n_prompts` prompts."""
        return self.sd / math.sqrt(self.n_prompts) if self.n_prompts else float("nan")

    def to_dict(self) -> dict:
        """The fields, and `standard_error` (a property, so not an argument of the constructor); a spread that one
        prompt cannot give is None (JSON has no NaN)."""
        out = {**asdict(self), "standard_error": self.standard_error}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}

    def summary(self) -> str:
        return (
            f"alpha {self.alpha:.4g} gives {self.metric} {self.value:.4g} (target {self.target:g}; "
            f"{self.n_prompts} prompts, standard error {self.standard_error:.2g}, degeneration "
            f"{self.degenerate_rate:.0%})\n"
            f"usable range: alpha in [{self.usable_range[0]:g}, {self.usable_range[1]:g}], where {self.metric} "
            f"spans [{self.reachable[0]:.4g}, {self.reachable[1]:.4g}]"
        )


def measure(model, tokenizer, prompts: Sequence, alphas: Sequence[float], metric: str, max_new_tokens: int = 48,
            batch_size: int = 32, cache: Optional[dict] = None) -> dict:
    """{alpha: {"value": the metric's mean, "degenerate_rate": ..., "sd": the metric's standard deviation over the
    prompts (NaN for one prompt)}} at each alpha, generating only the alphas not in `cache` (which is updated; share
    one cache across calls on the same prompts and settings).

    Example:
        ```py
        >>> measure(model, tokenizer, prompts, [0.0, 1.0], "words")[1.0]["value"]
        ```
    """
    cache = {} if cache is None else cache
    todo = [float(a) for a in dict.fromkeys(alphas) if float(a) not in cache]
    if todo:
        answers = generate_answers(model, tokenizer, prompts, todo, max_new_tokens, batch_size, progress=False)
        for j, a in enumerate(todo):
            cache[a] = summarize(answers[j], metric)
    return {float(a): cache[float(a)] for a in alphas}


def summarize(answers: Sequence[str], metric: str) -> dict:
    """One measurement of `answers` (one alpha's, one per prompt): the metric's mean and standard deviation over
    them (NaN for a single answer: one prompt says nothing of the spread), and the fraction that degenerate; as
    `measure` keeps it.

    Example:
        ```py
        >>> summarize(["one two", "one two three four"], "words")
        {'value': 3.0, 'degenerate_rate': 0.0, 'sd': 1.4142135623730951}
        ```
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    if not answers:
        raise ValueError("answers must hold at least one answer; got none.")
    values = [METRICS[metric](x) for x in answers]
    return {
        "value": sum(values) / len(values),
        "degenerate_rate": sum(map(is_degenerate, answers)) / len(answers),
        "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def transfer_chance(target: float, sd: float, n_calibrated: int, n_new: int, tolerance: float = 0.10,
                    value: Optional[float] = None) -> float:
    """The chance that the metric's mean over `n_new` other prompts lands within `tolerance` * |target| of `target`
    at an alpha calibrated on `n_calibrated` prompts, where it gave `value` (default: the target itself), if the knob
    acts on the new prompts exactly as on those: the new mean then differs from `value` only by which prompts were
    drawn, normally with standard deviation sd * sqrt(1/n_calibrated + 1/n_new) (`sd`: the metric's spread over the
    calibrating prompts at that alpha). Near 1, the check can be met; well below 1, even an exact knob misses it by
    the draw of prompts alone.

    Example:
        ```py
        >>> round(transfer_chance(25.0, 5.0, 54, 54), 3)   # words: 10% of 25 against a spread of 5
        0.991
        >>> round(transfer_chance(0.5, 3.0, 54, 54), 3)    # a target near the metric's zero
        0.069
        ```
    """
    for name, n in (("n_calibrated", n_calibrated), ("n_new", n_new)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive integer (a number of prompts), got {n!r}.")
    if not _real(target):
        raise ValueError(f"target must be a finite number, got {target!r}.")
    if not (_real(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite standard deviation >= 0, got {sd!r} (one prompt gives none).")
    if not (_real(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite fraction > 0 of the target, got {tolerance!r}.")
    value = target if value is None else value
    if not _real(value):
        raise ValueError(f"value must be a finite number, got {value!r}.")
    half_width = tolerance * abs(target)
    spread = sd * math.sqrt(1 / n_calibrated + 1 / n_new)
    if spread == 0:  # every prompt alike: the new mean is `value`
        return 1.0 if abs(value - target) <= half_width else 0.0

    def below(x: float) -> float:  # P(new mean <= x)
        return 0.5 * (1 + math.erf((x - value) / (spread * math.sqrt(2))))

    return below(target + half_width) - below(target - half_width)


def _check(metric: str, target: float, alphas: Sequence[float], tolerance: float, max_steps: int,
           margin: float) -> list[float]:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}.")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}.")
    grid = sorted({float(a) for a in alphas} | {0.0})
    if len(grid) < 2 or not all(math.isfinite(a) for a in grid):
        raise ValueError(f"the coarse alphas must be finite and hold at least one besides 0, got {list(alphas)}.")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"tolerance must be a fraction of the target in (0, 1), got {tolerance!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}.")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"the degeneration margin must be in [0, 1), got {margin!r}.")
    return grid


def _between(t: float, x: float, y: float) -> bool:
    return min(x, y) <= t <= max(x, y)


def calibrate(
    model,
    tokenizer,
    prompts: Sequence,
    metric: str,
    target: float,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tolerance: float = 0.02,
    max_steps: int = 5,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    degeneration_margin: float = 0.05,
    cache: Optional[dict] = None,
) -> Calibration:
    """The alpha at which the mean of `metric` over `prompts` is `target`, searched inside the usable range (see
    the module's docstring for the method and what it assumes). Raises `CalibrationError` (a ValueError) when the
    target lies outside what the knob reaches, or is reached only where the answers degenerate.

    `cache` ({alpha: measurement}, see `measure`) lets several targets on the same prompts share generations.

    Example:
        ```py
        >>> c = calibrate(model, tokenizer, prompts, "words", 25.0)
        >>> c.alpha, c.value, c.usable_range
        (0.62, 25.4, [-0.5, 1.5])
        ```
    """
    grid = _check(metric, target, alphas, tolerance, max_steps, degeneration_margin)
    cache = {} if cache is None else cache
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "cache": cache}
    coarse = measure(model, tokenizer, prompts, grid, metric, **kw)
    usable = usable_range(grid, [coarse[a]["degenerate_rate"] for a in grid], degeneration_margin)
    lo, hi = usable["range"]
    inside = [a for a in grid if lo <= a <= hi]
    values = [coarse[a]["value"] for a in inside]
    reach = [min(values), max(values)]
    limit = coarse[0.0]["degenerate_rate"] + degeneration_margin
    if not reach[0] <= target <= reach[1]:
        beyond = [a for a in grid if a not in inside]
        # does a degenerate alpha reach it (the mean crosses the target between the usable edge and it)?
        edge = {a: coarse[hi if a > hi else lo]["value"] for a in beyond}
        degenerate_reach = [a for a in beyond if _between(target, coarse[a]["value"], edge[a])]
        where = (f"{metric} spans [{reach[0]:.4g}, {reach[1]:.4g}] over the usable alphas [{lo:g}, {hi:g}] "
                 f"(degeneration at most {limit:.0%})")
        if degenerate_reach:
            rates = ", ".join(f"alpha {a:g}: {coarse[a]['degenerate_rate']:.0%}" for a in degenerate_reach)
            raise CalibrationError(
                f"target {metric}={target:g} is reached only where the knob degenerates ({rates} of answers "
                f"degenerate); {where}."
            )
        raise CalibrationError(f"target {metric}={target:g} lies outside what the knob reaches: {where}; the "
                               f"coarse alphas {grid} never give it.")
    span = (reach[1] - reach[0]) or 1.0
    close = tolerance * min(span, abs(target))  # near enough to stop early
    brackets = [(a, b) for a, b in zip(inside, inside[1:]) if _between(target, coarse[a]["value"], coarse[b]["value"])]
    a, b = min(brackets, key=lambda ab: abs(ab[0] + ab[1]))  # the crossing nearest alpha 0
    for _ in range(max_steps):
        va, vb = cache[a]["value"], cache[b]["value"]
        if min(abs(va - target), abs(vb - target)) <= close:
            break
        t = 0.5 if va == vb else (target - va) / (vb - va)
        mid = round(a + (b - a) * min(0.9, max(0.1, t)), 4)
        if mid in (a, b):
            break
        vm = measure(model, tokenizer, prompts, [mid], metric, **kw)[mid]["value"]
        if (vm - target) * (va - target) <= 0:
            b = mid
        else:
            a = mid
    probes = [{"alpha": x, **cache[x]} for x in sorted(cache)]
    candidates = [p for p in probes if lo <= p["alpha"] <= hi and p["degenerate_rate"] <= limit + 1e-12]
    best = min(candidates, key=lambda p: (abs(p["value"] - target), abs(p["alpha"])))
    return Calibration(
        metric=metric, target=float(target), alpha=best["alpha"], value=best["value"],
        degenerate_rate=best["degenerate_rate"], usable_range=[lo, hi], reachable=reach, sd=best.get("sd", math.nan),
        probes=probes, n_prompts=len(prompts),
    )
