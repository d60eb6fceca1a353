"""A request's `alpha` and `model` fields, turned into one {adapter: alpha} per generated sequence.

What a request may send (the `openai` client sends it with `extra_body={"alpha": ...}`):

- nothing: the server's default alpha (`--alpha`) for every knob the model name selects;
- a number: that strength for every selected knob;
- a dict `{"concise": 1.0, "formal": -0.5}`: one strength per knob; knobs left out keep the default;
- a list with one of the above per returned sequence (`n` choices, or prompts x `n` for completions): per-sequence
  alpha, in `logits` and `hidden` modes only (`weights` mode mixes parameters, one alpha per batch).

`model` names the base model (every knob, at the request's alpha) or one adapter (that knob alone, the others at 0).

With a router and a policy (`serve --router DIR --policy FILE`), a request to the base model that sends no alpha is
routed instead: each prompt gets the alphas its route has in the policy (`peft_clm.tools.router.policy_alphas`),
every knob the policy leaves out of that route at 0; a route the policy does not name is the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from ...alpha import check_alpha
from ..router import check_policy, route_alphas
from .errors import ApiError


RowAlpha = dict[str, float]


class Knobs:
    """The adapters a server dials, its default alpha and mixing mode; `resolve` validates a request's alpha.

    Example:
        ```py
        >>> knobs = Knobs(["concise", "formal"], default=1.0, mode="logits", base_id="smollm2")
        >>> knobs.resolve("smollm2", {"formal": -0.5}, rows=1)
        [{'concise': 1.0, 'formal': -0.5}]
        >>> knobs.resolve("concise", 0.7, rows=2)
        [{'concise': 0.7, 'formal': 0.0}, {'concise': 0.7, 'formal': 0.0}]
        ```
    """

    def __init__(self, adapters: Sequence[str], default: float, mode: str, base_id: str,
                 policy: Optional[dict[str, dict[str, float]]] = None) -> None:
        if not adapters:
            raise ValueError("the server needs at least one CLM adapter (--adapter DIR).")
        check_alpha(default, "--alpha", rows=False)
        self.adapters = list(adapters)
        self.default = float(default)
        self.mode = mode
        self.base_id = base_id
        # checked whole here, so that a bad policy stops the server before it serves
        self.policy = None if policy is None else check_policy(policy, self.adapters)

    def routes(self, target: str, alpha: Any) -> bool:
        """Whether this request is routed: a policy is set, the request names the base model and sends no alpha."""
        return self.policy is not None and alpha is None and target == self.base_id

    def routed(self, routes: Sequence[str]) -> list[RowAlpha]:
        """One {adapter: alpha} per sequence from each sequence's route and the policy."""
        return [route_alphas(route, self.policy, self.adapters) for route in routes]

    def resolve(self, target: str, alpha: Any, rows: int) -> list[RowAlpha]:
        """One {adapter: alpha} per sequence, every adapter present; raises `ApiError` (400) naming what was wrong."""
        if isinstance(alpha, list):
            if self.mode == "weights":
                raise ApiError(400, "per-sequence alpha (a list) needs --interpolation logits or hidden; this server "
                               "runs in weights mode, which mixes the layer's parameters once per batch: send one "
                               "number or one {adapter: number} dict per request.", param="alpha")
            if len(alpha) != rows:
                raise ApiError(400, f"alpha is a list of {len(alpha)} values but the request returns {rows} "
                               "sequence(s); send one alpha per sequence (prompts x n), or a single value.",
                               param="alpha")
            return [self._one(target, a, f"alpha[{i}]") for i, a in enumerate(alpha)]
        return [self._one(target, alpha, "alpha")] * rows

    def echo(self, alpha: Any, resolved: list[RowAlpha]) -> Union[RowAlpha, list[RowAlpha]]:
        """What the response reports as applied: one dict, or one per sequence when a list was sent."""
        return list(resolved) if isinstance(alpha, list) else resolved[0]

    def _one(self, target: str, value: Any, what: str) -> RowAlpha:
        selected = self.adapters if target == self.base_id else [target]
        out = {name: (self.default if name in selected else 0.0) for name in self.adapters}
        if value is None:
            return out
        if isinstance(value, dict):
            unknown = [k for k in value if k not in self.adapters]
            if unknown:
                raise ApiError(400, f"{what} names unknown adapter(s) {unknown}; this server's adapters are "
                               f"{self.adapters}.", param="alpha")
            outside = [k for k in value if k not in selected]
            if outside:
                raise ApiError(400, f"{what} sets {outside} but model {target!r} dials {target!r} alone (the other "
                               f"knobs are off); send alpha for {target!r} only, or use model {self.base_id!r} to "
                               "dial several knobs.", param="alpha")
            for name, v in value.items():
                out[name] = _number(v, f"{what}[{name!r}]")
            return out
        number = _number(value, what)
        for name in selected:
            out[name] = number
        return out


def _number(value: Any, what: str) -> float:
    """One knob's alpha, checked by the tuner's own validator (`peft_clm.alpha.check_alpha`), as a 400 error."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"{what} must be a number (0 = base model, 1 = aligned, others inter/extrapolate), a "
                       f"{{adapter: number}} dict, or a list of these per sequence; got {value!r}.", param="alpha")
    try:
        return check_alpha(value, what, rows=False)
    except ValueError as e:
        raise ApiError(400, str(e), param="alpha") from None
