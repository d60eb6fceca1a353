"""Triton kernels of the hidden mix `out = x + sum_i a_i * (y_i - x)`, forward and backward, k <= MAX_K outputs.

One pass over memory: x and each y_i are read once and `out` written once (backward: the gradient read once,
dx and every dy_i written once). Alpha is a table [k, n_seq] in float32; row r of the flattened [R, H] input
belongs to sequence r // rows_per_seq (rows_per_seq = R for one alpha per adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import triton
import triton.language as tl

from .dispatch import MAX_TERMS as MAX_K  # the kernels below have MAX_K = 4 output slots, Y0..Y3


@triton.jit
def _hidden_mix_fwd(X, Y0, Y1, Y2, Y3, A, OUT, H, RPS, NSEQ, K: tl.constexpr, BLOCK: tl.constexpr):
    # X: [R, H] input rows; Y0..Y3: [R, H] adapter outputs (slots >= K are never read); A: [K, NSEQ] float32
    # alphas; OUT: [R, H]; H: row width; RPS: rows per sequence (row r uses column r // RPS of A); NSEQ: columns
    # of A; K: number of outputs; BLOCK: columns per program. Grid: (R, cdiv(H, BLOCK)).
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    offs = row.to(tl.int64) * H + cols
    seq = row // RPS
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    acc = x
    if K > 0:
        acc += tl.load(A + seq) * (tl.load(Y0 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 1:
        acc += tl.load(A + NSEQ + seq) * (tl.load(Y1 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 2:
        acc += tl.load(A + 2 * NSEQ + seq) * (tl.load(Y2 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 3:
        acc += tl.load(A + 3 * NSEQ + seq) * (tl.load(Y3 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _hidden_mix_bwd(G, DX, DY0, DY1, DY2, DY3, A, H, RPS, NSEQ, K: tl.constexpr, BLOCK: tl.constexpr):
    # G: [R, H] gradient of OUT; DX = G * (1 - sum_i a_i); DYi = G * a_i (slots >= K are never written); the other
    # arguments as in the forward.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    offs = row.to(tl.int64) * H + cols
    seq = row // RPS
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    total = 0.0
    if K > 0:
        a = tl.load(A + seq)
        tl.store(DY0 + offs, (g * a).to(DY0.dtype.element_ty), mask=mask)
        total += a
    if K > 1:
        a = tl.load(A + NSEQ + seq)
        tl.store(DY1 + offs, (g * a).to(DY1.dtype.element_ty), mask=mask)
        total += a
    if K > 2:
        a = tl.load(A + 2 * NSEQ + seq)
        tl.store(DY2 + offs, (g * a).to(DY2.dtype.element_ty), mask=mask)
        total += a
    if K > 3:
        a = tl.load(A + 3 * NSEQ + seq)
        tl.store(DY3 + offs, (g * a).to(DY3.dtype.element_ty), mask=mask)
        total += a
    tl.store(DX + offs, (g * (1.0 - total)).to(DX.dtype.element_ty), mask=mask)


def alpha_table(
    alphas: Sequence[Union[float, torch.Tensor]], batch: int, rows: int, device
) -> tuple[torch.Tensor, int]:
    """(table [k, n_seq] float32, rows_per_seq): one column for scalar alphas, one per sequence otherwise."""
    if any(isinstance(a, torch.Tensor) for a in alphas):
        cols = [a.to(torch.float32) if isinstance(a, torch.Tensor) else torch.full((batch,), float(a)) for a in alphas]
        for c in cols:
            if c.shape != (batch,):
                raise ValueError(f"a per-row alpha needs shape ({batch},), got {tuple(c.shape)}.")
        return torch.stack(cols).to(device), rows // batch
    return torch.tensor([[float(a)] for a in alphas], dtype=torch.float32, device=device), rows


def _block(h: int) -> int:
    return min(4096, triton.next_power_of_2(h))


class HiddenMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, rows_per_seq: int, *ys: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        x2 = x.contiguous().view(-1, H)
        y2 = [y.contiguous().view(-1, H) for y in ys]
        out = torch.empty_like(x2)
        pad = y2 + [x2] * (MAX_K - len(y2))
        block = _block(H)
        grid = (x2.shape[0], triton.cdiv(H, block))
        _hidden_mix_fwd[grid](x2, *pad, table, out, H, rows_per_seq, table.shape[1], K=len(ys), BLOCK=block)
        ctx.save_for_backward(table)
        ctx.rows_per_seq, ctx.k, ctx.shape = rows_per_seq, len(ys), x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (table,) = ctx.saved_tensors
        H = grad.shape[-1]
        g2 = grad.contiguous().view(-1, H)
        dx = torch.empty_like(g2)
        dys = [torch.empty_like(g2) for _ in range(ctx.k)]
        pad = dys + [dx] * (MAX_K - ctx.k)  # unused slots are never written
        block = _block(H)
        grid = (g2.shape[0], triton.cdiv(H, block))
        _hidden_mix_bwd[grid](g2, dx, *pad, table, H, ctx.rows_per_seq, table.shape[1], K=ctx.k, BLOCK=block)
        return (dx.view(ctx.shape), None, None, *[d.view(ctx.shape) for d in dys])


def hidden_mix_triton(x: torch.Tensor, ys: Sequence[torch.Tensor], alphas) -> torch.Tensor:
    """Triton `x + sum_i alphas[i] * (ys[i] - x)`; differentiable in x and ys (alpha is not trained)."""
    if len(ys) != len(alphas):
        raise ValueError(f"{len(ys)} outputs but {len(alphas)} alphas.")
    for y in ys:
        if y.shape != x.shape or y.dtype != x.dtype:
            raise ValueError(f"outputs must match the input's shape and dtype, got {tuple(y.shape)} {y.dtype}.")
    rows = x.numel() // x.shape[-1]
    table, rows_per_seq = alpha_table(alphas, x.shape[0], rows, x.device)
    return HiddenMixFunction.apply(x, table, rows_per_seq, *ys)
