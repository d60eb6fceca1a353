"""Triton kernel of the weight mix `out = w0 + sum_i a_i * (w_i - w0)`, k <= MAX_K, one pass, written into `out`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .dispatch import MAX_TERMS as MAX_K  # the kernel below has MAX_K = 4 weight slots, W1..W4


@triton.jit
def _weight_mix(W0, W1, W2, W3, W4, OUT, N, a1, a2, a3, a4, K: tl.constexpr, BLOCK: tl.constexpr):
    # W0: the identity weights, flat [N]; W1..W4: adapter weights (slots > K never read); OUT: [N], may alias no
    # input; a1..a4: float alphas; K: number of adapters; BLOCK: elements per program. Grid: (cdiv(N, BLOCK),).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w0 = tl.load(W0 + offs, mask=mask, other=0.0).to(tl.float32)
    acc = w0
    if K > 0:
        acc += a1 * (tl.load(W1 + offs, mask=mask, other=0.0).to(tl.float32) - w0)
    if K > 1:
        acc += a2 * (tl.load(W2 + offs, mask=mask, other=0.0).to(tl.float32) - w0)
    if K > 2:
        acc += a3 * (tl.load(W3 + offs, mask=mask, other=0.0).to(tl.float32) - w0)
    if K > 3:
        acc += a4 * (tl.load(W4 + offs, mask=mask, other=0.0).to(tl.float32) - w0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def weight_mix_triton(w0: torch.Tensor, ws: Sequence[torch.Tensor], alphas: Sequence[float],
                      out: torch.Tensor) -> torch.Tensor:
    if len(ws) != len(alphas):
        raise ValueError(f"{len(ws)} weights but {len(alphas)} alphas.")
    for t in (*ws, out):
        if t.shape != w0.shape:
            raise ValueError(f"shape {tuple(t.shape)} differs from the base shape {tuple(w0.shape)}.")
    flat = [t.contiguous().view(-1) for t in (w0, *ws)]
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    pad = flat[1:] + [flat[0]] * (MAX_K - len(ws))
    a = [float(x) for x in alphas] + [0.0] * (MAX_K - len(alphas))
    n = flat[0].numel()
    block = 1024
    _weight_mix[(triton.cdiv(n, block),)](flat[0], *pad, target.view(-1), n, *a, K=len(ws), BLOCK=block)
    if target is not out:
        out.copy_(target)
    return out
