"""Hidden mix: `out = x + sum_i a_i * (y_i - x)` for k adapter outputs.

Used after the CLM layer in `hidden` mode (x: layer input, y_i: each adapter's layer output) and at the LM
head in `logits` mode (x: the unaligned path, y_i: the aligned paths). `a_i` is a number or one value per
batch row. Accumulates in float32 and casts back to the dtype of `x`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from .dispatch import MAX_TERMS, kernel_backend


Alpha = Union[float, torch.Tensor]


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host sync: per-sequence alphas arrive as CPU tensors (`peft_clm.alpha`), and a plain
    `.to("cuda")` of a CPU tensor waits for every kernel queued before it, once per mix, on every decode step.
    A pinned copy is sent asynchronously (torch's pinned allocator keeps it alive until the copy has run)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # an already pinned tensor would be sent as it is, and the caller could change it before the copy has run
        return (t.clone() if t.is_pinned() else t).pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _row_factor(a: Alpha, x: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(a, torch.Tensor):
        if a.dim() != 1 or a.shape[0] != x.shape[0]:
            raise ValueError(f"a per-row alpha needs shape ({x.shape[0]},), got {tuple(a.shape)}.")
        return to_device_async(a.to(torch.float32), x.device).view(-1, *([1] * (x.dim() - 1)))
    return float(a)


def hidden_mix_reference(x: torch.Tensor, ys: Sequence[torch.Tensor], alphas: Sequence[Alpha]) -> torch.Tensor:
    """Plain-torch reference of [`hidden_mix`]; differentiable through torch autograd."""
    if len(ys) != len(alphas):
        raise ValueError(f"{len(ys)} outputs but {len(alphas)} alphas.")
    x32 = x.float()
    out = x32
    for y, a in zip(ys, alphas):
        if y.shape != x.shape:
            raise ValueError(f"output shape {tuple(y.shape)} differs from input shape {tuple(x.shape)}.")
        out = out + _row_factor(a, x) * (y.float() - x32)
    return out.to(x.dtype)


def hidden_mix(x: torch.Tensor, ys: Sequence[torch.Tensor], alphas: Sequence[Alpha]) -> torch.Tensor:
    """`x + sum_i alphas[i] * (ys[i] - x)`, alphas[i] a number or a tensor with one value per row of `x`.

    Example:
        ```py
        >>> out = hidden_mix(x, [y], [0.5])  # halfway between x and y
        ```
    """
    if len(ys) <= MAX_TERMS and kernel_backend(x, *ys) == "triton":  # more terms: the reference
        from .hidden_mix_triton import hidden_mix_triton

        return hidden_mix_triton(x, ys, alphas)
    return hidden_mix_reference(x, ys, alphas)
