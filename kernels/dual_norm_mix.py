"""Final norm + path mix for logits mode: `(1 - sum a_i) * norm(h_base) + sum_i a_i * norm(h_i)`.

The input holds the paths as row blocks (aligned_1 .. aligned_k, then the unaligned path), each `rows` long; the
output has one block, so the LM head then runs on B rows instead of (k+1)*B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .dispatch import kernel_backend
from .hidden_mix import Alpha, hidden_mix_reference


@dataclass
class NormSpec:
    """What the fused kernel needs to know of a final norm: RMSNorm or LayerNorm, weight (+ offset), bias, eps."""

    kind: str  # "rms" or "layer"
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    eps: float
    weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)


def norm_spec(norm: nn.Module) -> Optional[NormSpec]:
    """The spec of a known norm module, or None (then the reference path runs the module itself)."""
    weight = getattr(norm, "weight", None)
    if isinstance(norm, nn.LayerNorm) and weight is not None:
        return NormSpec("layer", weight, norm.bias, float(norm.eps))
    name = type(norm).__name__
    if weight is None or not name.endswith("RMSNorm"):
        return None
    if name.startswith("Gemma"):
        return NormSpec("rms", weight, None, float(getattr(norm, "eps")), weight_offset=1.0)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if eps is None else NormSpec("rms", weight, None, float(eps))


def dual_norm_mix_reference(h: torch.Tensor, norm, alphas: Sequence[Alpha], num_paths: int) -> torch.Tensor:
    """Plain torch: the model's own norm (a module or its forward) on every path, then the mix."""
    y = norm(h)
    rows = h.shape[0] // num_paths
    k = num_paths - 1
    return hidden_mix_reference(y[k * rows :], [y[j * rows : (j + 1) * rows] for j in range(k)], alphas)


def dual_norm_mix(h: torch.Tensor, norm: nn.Module, alphas: Sequence[Alpha], num_paths: int,
                  norm_forward=None) -> torch.Tensor:
    """Norm every path of `h` ([(k+1)*B, ...]) and mix them with `alphas` (k numbers or per-sequence tensors).

    `norm_forward` is the function the reference path calls (default: the module itself).

    Example:
        ```py
        >>> out = dual_norm_mix(h, model.model.norm, [0.5], num_paths=2)   # [2B, T, H] -> [B, T, H]
        ```
    """
    spec = norm_spec(norm)
    if (
        spec is not None
        and num_paths - 1 <= 4
        and not (torch.is_grad_enabled() and (h.requires_grad or spec.weight.requires_grad))
        and kernel_backend(h, spec.weight) == "triton"
    ):
        from .dual_norm_mix_triton import dual_norm_mix_triton

        return dual_norm_mix_triton(h, spec, alphas, num_paths)
    return dual_norm_mix_reference(h, norm if norm_forward is None else norm_forward, alphas, num_paths)
