"""Triton kernels of the hidden mix `out = x + sum_i a_i * (y_i - x)`, forward and backward, k <= MAX_K outputs.

One pass over memory: x and each y_i are read once and `out` written once (backward: the gradient read once,
dx and every dy_i written once). Numbers for alpha are plain kernel arguments; per-sequence alphas are a float32
table [k, n_seq] on the device, and row r of the flattened [R, H] input belongs to sequence r // rows_per_seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .dispatch import MAX_TERMS as MAX_K  # the kernels below have MAX_K = 4 output slots, Y0..Y3
from .hidden_mix import to_device_async


@triton.jit
def _alpha(A, a, i, seq, NSEQ, PER_SEQ: tl.constexpr):
    # alpha of term i for sequence `seq`: column `seq` of row i of the table A, or the scalar argument `a`
    if PER_SEQ:
        return tl.load(A + i * NSEQ + seq)
    return a


@triton.jit
def _hidden_mix_fwd(X, Y0, Y1, Y2, Y3, A, a0, a1, a2, a3, OUT, H, RPS, NSEQ, K: tl.constexpr, PER_SEQ: tl.constexpr,
                    BLOCK: tl.constexpr):
    # X: [R, H] input rows; Y0..Y3: [R, H] adapter outputs (slots >= K are never read); A: [K, NSEQ] float32
    # alphas, read only with PER_SEQ (else a0..a3, plain float arguments: no table to copy to the device); OUT:
    # [R, H]; H: row width; RPS: rows per sequence (row r uses column r // RPS of A); NSEQ: columns of A; K: number
    # of outputs; BLOCK: columns per program. Grid: (R, cdiv(H, BLOCK)).
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    offs = row.to(tl.int64) * H + cols
    seq = row // RPS
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    acc = x
    if K > 0:
        acc += _alpha(A, a0, 0, seq, NSEQ, PER_SEQ) * (tl.load(Y0 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 1:
        acc += _alpha(A, a1, 1, seq, NSEQ, PER_SEQ) * (tl.load(Y1 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 2:
        acc += _alpha(A, a2, 2, seq, NSEQ, PER_SEQ) * (tl.load(Y2 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    if K > 3:
        acc += _alpha(A, a3, 3, seq, NSEQ, PER_SEQ) * (tl.load(Y3 + offs, mask=mask, other=0.0).to(tl.float32) - x)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _hidden_mix_bwd(G, DX, DY0, DY1, DY2, DY3, A, a0, a1, a2, a3, H, RPS, NSEQ, K: tl.constexpr,
                    PER_SEQ: tl.constexpr, BLOCK: tl.constexpr):
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
        a = _alpha(A, a0, 0, seq, NSEQ, PER_SEQ)
        tl.store(DY0 + offs, (g * a).to(DY0.dtype.element_ty), mask=mask)
        total += a
    if K > 1:
        a = _alpha(A, a1, 1, seq, NSEQ, PER_SEQ)
        tl.store(DY1 + offs, (g * a).to(DY1.dtype.element_ty), mask=mask)
        total += a
    if K > 2:
        a = _alpha(A, a2, 2, seq, NSEQ, PER_SEQ)
        tl.store(DY2 + offs, (g * a).to(DY2.dtype.element_ty), mask=mask)
        total += a
    if K > 3:
        a = _alpha(A, a3, 3, seq, NSEQ, PER_SEQ)
        tl.store(DY3 + offs, (g * a).to(DY3.dtype.element_ty), mask=mask)
        total += a
    tl.store(DX + offs, (g * (1.0 - total)).to(DX.dtype.element_ty), mask=mask)


def alpha_args(
    alphas: Sequence[Union[float, torch.Tensor]], batch: int, rows: int, device: torch.device
) -> tuple[Optional[torch.Tensor], tuple[float, ...], int]:
    """(table, scalars, rows_per_seq): numbers go to the kernel as `MAX_K` float arguments and no table (None);
    any per-sequence alpha makes a [k, batch] float32 table on `device` (one row per term, numbers repeated)."""
    if len(alphas) > MAX_K:
        raise ValueError(f"the Triton hidden mix takes at most {MAX_K} terms, got {len(alphas)}; use hidden_mix().")
    if any(isinstance(a, torch.Tensor) for a in alphas):
        # built where the alphas are (CPU, as `peft_clm.alpha` makes them), then one copy without a host sync
        where = next((a.device for a in alphas if isinstance(a, torch.Tensor) and a.device.type != "cpu"), None)
        where = where or torch.device("cpu")
        cols = [
            a.to(where, torch.float32) if isinstance(a, torch.Tensor) else torch.full((batch,), float(a), device=where)
            for a in alphas
        ]
        for c in cols:
            if c.shape != (batch,):
                raise ValueError(f"a per-row alpha needs shape ({batch},), got {tuple(c.shape)}.")
        return to_device_async(torch.stack(cols), device), (0.0,) * MAX_K, rows // batch
    return None, tuple(float(a) for a in alphas) + (0.0,) * (MAX_K - len(alphas)), rows


def _block(h: int) -> int:
    return min(4096, triton.next_power_of_2(h))


class HiddenMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: Optional[torch.Tensor], scalars: tuple, rows_per_seq: int,
                *ys: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        x2 = x.contiguous().view(-1, H)
        y2 = [y.contiguous().view(-1, H) for y in ys]
        out = torch.empty_like(x2)
        pad = y2 + [x2] * (MAX_K - len(y2))
        block = _block(H)
        grid = (x2.shape[0], triton.cdiv(H, block))
        per_seq = table is not None
        _hidden_mix_fwd[grid](x2, *pad, table if per_seq else x2, *scalars, out, H, rows_per_seq,
                              table.shape[1] if per_seq else 1, K=len(ys), PER_SEQ=per_seq, BLOCK=block)
        ctx.save_for_backward(table)
        ctx.scalars, ctx.rows_per_seq, ctx.k, ctx.shape = scalars, rows_per_seq, len(ys), x.shape
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
        per_seq = table is not None
        _hidden_mix_bwd[grid](g2, dx, *pad, table if per_seq else g2, *ctx.scalars, H, ctx.rows_per_seq,
                              table.shape[1] if per_seq else 1, K=ctx.k, PER_SEQ=per_seq, BLOCK=block)
        return (dx.view(ctx.shape), None, None, None, *[d.view(ctx.shape) for d in dys])


def hidden_mix_triton(x: torch.Tensor, ys: Sequence[torch.Tensor], alphas) -> torch.Tensor:
    """Triton `x + sum_i alphas[i] * (ys[i] - x)`; differentiable in x and ys (alpha is not trained)."""
    if len(ys) != len(alphas):
        raise ValueError(f"{len(ys)} outputs but {len(alphas)} alphas.")
    for y in ys:
        if y.shape != x.shape or y.dtype != x.dtype:
            raise ValueError(f"outputs must match the input's shape and dtype, got {tuple(y.shape)} {y.dtype}.")
    rows = x.numel() // x.shape[-1]
    table, scalars, rows_per_seq = alpha_args(alphas, x.shape[0], rows, x.device)
    return HiddenMixFunction.apply(x, table, scalars, rows_per_seq, *ys)
