"""Weight mix for `weights` mode: `w0 + sum_i a_i * (w_i - w0)`.

Written into an output buffer when alpha changes, not on every forward. Accumulates in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .dispatch import MAX_TERMS, kernel_backend


def weight_mix_reference(
    w0: torch.Tensor, ws: Sequence[torch.Tensor], alphas: Sequence[float], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain-torch reference of [`weight_mix`]; differentiable when `out` is None."""
    if len(ws) != len(alphas):
        raise ValueError(f"{len(ws)} weights but {len(alphas)} alphas.")
    w0_32 = w0.float()
    acc = w0_32
    for w, a in zip(ws, alphas):
        if w.shape != w0.shape:
            raise ValueError(f"weight shape {tuple(w.shape)} differs from the base shape {tuple(w0.shape)}.")
        acc = acc + float(a) * (w.float() - w0_32)
    if out is None:
        return acc.to(w0.dtype)
    return out.copy_(acc)


def weight_mix(
    w0: torch.Tensor, ws: Sequence[torch.Tensor], alphas: Sequence[float], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`w0 + sum_i alphas[i] * (ws[i] - w0)`, written into `out` when given.

    Example:
        ```py
        >>> mixed = weight_mix(w0, [w], [0.5])
        ```
    """
    if out is not None and len(ws) <= MAX_TERMS and kernel_backend(w0, *ws, out) == "triton":
        from .weight_mix_triton import weight_mix_triton

        return weight_mix_triton(w0, ws, alphas, out)
    return weight_mix_reference(w0, ws, alphas, out)
