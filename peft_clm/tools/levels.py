"""Level scoring without a judge: which of three reference answers (avoid / generic / expert) a model prefers.

For a question with three reference answers, the model's level at a knob setting is the reference with the highest
mean per-token log-likelihood given the bare prompt (chat template, no system message, no prefill). Anyone can
audit it: the references are stored text, the score is one forward pass per reference.

- `level_scores(model, tokenizer, rows, points)`: [points, questions, 3] mean per-token log-likelihoods. A point is
  a number (one active adapter), a dict {adapter: alpha} (several; adapters left out keep their current alpha, as
  in a forward call or `generate`), or None (the model as it is: a plain model, or
  a checkpoint with an alignment vector applied). In logits mode the logits at any point are
  `base + sum_i a_i (aligned_i - base)`, so k + 1 passes (the base and each adapter alone at 1) serve every point
  of any grid; other modes run one pass per point.
- `levels_from_scores`, `level_accuracy`, `mean_level`: the argmax level, the share of questions at a target
  level, and the mean level (-1 avoid, 0 generic, +1 expert) that leakage is measured on.
- `knob_leakage` and `pick_alpha`: from one knob's 1-D sweep, how much it moves the other domains at an alpha, and
  the alpha where it reaches a level (most accurately, or with the least leakage).
- `grid_points`, `combinations` and `search_combinations`: the multi-domain search. For each combination of target
  levels (3 domains x 3 levels = 27), the grid point whose worst regulated-domain accuracy is highest.
  `additive_scores` predicts a large grid from the 1-D sweeps alone, to choose which of its points to score.
  `dial_alphas` reads a point of signed dials as the alphas of two one-ended knobs per domain (avoid, expert).
  `routed_combinations` is the same count when each question gets the point of its route (`tools.router`).
- `level_pair`, `ordinal_pairs`, `target_pairs`, `anchor_pairs`: DPO pairs built from the three references of each
  row, for a knob that walks one domain's levels in order and leaves other rows where the base puts them;
  `end_pairs` and `held_pairs` do the same with each pair scored at the knob's end it is for (alpha +1 or -1,
  `tools.alpha_pairs`).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch

from .preference import _pair_ids


LEVELS = ("avoid", "generic", "expert")
Point = Union[None, float, Mapping[str, float]]


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise ValueError("no rows to score; give rows with a 'prompt' and the answers 'avoid', 'generic', 'expert'.")
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", *LEVELS) if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}; each row needs 'prompt', 'avoid', 'generic' and 'expert'.")
        empty = [k for k in LEVELS if not isinstance(row[k], str) or not row[k].strip()]
        if empty:
            raise ValueError(f"row {i}: the reference answer(s) {empty} are empty or not text.")


def _clm_layer(model):
    base = getattr(model, "base_model", None)
    return base.clm_layer() if base is not None and hasattr(base, "clm_layer") else None


def _check_points(model, points: Sequence[Point]) -> tuple[Optional[list[str]], list[Optional[dict]]]:
    """The active adapters (None for a plain model) and each point as a dict {adapter: alpha} (None: as loaded)."""
    if not points:
        raise ValueError("no points to score; give at least one alpha (a number, a dict by adapter, or None).")
    layer = _clm_layer(model)
    if layer is None:
        if any(p is not None for p in points):
            raise ValueError("alphas need a CLM model; a plain model (or one with a vector applied) takes [None].")
        return None, [None] * len(points)
    names = list(layer.active_adapters)
    out: list[Optional[dict]] = []
    for p in points:
        if p is None:
            out.append(None)
            continue
        if isinstance(p, Mapping):
            unknown = [k for k in p if k not in names]
            if unknown:
                raise ValueError(f"point {dict(p)} names adapter(s) {unknown} that are not active; active: {names}.")
            # as in a forward call (`alpha.resolve_alpha`): adapters left out keep their current alpha
            per_sequence = [n for n in names if n not in p and isinstance(layer.alpha[n], torch.Tensor)]
            if per_sequence:
                raise ValueError(
                    f"point {dict(p)} leaves out {per_sequence}, whose current alpha is one per sequence (set_alpha "
                    f"with a list); a point scores every question at one alpha: name every active adapter {names}."
                )
            point = {n: float(p[n]) if n in p else float(layer.alpha[n]) for n in names}
        elif isinstance(p, (int, float)) and not isinstance(p, bool):
            if len(names) != 1:
                raise ValueError(f"a bare number needs one active adapter; {names} are active, give a dict.")
            point = {names[0]: float(p)}
        else:
            raise ValueError(f"a point is a number, a dict {{adapter: alpha}} or None; got {p!r}.")
        bad = [k for k, v in point.items() if v != v or abs(v) == float("inf")]
        if bad:
            raise ValueError(f"point {point}: alpha of {bad} is not a finite number.")
        out.append(point)
    return names, out


def _reference_batches(tokenizer, rows, batch_size: int, max_length: int, device):
    """Right-padded batches of (prompt, reference) sequences, three per row in LEVELS order, with the positions of
    each sequence's answer tokens (the end-of-sequence token included)."""
    seqs = [_pair_ids(tokenizer, r["prompt"], r[level], max_length) for r in rows for level in LEVELS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(seqs), batch_size):
        items = seqs[start : start + batch_size]
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for i, (seq, n_answer) in enumerate(items):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            target[i, len(seq) - n_answer : len(seq)] = True
        yield ids.to(device), mask.to(device), target.to(device)


def _answer_logits(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor):
    """The logits that predict each answer token ([T, V], float32), the tokens ([T]) and their sequence ([T])."""
    predicts = target[:, 1:]  # position t predicts token t + 1
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(predicts)
    return logits[:, :-1][predicts].float(), ids[:, 1:][predicts], rows[predicts]


def _mean_per_sequence(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    token_lp = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add_(0, seq, token_lp)
    counts = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add_(0, seq, torch.ones_like(token_lp))
    return (sums / counts).cpu()


@torch.no_grad()
def level_scores(
    model,
    tokenizer,
    rows: Sequence[dict],
    points: Sequence[Point],
    batch_size: int = 8,
    max_length: int = 256,
) -> torch.Tensor:
    """[len(points), len(rows), 3] mean per-token log-likelihood of each row's avoid, generic and expert answer
    given its prompt, at each point.

    In logits mode every point comes from k + 1 passes per batch (the base, and each active adapter alone at 1):
    the model's own mix is `base + sum_i a_i (aligned_i - base)` of the logits, exact up to rounding. Other modes,
    and points of None, run one pass per point.

    Example:
        ```py
        >>> # two active adapters, both named in every point
        >>> s = level_scores(model, tok, heldout_rows, [{"medical": a, "legal": 0.0} for a in (-2, 0, 2)])
        >>> levels_from_scores(s)      # 0 avoid, 1 generic, 2 expert, per point and question
        ```
    """
    _check_rows(rows)
    names, resolved = _check_points(model, points)
    layer = _clm_layer(model)
    linear = layer is not None and layer.interpolation == "logits" and all(p is not None for p in resolved)
    device = next(model.parameters()).device
    out = torch.empty(len(points), len(rows) * len(LEVELS))
    done = 0
    for ids, mask, target in _reference_batches(tokenizer, rows, batch_size, max_length, device):
        n = ids.shape[0]
        if linear:
            zero = {k: 0.0 for k in names}
            base, labels, seq = _answer_logits(
                model(input_ids=ids, attention_mask=mask, clm_alpha=zero).logits, ids, target
            )
            needed = [k for k in names if any(p[k] != 0.0 for p in resolved)]
            deltas = {}
            for k in needed:
                aligned = model(input_ids=ids, attention_mask=mask, clm_alpha={**zero, k: 1.0}).logits
                deltas[k] = _answer_logits(aligned, ids, target)[0] - base
            for j, point in enumerate(resolved):
                mixed = base.clone()
                for k in needed:
                    if point[k] != 0.0:
                        mixed.add_(deltas[k], alpha=point[k])
                out[j, done : done + n] = _mean_per_sequence(mixed, labels, seq, n)
        else:
            for j, point in enumerate(resolved):
                kwargs = {} if point is None else {"clm_alpha": point}
                logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
                z, labels, seq = _answer_logits(logits, ids, target)
                out[j, done : done + n] = _mean_per_sequence(z, labels, seq, n)
        done += n
    return out.view(len(points), len(rows), len(LEVELS))


def levels_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """The level of each question at each point: index into LEVELS of the highest score (ties: the lower level)."""
    if scores.dim() < 1 or scores.shape[-1] != len(LEVELS):
        raise ValueError(
            f"scores must end in a dimension of {len(LEVELS)} (one per level); got {tuple(scores.shape)}."
        )
    return scores.argmax(-1)


def level_index(level: Union[str, int]) -> int:
    """The index of a level given by name or index."""
    if isinstance(level, str):
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}.")
        return LEVELS.index(level)
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level < len(LEVELS):
        return level
    raise ValueError(f"unknown level {level!r}; expected one of {LEVELS} or 0..{len(LEVELS) - 1}.")


def level_accuracy(scores: torch.Tensor, target: Union[str, int]) -> torch.Tensor:
    """Per point (leading dimensions), the share of questions whose level is `target`."""
    return (levels_from_scores(scores) == level_index(target)).float().mean(-1)


def mean_level(scores: torch.Tensor) -> torch.Tensor:
    """Per point, the mean level over questions with avoid = -1, generic = 0, expert = +1."""
    return (levels_from_scores(scores).float() - 1.0).mean(-1)


def knob_leakage(sweep: Sequence[Mapping], domain: str, alpha: float) -> dict:
    """How much a knob moves the other domains at `alpha`, against its own domain.

    `sweep` is one knob's 1-D sweep: rows {"alpha": a, "levels": {domain: {"mean_level": m, ...}}}, one at alpha 0.
    Returns the own domain's change of mean level from alpha 0 ("own_change"), per other domain its change and
    leakage |change| / |own change| (None when the own domain does not move), and "max", the largest leakage (None
    when any is None).
    """
    by_alpha = {float(r["alpha"]): r["levels"] for r in sweep}
    if 0.0 not in by_alpha or float(alpha) not in by_alpha:
        raise ValueError(f"the sweep needs alpha 0 and alpha {alpha}; it has {sorted(by_alpha)}.")
    base, at = by_alpha[0.0], by_alpha[float(alpha)]
    own = at[domain]["mean_level"] - base[domain]["mean_level"]
    out: dict = {"own_change": own}
    for d in at:
        if d != domain:
            change = at[d]["mean_level"] - base[d]["mean_level"]
            out[d] = {"change": change, "leakage": abs(change) / abs(own) if own else None}
    values = [v["leakage"] for k, v in out.items() if k != "own_change"]
    out["max"] = max(values) if values and all(v is not None for v in values) else None
    return out


def pick_alpha(
    sweep: Sequence[Mapping], domain: str, level: str, sign: float, rule: str = "accuracy", reached: float = 0.8
) -> dict:
    """A knob's alpha for `level` on `domain`: of the sweep's alphas on the side of `sign` (-1 or +1), with rule

    - "accuracy": the highest accuracy at the level (ties: the smallest |alpha|);
    - "specific": of the alphas where the accuracy is at least `reached`, the one of lowest `knob_leakage` (ties:
      the smallest |alpha|), so that the knob moves the other domains least where it does its job; where no alpha
      reaches the level, as "accuracy";
    - "weakest": of those alphas, the smallest |alpha| (what a routed knob needs: it leaks nowhere, and generation
      degrades at strong alphas); where none reaches the level, as "accuracy".

    Returns {"alpha": a, "accuracy": accuracy at a}.

    >>> sweep = [{"alpha": a, "levels": {"med": {"expert": e, "mean_level": e}, "law": {"expert": 0, "mean_level": l}}}
    ...          for a, e, l in [(0, 0, 0), (1, 0.8, 0), (2, 1.0, 0.5)]]
    >>> pick_alpha(sweep, "med", "expert", 1)["alpha"], pick_alpha(sweep, "med", "expert", 1, "specific")["alpha"]
    (2, 1)
    """
    if rule not in ("accuracy", "specific", "weakest"):
        raise ValueError(f"rule must be 'accuracy', 'specific' or 'weakest'; got {rule!r}.")
    side = [r for r in sweep if r["alpha"] * sign > 0]
    if not side:
        raise ValueError(f"the sweep has no alpha on the side of sign {sign}.")
    best = max(side, key=lambda r: (r["levels"][domain][level], -abs(r["alpha"])))
    candidates = [r for r in side if r["levels"][domain][level] >= reached]
    if rule == "weakest" and candidates:
        best = min(candidates, key=lambda r: (abs(r["alpha"]), -r["levels"][domain][level]))
    if rule == "specific" and candidates:

        def leak(r):
            m = knob_leakage(sweep, domain, r["alpha"])["max"]
            return float("inf") if m is None else m

        best = min(candidates, key=lambda r: (leak(r), abs(r["alpha"])))
    return {"alpha": best["alpha"], "accuracy": best["levels"][domain][level]}


def grid_points(knobs: Mapping[str, Sequence[float]]) -> list[dict]:
    """Every point of the grid of several knobs' alphas, as dicts {knob: alpha} (the first knob varies slowest)."""
    if not knobs or any(len(v) == 0 for v in knobs.values()):
        raise ValueError(f"give at least one alpha for every knob; got {dict(knobs)}.")
    names = list(knobs)
    return [dict(zip(names, map(float, values))) for values in itertools.product(*(knobs[n] for n in names))]


def additive_scores(
    base: torch.Tensor, one_knob: Mapping[str, Mapping[float, torch.Tensor]], points: Sequence[Mapping[str, float]]
) -> torch.Tensor:
    """Predicted level scores at multi-knob points from each knob's 1-D sweep: `base + sum_k (s_k(a_k) - base)`.

    `base` is [N, 3] (every knob at 0), `one_knob[k][a]` the [N, 3] scores with knob k alone at alpha a, and each
    point gives an alpha from its sweep to every knob (a knob left out is at 0). The prediction assumes each knob's
    effect on every question's log-likelihoods adds up, which no mode makes exact (logits mode adds logits, not
    log-probabilities; hidden mode adds hidden states that the rest of the model then transforms): it is a cheap
    guide to which points of a large grid are worth scoring, never a score to report.

    >>> base = torch.zeros(1, 3)
    >>> sweeps = {"a": {1.0: torch.tensor([[0.0, 0.0, 1.0]])}, "b": {-1.0: torch.tensor([[2.0, 0.0, 0.0]])}}
    >>> additive_scores(base, sweeps, [{"a": 1.0, "b": -1.0}, {"a": 1.0}]).tolist()
    [[[2.0, 0.0, 1.0]], [[0.0, 0.0, 1.0]]]
    """
    if base.dim() != 2:
        raise ValueError(f"base must be [questions, levels]; got shape {tuple(base.shape)}.")
    out = base.expand(len(points), *base.shape).clone()
    for j, point in enumerate(points):
        for knob, alpha in point.items():
            if float(alpha) == 0.0:
                continue
            sweep = one_knob.get(knob, {})
            if float(alpha) not in sweep:
                raise ValueError(f"knob {knob!r} has no 1-D score at alpha {alpha}; it has {sorted(sweep)}.")
            out[j] += sweep[float(alpha)] - base
    return out


def dial_alphas(point: Mapping[str, float], knobs: Mapping[str, tuple[str, str]]) -> dict:
    """One signed dial per domain over two one-ended knobs: a point {domain: a} as adapter alphas, with the first
    knob of the domain's pair (its negative end, e.g. avoid) at -a when a < 0 and the second (its positive end,
    e.g. expert) at a when a > 0. Every knob of `knobs` is named, at 0 when its dial is off or on the other side,
    so that no adapter keeps an alpha from elsewhere; a domain left out of the point is at 0.

    >>> dial_alphas({"med": -1.5}, {"med": ("med_avoid", "med_expert"), "law": ("law_avoid", "law_expert")})
    {'med_avoid': 1.5, 'med_expert': 0.0, 'law_avoid': 0.0, 'law_expert': 0.0}
    """
    unknown = set(point) - set(knobs)
    if unknown:
        raise ValueError(f"point {dict(point)} names {sorted(unknown)}, which have no dial; dials: {sorted(knobs)}.")
    out = {}
    for domain, (negative, positive) in knobs.items():
        a = float(point.get(domain, 0.0))
        out[negative], out[positive] = (-a if a < 0 else 0.0), (a if a > 0 else 0.0)  # max(-0.0, 0.0) is -0.0
    return out


def combinations(domains: Sequence[str]) -> list[dict]:
    """Every assignment of a level to each domain (3 ** len(domains) of them), as dicts {domain: level}."""
    return [dict(zip(domains, levels)) for levels in itertools.product(LEVELS, repeat=len(domains))]


def search_combinations(
    scores: torch.Tensor,
    row_domains: Sequence[str],
    points: Sequence[dict],
    domains: Sequence[str],
    threshold: float = 0.8,
    select: Optional[Sequence[bool]] = None,
    controls: Optional[Mapping[str, str]] = None,
    top_k: int = 1,
    prefer: str = "base",
) -> list[dict]:
    """For each combination of target levels of `domains`, the grid point whose lowest accuracy over those domains
    is highest (ties: higher mean accuracy, then by `prefer`: "base", the point nearest the base, smallest sum of
    |alpha|; "margin", the point whose worst domain wins by most: the highest, over the combination's domains, lowest
    mean margin of the target level's score over the best other level's, in nats per token).

    `scores` is [len(points), len(rows), 3] from `level_scores`; `row_domains` names each row's domain. The point is
    chosen on the rows where `select` is true (default: all) and its accuracies reported on the other rows (on all
    rows when there is no `select`). A combination is reached when every domain's reported accuracy is at least
    `threshold`. `controls` ({domain: level}) are domains reported at the chosen point but not searched for. Each
    result also holds `selected_min_accuracy` (the chosen point's lowest accuracy on the rows it was chosen on) and
    `candidates`, the `top_k` best points in the same order (the chosen point first): where `scores` are a
    prediction, these are the points worth scoring exactly.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if prefer not in ("base", "margin"):
        raise ValueError(f"prefer must be 'base' (nearest the base) or 'margin' (widest margin), got {prefer!r}.")
    if scores.dim() != 3 or scores.shape[0] != len(points) or scores.shape[1] != len(row_domains):
        raise ValueError(
            f"scores {tuple(scores.shape)} do not match {len(points)} points x {len(row_domains)} rows x 3 levels."
        )
    row_domains = list(row_domains)
    mask_sel = torch.ones(len(row_domains), dtype=torch.bool) if select is None else torch.tensor(list(select))
    mask_eval = torch.ones_like(mask_sel) if select is None else ~mask_sel
    levels = levels_from_scores(scores)  # [P, N]
    by_domain = {}
    for d in list(domains) + list(controls or {}):
        rows = torch.tensor([rd == d for rd in row_domains])
        if not (rows & mask_sel).any() or not (rows & mask_eval).any():
            raise ValueError(f"domain {d!r} has no rows to choose on or to report on.")
        by_domain[d] = (rows & mask_sel, rows & mask_eval)
    if prefer == "base":
        last = [-sum(abs(v) for v in p.values()) for p in points]
    else:  # per domain and level, each point's mean over the choosing rows of the level's score minus the best other
        # level's (> 0 on a row where it is the level); 9 vectors of [P], not a margin per row (a big grid's size)
        margin = {
            (d, lv): (s[..., lv] - s[..., [o for o in range(len(LEVELS)) if o != lv]].amax(-1)).mean(-1)
            for d in domains
            for s in [scores[:, by_domain[d][0]]]
            for lv in range(len(LEVELS))
        }
    results = []
    for combo in combinations(domains):
        acc_sel = torch.stack(
            [(levels[:, by_domain[d][0]] == level_index(lv)).float().mean(-1) for d, lv in combo.items()]
        )  # [D, P]
        worst, mean = acc_sel.min(0).values.tolist(), acc_sel.mean(0).tolist()
        if prefer == "margin":
            last = torch.stack([margin[d, level_index(lv)] for d, lv in combo.items()]).min(0).values.tolist()
        # lexicographic: worst accuracy, then mean accuracy, then nearness to the base (or the worst margin)
        ranked = heapq.nlargest(top_k, range(len(points)), key=lambda j: (worst[j], mean[j], last[j]))
        best = ranked[0]
        report = {
            d: float((levels[best, by_domain[d][1]] == level_index(lv)).float().mean())
            for d, lv in {**combo, **(controls or {})}.items()
        }
        results.append(
            {
                "targets": dict(combo),
                "point": dict(points[best]),
                "point_index": best,
                "accuracy": report,
                "min_accuracy": min(report[d] for d in combo),
                "reached": all(report[d] >= threshold for d in combo),
                "selected_min_accuracy": worst[best],
                "candidates": [dict(points[j]) for j in ranked],
            }
        )
    return results


def routed_combinations(
    scores: torch.Tensor,
    row_domains: Sequence[str],
    routes: Sequence[str],
    points: Sequence[Mapping[str, float]],
    domains: Sequence[str],
    threshold: float = 0.8,
    select: Optional[Sequence[bool]] = None,
    controls: Optional[Mapping[str, str]] = None,
    knobs_of: Optional[Mapping[str, Sequence[str]]] = None,
    prefer: str = "accuracy",
) -> list[dict]:
    """The 27-combination search when each question is answered at the point of its route (`tools.router`), not at
    one point for all: for each domain d and level, the point at which most of d's questions routed to d are at that
    level (on the `select` rows; ties: nearest the base, smallest sum of |alpha|), or with `prefer="weakest"` the
    point nearest the base among those at which at least `threshold` of them are (the gentlest setting that does the
    job, since generation degrades at strong alphas; where none reaches it, the most accurate), chosen once per domain
    and level from d's own questions (the router's errors are not known when a setting is chosen); `knobs_of[d]`
    (optional) limits d's points to those that set only d's knobs (a domain it leaves out gets the base only). A
    question routed outside `domains` (a control, or any other label) is answered by the base model, every knob at 0,
    which must be among `points`. A misrouted question is scored at the point of the route it got, so router errors
    count against its own domain.

    `scores` is [len(points), len(rows), 3]; `routes` and `row_domains` name each row's route and true domain.
    Results are as `search_combinations`' (`accuracy` per domain and control on the report rows, `min_accuracy`,
    `reached`, `selected_min_accuracy`), with `points` ({route: point}) in place of `point`.
    """
    if scores.dim() != 3 or scores.shape[0] != len(points) or not scores.shape[1] == len(row_domains) == len(routes):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(points)} points x {len(row_domains)} rows "
                         f"({len(routes)} routes) x 3 levels.")
    size = [sum(abs(float(a)) for a in p.values()) for p in points]
    base = [j for j, s in enumerate(size) if s == 0.0]
    if not base:
        raise ValueError("routed_combinations needs the base point (every knob at 0) among the points.")
    if prefer not in ("accuracy", "weakest"):
        raise ValueError(f"prefer must be 'accuracy' (the most accurate point) or 'weakest' (the point nearest the "
                         f"base that reaches the threshold); got {prefer!r}.")
    if select is not None and len(select) != len(routes):
        raise ValueError(f"select has {len(select)} values for {len(routes)} rows; give one per row.")
    mask_sel = torch.ones(len(routes), dtype=torch.bool) if select is None else torch.tensor(list(select))
    mask_eval = torch.ones_like(mask_sel) if select is None else ~mask_sel
    true = {d: torch.tensor([rd == d for rd in row_domains]) for d in [*domains, *(controls or {})]}
    unreported = [c for c in controls or {} if not (true[c] & mask_eval).any()]
    if unreported:
        raise ValueError(f"control(s) {unreported} have no rows to report on.")
    levels = levels_from_scores(scores)  # [P, N]
    chosen: dict = {}  # (domain, level index) -> (point index, accuracy on the choosing rows)
    for d in domains:
        rows = true[d] & torch.tensor([r == d for r in routes]) & mask_sel
        if not rows.any() or not (true[d] & mask_eval).any():
            raise ValueError(f"domain {d!r} has no rows routed to it to choose on, or none to report on.")
        own = set((knobs_of or {}).get(d, ()))
        allowed = [j for j, p in enumerate(points)
                   if knobs_of is None or all(float(a) == 0.0 or k in own for k, a in p.items())]
        for lv in range(len(LEVELS)):
            acc = (levels[allowed][:, rows] == lv).float().mean(-1).tolist()
            best = max(range(len(allowed)), key=lambda i: (acc[i], -size[allowed[i]]))
            if prefer == "weakest" and acc[best] >= threshold:
                best = max((i for i in range(len(allowed)) if acc[i] >= threshold),
                           key=lambda i: (-size[allowed[i]], acc[i]))
            chosen[d, lv] = (allowed[best], acc[best])
    results = []
    for combo in combinations(domains):
        at = {d: chosen[d, level_index(lv)][0] for d, lv in combo.items()}
        assign = torch.tensor([at.get(r, base[0]) for r in routes])
        row_level = levels[assign, torch.arange(len(routes))]
        report = {d: float((row_level[true[d] & mask_eval] == level_index(lv)).float().mean())
                  for d, lv in {**combo, **(controls or {})}.items()}
        results.append({
            "targets": dict(combo),
            "points": {d: dict(points[j]) for d, j in at.items()},
            "accuracy": report,
            "min_accuracy": min(report[d] for d in combo),
            "reached": all(report[d] >= threshold for d in combo),
            "selected_min_accuracy": min(chosen[d, level_index(lv)][1] for d, lv in combo.items()),
        })
    return results


def level_pair(row: Mapping, chosen: str, rejected: str) -> dict:
    """One DPO pair from a row's reference answers: `chosen` level over `rejected` level (conversational)."""

    def answer(level: str) -> list[dict]:
        if not isinstance(row.get(level), str) or not row[level].strip():
            raise ValueError(
                f"row {row.get('prompt')!r} has no {level!r} answer; these pairs need {chosen!r} and {rejected!r}."
            )
        return [{"role": "assistant", "content": row[level]}]

    return {"prompt": row["prompt"], "chosen": answer(chosen), "rejected": answer(rejected)}


def ordinal_pairs(rows: Sequence[Mapping]) -> list[dict]:
    """Two pairs per row that order its levels, expert over generic and generic over avoid, all scored at alpha 1.

    A knob trained on them moves towards expert at alpha > 0. It was meant to move towards avoid below 0, but in
    logits mode alpha -1 does not reverse these preferences between whole answers (the domains experiment: the avoid
    answers fall at -1 as at +1); `end_pairs` trains the negative end where it is used.

    >>> row = {"prompt": [{"role": "user", "content": "q"}], "avoid": "a", "generic": "g", "expert": "e"}
    >>> [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in ordinal_pairs([row])]
    [('e', 'g'), ('g', 'a')]
    """
    return [level_pair(r, hi, lo) for r in rows for hi, lo in (("expert", "generic"), ("generic", "avoid"))]


def target_pairs(rows: Sequence[Mapping], level: str) -> list[dict]:
    """Two pairs per row, `level` over each of the other two: the data of one pooled adapter trained straight for a
    target level (the retraining the multi-knob search replaces)."""
    level = LEVELS[level_index(level)]
    return [level_pair(r, level, other) for r in rows for other in LEVELS if other != level]


def anchor_pairs(rows: Sequence[Mapping]) -> list[dict]:
    """Two pairs per row with the same two answers in both orders: generic and one other level (avoid on even rows,
    expert on odd ones).

    Their DPO gradients cancel while the policy's margin between the two equals the reference's, and pull it back
    when it drifts, the aim being to hold rows of other domains where the base puts them on either side of 0. The
    pull is second order in the drift (about beta**2 * m / 2 against beta / 2 for a one-sided pair), too weak to
    hold them in the domains experiment (leakage 0.79-0.93); `held_pairs` pushes one-sidedly at each end instead.
    """
    out = []
    for i, r in enumerate(rows):
        other = ("avoid", "expert")[i % 2]
        out += [level_pair(r, "generic", other), level_pair(r, other, "generic")]
    return out


def end_pairs(rows: Sequence[Mapping]) -> list[dict]:
    """Two pairs per row, one for each end of the knob: expert over generic scored at alpha +1 and avoid over
    generic at alpha -1 (`"alpha"` fields, `tools.alpha_pairs`), so that the negative end is trained, not inferred.

    >>> row = {"prompt": "q", "avoid": "a", "generic": "g", "expert": "e"}
    >>> [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["alpha"]) for p in end_pairs([row])]
    [('e', 'g', 1.0), ('a', 'g', -1.0)]
    """
    return [{**level_pair(r, hi, "generic"), "alpha": a} for r in rows for hi, a in (("expert", 1.0), ("avoid", -1.0))]


def held_pairs(rows: Sequence[Mapping], both_levels: bool = False) -> list[dict]:
    """Pairs for rows of another domain: generic over expert at alpha +1 and generic over avoid at alpha -1. They
    push with the same first-order force as a knob's own `end_pairs` (where `anchor_pairs` only pull back a margin
    that has drifted), so at both ends the knob learns to leave these rows at their generic level.

    With `both_levels`, generic is preferred over both other levels at both ends (four pairs per row): two pairs per
    row left the other domains free to drift towards avoid at positive alpha (the domains experiment's two-ended
    design), which this closes.

    >>> row = {"prompt": "q", "avoid": "a", "generic": "g", "expert": "e"}
    >>> [(p["rejected"][0]["content"], p["alpha"]) for p in held_pairs([row], both_levels=True)]
    [('e', 1.0), ('a', 1.0), ('e', -1.0), ('a', -1.0)]
    """
    ends = (
        (("expert", 1.0), ("avoid", 1.0), ("expert", -1.0), ("avoid", -1.0))
        if both_levels
        else (("expert", 1.0), ("avoid", -1.0))
    )
    return [{**level_pair(r, "generic", lo), "alpha": a} for r in rows for lo, a in ends]
