"""Alpha: how strongly each adapter's alignment applies, and the per-call state that carries it through a forward.

- `check_alpha` is the one validator of a value: a finite number with |alpha| <= `MAX_ABS_ALPHA`, or a 1-D list
  of them (one per sequence).
- `resolve_alpha` turns what a user passes (a number, one number per sequence, or a dict by adapter name) into one
  value per adapter; `check_mode_accepts` is the rule that weights mode takes no per-sequence alpha.
- `active_terms` is the one rule of what runs: adapters at alpha 0 drop out; none left is the identity; one adapter
  at exactly 1 is that adapter alone; anything else is a mix.
- `CallState` is the per-call state (a `clm_alpha=` override, and logits mode's plan for the forward running now),
  kept in one context variable so that two threads, or two requests of a server, never see each other's alpha.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Optional, Union

import torch

from .constants import MAX_ABS_ALPHA, MAX_MIXED_ADAPTERS


AlphaValue = Union[float, torch.Tensor]  # a number, or a 1-D float32 CPU tensor with one value per sequence
Alpha = Union[float, int, Sequence[float], torch.Tensor, Mapping[str, Any]]
MODES_WITH_ROWS = ("hidden", "logits")


def check_alpha(value: Any, what: str = "alpha", rows: bool = True) -> AlphaValue:
    """Validate one alpha: a real number, or (with `rows`) a 1-D list, array or tensor of them, one per sequence.

    Returns a float, or a float32 CPU tensor. Raises one ValueError naming what was wrong and what is accepted.

    Example:
        ```py
        >>> check_alpha(0.5), check_alpha([0.0, 1.5])
        (0.5, tensor([0.0000, 1.5000]))
        ```
    """
    accepted = f"a finite number with |{what}| <= {MAX_ABS_ALPHA:g}" + (
        ", or one such number per sequence" if rows else ""
    )
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    elif hasattr(value, "ndim") and getattr(value, "ndim") == 0 and hasattr(value, "item"):  # a numpy scalar/0-d array
        value = value.item()
    if isinstance(value, bool):
        raise ValueError(f"{what} must be {accepted}; got the boolean {value!r}.")
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{what} must be {accepted}; got {value!r}, too large for a float.") from None
        if not math.isfinite(number) or abs(number) > MAX_ABS_ALPHA:
            raise ValueError(f"{what} must be {accepted}; got {value!r}.")
        return number
    if not rows or not isinstance(value, (list, tuple, torch.Tensor)) and not hasattr(value, "__array__"):
        raise ValueError(f"{what} must be {accepted}; got {type(value).__name__} {value!r}.")
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items)
    ):
        raise ValueError(f"{what} per sequence must be a non-empty 1-D list of numbers; got {value!r}.")
    try:
        out = torch.tensor([float(v) for v in items], dtype=torch.float32)
    except OverflowError:
        raise ValueError(f"{what} must be {accepted}; got a value too large for a float in {value!r}.") from None
    if not torch.isfinite(out).all() or out.abs().max() > MAX_ABS_ALPHA:
        raise ValueError(f"{what} must be {accepted}; got {value!r}.")
    return out


def check_mode_accepts(values: Mapping[str, AlphaValue], mode: str) -> None:
    """The rule that one alpha per sequence needs `hidden` or `logits` mode (weights mode mixes parameters)."""
    if mode not in MODES_WITH_ROWS and any(isinstance(v, torch.Tensor) for v in values.values()):
        raise ValueError(
            "per-sequence alpha needs interpolation='hidden' or 'logits'; weights mode mixes parameters, so one "
            "number applies to the whole batch."
        )


def resolve_alpha(alpha: Alpha, names: Sequence[str], current: Mapping[str, AlphaValue], mode: str) -> dict:
    """One value per adapter from a number, one number per sequence, or a dict {adapter: value} (others keep
    `current`). Checked in full before anything is returned, so nothing is half-applied."""
    if isinstance(alpha, Mapping):
        unknown = [k for k in alpha if k not in names]
        if unknown:
            raise ValueError(f"alpha names unknown adapter(s) {unknown}; the adapters are {list(names)}.")
        out = {n: current[n] for n in names}
        out.update({k: check_alpha(v, f"alpha[{k!r}]") for k, v in alpha.items()})
    else:
        value = check_alpha(alpha)
        out = {n: value for n in names}
    check_mode_accepts(out, mode)
    return out


def _is_all(value: AlphaValue, target: float) -> bool:
    return bool((value == target).all()) if isinstance(value, torch.Tensor) else value == target


@dataclasses.dataclass(frozen=True)
class Terms:
    """The adapters that contribute to one forward, with their alphas (alpha-0 adapters left out)."""

    names: tuple[str, ...]
    alphas: tuple[AlphaValue, ...]

    @property
    def identity(self) -> bool:
        """No adapter contributes: the result is the base model, exactly."""
        return not self.names

    @property
    def single(self) -> Optional[str]:
        """The one adapter that runs alone, at exactly alpha 1 for every sequence, if that is the case."""
        return self.names[0] if len(self.names) == 1 and _is_all(self.alphas[0], 1.0) else None


def active_terms(pairs: Sequence[tuple[str, AlphaValue]], rows: Optional[int] = None) -> Terms:
    """The one rule of what runs: drop adapters at alpha 0, check per-sequence alphas against `rows` sequences, and
    allow at most `MAX_MIXED_ADAPTERS` adapters in a mix."""
    for name, value in pairs:
        if rows is not None and isinstance(value, torch.Tensor) and value.shape[0] != rows:
            raise ValueError(
                f"alpha for {name!r} has {value.shape[0]} values (one per sequence) but the batch has {rows} rows "
                "(sequences); pass one alpha per sequence, or a single number."
            )
    kept = [(n, a) for n, a in pairs if not _is_all(a, 0.0)]
    if len(kept) > MAX_MIXED_ADAPTERS:
        raise ValueError(
            f"{len(kept)} adapters have a non-zero alpha; at most {MAX_MIXED_ADAPTERS} mix at once. Set the others "
            "to 0 or deactivate them with set_adapter()."
        )
    return Terms(tuple(n for n, _ in kept), tuple(a for _, a in kept))


def repeat_rows(alpha: Alpha, repeats: int) -> Alpha:
    """Repeat each per-sequence value `repeats` times in place, as generate() repeats each sequence for beams and
    `num_return_sequences`; numbers are left as they are."""
    if repeats == 1:
        return alpha
    if isinstance(alpha, Mapping):
        return {k: repeat_rows(v, repeats) for k, v in alpha.items()}
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        return alpha.repeat_interleave(repeats)
    return alpha


# ---------------------------------------------------------------------------------------------- per-call state
@dataclasses.dataclass(frozen=True)
class CallState:
    """What one call of a CLM model carries through its forward, for one CLM layer (the owner).

    `alpha` overrides the adapters' alpha for this call (`clm_alpha=`, `alpha_context`). Logits mode pushes a
    frame per hooked forward (`logits_mode.DualPath`): `plan` is the layout of its paths, `mix_after_head` that the
    top model mixes the (soft-capped) logits, `labels` the labels held back for that, `return_tuple` that the
    caller asked for a tuple. `previous` is the frame to restore when this one is popped.
    """

    alpha: Optional[Mapping[str, AlphaValue]] = None
    plan: Any = None
    mix_after_head: bool = False
    labels: Optional[torch.Tensor] = None
    return_tuple: bool = False
    pushed_by: str = ""
    previous: Optional[CallState] = None


_EMPTY = CallState()
_CALL_STATE: ContextVar[Mapping[int, CallState]] = ContextVar("peft_clm_call_state", default=MappingProxyType({}))


def call_state(owner: object) -> CallState:
    """The current call state of `owner` in this thread/context (an empty state outside any call)."""
    return _CALL_STATE.get().get(id(owner), _EMPTY)


def _set(owner: object, state: Optional[CallState]):
    states = dict(_CALL_STATE.get())
    if state is None or state == _EMPTY:
        states.pop(id(owner), None)
    else:
        states[id(owner)] = state
    return _CALL_STATE.set(MappingProxyType(states))


@contextlib.contextmanager
def call_scope(owner: object, alpha: Optional[Mapping[str, AlphaValue]] = None) -> Iterator[None]:
    """One call of a CLM model: use `alpha` (already resolved; None keeps the current one) for the calls made
    inside the block, in this context only, and restore the call state as it was on the way out, whatever ends the
    block (frames a hook could not pop, on a KeyboardInterrupt say, are dropped with it)."""
    state = call_state(owner)
    if alpha is not None:
        state = dataclasses.replace(state, alpha=MappingProxyType(dict(alpha)))
    token = _set(owner, state)
    try:
        yield
    finally:
        _CALL_STATE.reset(token)


def push_frame(owner: object, pushed_by: str, **fields: Any) -> CallState:
    """Start a frame of the call state (a forward pre-hook); `pop_frame` in the matching post-hook ends it."""
    current = call_state(owner)
    frame = dataclasses.replace(current, pushed_by=pushed_by, previous=current, **fields)
    _set(owner, frame)
    return frame


def pop_frame(owner: object, pushed_by: str) -> Optional[CallState]:
    """End the innermost frame if `pushed_by` started it; returns it (None when there was no such frame)."""
    frame = call_state(owner)
    if frame.pushed_by != pushed_by:
        return None
    _set(owner, frame.previous)
    return frame


def update_frame(owner: object, frame: CallState, **fields: Any) -> None:
    """Change fields of `frame`, which must be the innermost frame of `owner`."""
    if call_state(owner) is frame:
        _set(owner, dataclasses.replace(frame, **fields))
