"""Triton kernel of the fused final norm + path mix (forward; inference)."""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .hidden_mix_triton import alpha_table


@triton.jit
def _normed(ptr, cols, mask, w, b, H, eps, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        var = tl.sum(x * x, axis=0) / H
        y = x * tl.rsqrt(var + eps) * w
    else:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / H
        y = xc * tl.rsqrt(var + eps) * w
    if HAS_BIAS:
        y += b
    return y


@triton.jit
def _dual_norm_mix_fwd(Hs, W, Bias, A, OUT, ROWS, H, RPS, NSEQ, eps, w_offset,
                       K: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    seq = r // RPS
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + w_offset
    b = 0.0
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
    base = _normed(Hs + (K * ROWS + r).to(tl.int64) * H, cols, mask, w, b, H, eps, IS_RMS, HAS_BIAS)
    acc = base
    for i in tl.static_range(K):
        a = tl.load(A + i * NSEQ + seq)
        y = _normed(Hs + (i * ROWS + r).to(tl.int64) * H, cols, mask, w, b, H, eps, IS_RMS, HAS_BIAS)
        acc += a * (y - base)
    tl.store(OUT + r.to(tl.int64) * H + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def dual_norm_mix_triton(h: torch.Tensor, spec, alphas: Sequence, num_paths: int) -> torch.Tensor:
    if h.shape[0] % num_paths:
        raise ValueError(f"{h.shape[0]} rows do not split into {num_paths} paths.")
    if len(alphas) != num_paths - 1:
        raise ValueError(f"{num_paths} paths need {num_paths - 1} alphas, got {len(alphas)}.")
    H = h.shape[-1]
    batch = h.shape[0] // num_paths
    h2 = h.contiguous().view(-1, H)
    rows = h2.shape[0] // num_paths
    out = torch.empty((rows, H), dtype=h.dtype, device=h.device)
    table, rows_per_seq = alpha_table(alphas, batch, rows, h.device)
    bias = spec.bias if spec.bias is not None else spec.weight
    block = triton.next_power_of_2(H)
    _dual_norm_mix_fwd[(rows,)](h2, spec.weight, bias, table, out, rows, H, rows_per_seq, table.shape[1], spec.eps,
                                spec.weight_offset, K=num_paths - 1, IS_RMS=spec.kind == "rms",
                                HAS_BIAS=spec.bias is not None, BLOCK=block)
    return out.view(batch, *h.shape[1:])
