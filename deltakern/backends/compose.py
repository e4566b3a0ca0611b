"""GEMM compositions of the LoRA / DoRA / frozen-linear products, shared by the CPU implementation of
the `deltakern::lora_*`, `linear_*` and `dora_*` ops (deltakern.backends.cpu_blas, BLAS) and the
layers' composition path (deltakern.autograd, cuBLAS on CUDA).

Each output is written by as few passes as the GEMMs allow:

    out = b + s (xa B^T)        the small rank-r term first (the bias broadcast into it), then
    out += x W^T                the big GEMM adds into it (addmm_, beta = 1: out is read once
                                inside the GEMM instead of by a separate add / addmm_ pass)

and likewise dX = s dyb A [masked], then dX += dY W. DoRA's column scale g goes into whichever
is smaller, the [N, K] weight (g * W, when K <= M, or in place on a weight that is already a
scratch copy, e.g. a dequantized NF4 W) or the [M, N] operand (y *= g, dY * g otherwise).

The rank-r products (x A^T, dY B, the rank-r terms, dyb^T x, xa^T dY with sum dY) are the
`deltakern::lowrank_*` ops (deltakern.ops.lowrank): on the CPU, for fp32 and r <= 64, the native
kernels (one streaming pass over the large operand); otherwise BLAS, in the layouts it runs fastest
(r as the row dimension of the result on the CPU).

Rounding: everything is in the operands' dtype with the BLAS's own accumulator; the CPU ops call
these with fp32 operands (fp16 / bf16 inputs upcast, one rounding at the end). The sums are those
of the docstrings, added in another order than the references' separate passes (fp32 rounding;
the tests bound the difference against float64).
"""

from __future__ import annotations

from typing import Optional

import torch

from deltakern.ops import lowrank

_COLSUM_CHUNK = 2**16  # elements of a row chunk of [M, N] in `col_sums` (256 KiB of fp32, cache resident)


def rank_term(xa: torch.Tensor, B: torch.Tensor, s: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """b + s xa B^T  [M, N] (xa [M, r], B [N, r]): one rank-r product, the bias broadcast into its output."""
    bt = B.t().contiguous() if B.device.type == "cpu" else B.t()  # [r, N] rows: the fast layout for BLAS
    return lowrank.gb(xa, bt, s, bias)


def lora_out(x, w, bias, xa, B, s: float) -> torch.Tensor:
    """x W^T + s xa B^T + b: the rank-r term (and b) first, then the big GEMM adds into it."""
    return rank_term(xa, B, s, bias).addmm_(x, w.t())


def lora_dx(dy, w, dyb, A, s: float, keep: Optional[torch.Tensor] = None, ms: float = 1.0) -> torch.Tensor:
    """dY W + s (dyb A) [* keep * ms]: the rank-r term first, then the big GEMM adds into it."""
    lora = lowrank.gb(dyb, A, s)
    if keep is not None:
        lora = torch.where(keep, lora * ms, 0.0).to(dy.dtype)
    return lora.addmm_(dy, w)


def lora_db_dB(dy, xa, s: float, need_b: bool):
    """(s dY^T xa [N, r], sum_rows dY [N] or None) from one pass over dY (`deltakern::lowrank_gtx`)."""
    return lowrank.gtx(xa, dy, s, colsum=need_b, transpose=True)


def scale_w(M: int, K: int, w_scratch: bool) -> bool:
    """Whether DoRA's column scale g goes into W ([N, K]) rather than the [M, N] operand: when W is a
    scratch copy (scaled in place, no extra buffer) or no larger than the [M, N] operand (K <= M)."""
    return w_scratch or K <= M


def scaled_rows(w: torch.Tensor, g: torch.Tensor, in_place: bool) -> torch.Tensor:
    """g[:, None] * w (in place when allowed)."""
    return w.mul_(g[:, None]) if in_place else w * g[:, None]


def dora_out(x, w, bias, xa, B, g, s: float, w_scratch: bool = False) -> torch.Tensor:
    """g * (x W^T + s xa B^T) + b with g already in x's dtype, folded into the GEMM operands:
    b + s xa (g B)^T first, then += x (g W)^T, or (x W^T) * g when scaling W would touch more bytes."""
    gB = B * g[:, None]
    if scale_w(x.shape[0], x.shape[1], w_scratch):
        return rank_term(xa, gB, s, bias).addmm_(x, scaled_rows(w, g, w_scratch).t())
    out = torch.mm(x, w.t()).mul_(g)
    out.addmm_(xa, gB.t(), alpha=s)
    return out if bias is None else out.add_(bias)


def dora_dx(dy, w, dyb, A, g, s: float, w_scratch: bool = False) -> torch.Tensor:
    """(dY * g) W + s dyb A = dY (g W) + s dyb A, the scale in whichever operand is smaller."""
    if scale_w(dy.shape[0], w.shape[1], w_scratch):
        return lora_dx(dy, scaled_rows(w, g, w_scratch), dyb, A, s)
    return lora_dx(dy * g, w, dyb, A, s)


def col_sums(dy: torch.Tensor, y: Optional[torch.Tensor], bias: Optional[torch.Tensor], want_db: bool):
    """(sum_rows dY or None, sum_rows dY * (y - b) or None), fp32 [N], in row chunks small enough to
    stay in cache (dY and y are each read once; the temporaries are one chunk)."""
    M, N = dy.shape
    db = torch.zeros(N, dtype=torch.float32, device=dy.device) if want_db else None
    c = torch.zeros(N, dtype=torch.float32, device=dy.device) if y is not None else None
    bf = None if bias is None else bias.float()
    step = max(1, _COLSUM_CHUNK // max(N, 1))
    for lo in range(0, M, step):
        d = dy[lo:lo + step].float()
        if want_db:
            db += d.sum(0)
        if y is not None:
            yc = y[lo:lo + step].float()  # a view when y is fp32: never written
            t = yc * d if bf is None else torch.sub(yc, bf).mul_(d)
            c += t.sum(0)
    return db, c
