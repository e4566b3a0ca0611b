"""DoRA / QDoRA ops: `deltakern::dora_norm_parts`, `dora_fwd`, `dora_bwd`, `dora_colsum`, `dora_ctw`.

Notation: x [M, K], W [N, K] frozen, A [r, K], B [N, r], s = scaling, g [N] fp32 = m / ||W + s B A||
(the column scale), keep [M, K] bool dropout keep-mask or None, x_d = keep * x / (1 - p) rounded
to x's dtype (x itself without a mask), xa = x_d A^T.

    dora_norm_parts  (W A^T fp32 [N, r], ||W_j||^2 fp32 [N] or [0])               one pass over W
    dora_fwd         y = g * (x W^T + s xa B^T) + b                                  (no mask)
                     y = x W^T + (g - 1) * (x_d W^T) + g * s xa B^T + b              (mask: PEFT's form)
    dora_bwd         dx = (dy * g) W + s dyb A                                       (no mask)
                     dx = dy W + keep/(1-p) * ((dy * (g - 1)) W + s dyb A)           (mask)
                     db = sum_rows dy (fp32),  c = sum_rows dy * (y - b) (fp32, when y is given)
                     with dyb = (dy * g) B; compute_dx = 0 gives only the column sums
    dora_colsum      c_j = sum_i dy_ij z_ij,  z = x_d W^T + s xa B^T  (fp32 [N]; only the columns
                     where `cols` is set, 0 elsewhere, when `cols` is given)
    dora_ctw         C^T W (fp32 [r, K]) for C [N, r]

W is dense (`absmax`, `code` None) or NF4 (`weight` = packed bytes, `absmax` = decoded fp32 block
scales, `code` = 16 fp32 levels, N/K/blocksize describe it); NF4 is dequantized to the compute
dtype. Every op accumulates in fp32 and rounds its dtype outputs once; `dy * g` and `dy * (g - 1)`
are rounded to the compute dtype before their matmul (as the kernels do, in registers).

CPU: fp32 BLAS compositions (deltakern.ops.compose; fp16 / bf16 inputs upcast, outputs rounded
once): g folded into W or into the [M, N] operand, whichever is smaller, the rank-r term first and
the big GEMM adding into it, the column sums in one cache-resident pass over dy and y, and
`dora_colsum` with a column mask computing only the masked columns. The dropout (keep-mask) forms
run the pure-torch references below, which are the oracle for every implementation. CUDA: the
Triton kernels in deltakern.triton_kernels.linear and .dora. Every op has a fake kernel.
"""

import importlib
from typing import Optional

import torch

from deltakern import _backend
from deltakern.ops import compose
from deltakern.ops.linear import cpu_weight, dense_weight, f32, nf4_args, use_kernels


def _linear_kernels():
    _backend.require_triton()
    return importlib.import_module("deltakern.triton_kernels.linear")


def _dora_kernels():
    _backend.require_triton()
    return importlib.import_module("deltakern.triton_kernels.dora")


def _mask_scale(keep, x, mask_scale):
    return x if keep is None else torch.where(keep.bool(), x * mask_scale, 0.0).to(x.dtype)


def _f(t):
    """fp32 for the references' accumulators, float64 when the input already is (tests' oracle)."""
    return t if t.dtype == torch.float64 else t.float()


# ---- references -----------------------------------------------------------------------------


def dora_norm_parts_ref(weight, lora_A, compute_sumsq: bool = True):
    with torch.autocast(weight.device.type, enabled=False):
        wf = _f(weight)
        wa = torch.mm(wf, _f(lora_A).t())
        return wa, (wf.square().sum(1) if compute_sumsq else wf.new_empty((0,)))


def dora_fwd_ref(x, weight, bias, xa, lora_B, g, keep, scaling: float, mask_scale: float):
    with torch.autocast(x.device.type, enabled=False):
        wt = _f(weight).t()
        acc = torch.mm(_f(_mask_scale(keep, x, mask_scale)), wt)
        z = acc + scaling * torch.mm(_f(xa), _f(lora_B).t())
        out = z * g
        if keep is not None:
            out += torch.mm(_f(x), wt) - acc
        if bias is not None:
            out += _f(bias)
        return out.to(x.dtype)


def dora_bwd_ref(dy, weight, dyb, lora_A, g, keep, y, bias, scaling: float, mask_scale: float,
                 compute_dx: bool = True, compute_db: bool = True):
    with torch.autocast(dy.device.type, enabled=False):
        dyf = _f(dy)
        dx = dy.new_empty((0,))
        if compute_dx:
            wf = _f(weight)
            lora = scaling * torch.mm(_f(dyb), _f(lora_A))
            if keep is None:
                dx = torch.mm(_f((dyf * g).to(dy.dtype)), wf) + lora
            else:
                inner = torch.mm(_f((dyf * (g - 1.0)).to(dy.dtype)), wf) + lora
                dx = torch.mm(dyf, wf) + torch.where(keep.bool(), inner * mask_scale, 0.0)
            dx = dx.to(dy.dtype)
        db = dyf.sum(0) if compute_db else dyf.new_empty((0,))
        if y is None:
            c = dyf.new_empty((0,))
        else:
            yb = _f(y) if bias is None else _f(y) - _f(bias)
            c = (dyf * yb).sum(0)
        return dx, db, c


def dora_colsum_ref(dy, x, weight, keep, xa, lora_B, scaling: float, mask_scale: float, cols=None):
    with torch.autocast(dy.device.type, enabled=False):
        z = torch.mm(_f(_mask_scale(keep, x, mask_scale)), _f(weight).t())
        z += scaling * torch.mm(_f(xa), _f(lora_B).t())
        c = (_f(dy) * z).sum(0)
        return c if cols is None else torch.where(cols.bool(), c, 0.0)


def dora_ctw_ref(c, weight):
    with torch.autocast(c.device.type, enabled=False):
        return torch.mm(_f(c).t(), _f(weight))


def dora_norm_parts_cpu(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq: bool):
    """`dora_norm_parts` on the CPU: W A^T as (A W^T)^T (the fast BLAS layout), fp32; ||W_j||^2 as the reference."""
    w, _ = cpu_weight(weight, absmax, code, N, K, blocksize, lora_A.dtype)
    wa = compose.small_mm_t(w, f32(lora_A)).contiguous().float()
    sq = w.square().sum(1).float() if compute_sumsq else wa.new_empty((0,))
    return wa, sq


def dora_fwd_cpu(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    """`dora_fwd` on the CPU: without a mask, g * (x W^T + s xa B^T) + b with g folded into the GEMM
    operands (compose.dora_out), fp32; with a mask, the reference."""
    if keep is not None:
        return dora_fwd_ref(x, dense_weight(weight, absmax, code, N, K, blocksize, x.dtype), bias, xa, lora_B, g, keep,
                            scaling, mask_scale)
    w, scratch = cpu_weight(weight, absmax, code, N, K, blocksize, x.dtype)
    gf = g if w.dtype == g.dtype else g.to(w.dtype)
    return compose.dora_out(f32(x), w, f32(bias), f32(xa), f32(lora_B), gf, scaling, scratch).to(x.dtype)


def dora_bwd_cpu(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
                 compute_dx: bool, compute_db: bool):
    """`dora_bwd` on the CPU: dx = dY (g W) + s dyb A (compose.dora_dx; the reference with a mask), and
    db, c from one cache-resident pass over dY and y (compose.col_sums)."""
    dx = dy.new_empty((0,))
    if compute_dx and keep is not None:
        w = dense_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
        dx = dora_bwd_ref(dy, w, dyb, lora_A, g, keep, None, None, scaling, mask_scale, True, False)[0]
    elif compute_dx:
        w, scratch = cpu_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
        gf = g if w.dtype == g.dtype else g.to(w.dtype)
        dx = compose.dora_dx(f32(dy), w, f32(dyb), f32(lora_A), gf, scaling, scratch).to(dy.dtype)
    db, c = compose.col_sums(dy, y, bias, bool(compute_db))
    empty = lambda: dy.new_empty((0,), dtype=torch.float32)  # noqa: E731  (outputs must not alias)
    return dx, (db if db is not None else empty()), (c if c is not None else empty())


def dora_colsum_cpu(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    """`dora_colsum` on the CPU: the reference over the selected columns only (none selected: no GEMM)."""
    if cols is None:
        w = dense_weight(weight, absmax, code, N, K, blocksize, x.dtype)
        return dora_colsum_ref(dy, x, w, keep, xa, lora_B, scaling, mask_scale).float()
    idx = cols.bool().nonzero().flatten()
    out = dy.new_zeros((N,), dtype=torch.float32)
    if idx.numel() == 0:
        return out
    w = dense_weight(weight, absmax, code, N, K, blocksize, x.dtype)[idx]
    c = dora_colsum_ref(dy[:, idx], x, w, keep, xa, lora_B[idx], scaling, mask_scale)
    return out.index_put_((idx,), c.float())


# ---- ops ------------------------------------------------------------------------------------


@torch.library.custom_op("deltakern::dora_norm_parts", mutates_args=())
def dora_norm_parts(
    weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor], N: int, K: int,
    blocksize: int, lora_A: torch.Tensor, compute_sumsq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W A^T fp32 [N, r], ||W_j||^2 fp32 [N] or [0]); W in lora_A's dtype."""
    if use_kernels(lora_A):
        wa, sq = _dora_kernels().norm_parts(weight, lora_A, N, nf4=nf4_args(absmax, code, blocksize),
                                            want_sumsq=bool(compute_sumsq))
        return wa, (sq if sq is not None else wa.new_empty((0,)))
    return dora_norm_parts_cpu(weight, absmax, code, N, K, blocksize, lora_A, bool(compute_sumsq))


@dora_norm_parts.register_fake
def _(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq):
    f32 = torch.float32
    return lora_A.new_empty((N, lora_A.shape[0]), dtype=f32), lora_A.new_empty((N if compute_sumsq else 0,), dtype=f32)


@torch.library.custom_op("deltakern::dora_fwd", mutates_args=())
def dora_fwd(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor], xa: torch.Tensor, lora_B: torch.Tensor,
    g: torch.Tensor, keep: Optional[torch.Tensor], scaling: float, mask_scale: float,
) -> torch.Tensor:
    """DoRA output [M, N] (see the module docstring)."""
    if use_kernels(x):
        return _linear_kernels().frozen_forward(x, weight, N, nf4=nf4_args(absmax, code, blocksize), bias=bias,
                                                lora=(xa, lora_B, scaling), g=g, keep=keep, mask_scale=mask_scale)
    return dora_fwd_cpu(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale)


@dora_fwd.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::dora_bwd", mutates_args=())
def dora_bwd(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, dyb: torch.Tensor, lora_A: torch.Tensor, g: torch.Tensor,
    keep: Optional[torch.Tensor], y: Optional[torch.Tensor], bias: Optional[torch.Tensor], scaling: float,
    mask_scale: float, compute_dx: int, compute_db: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K] or [0], db fp32 [N] or [0], c fp32 [N] or [0]) (see the module docstring)."""
    if use_kernels(dy):
        run_dx = bool(compute_dx)  # the dx-only inputs are not even looked at without dx
        dx, db, c = _linear_kernels().frozen_backward(
            dy, weight, K, nf4=nf4_args(absmax, code, blocksize), compute_dx=run_dx, g=g if run_dx else None,
            lora=(dyb, lora_A, scaling) if run_dx else None, keep=keep if run_dx else None, mask_scale=mask_scale,
            want_db=bool(compute_db), y=y, bias=bias if y is not None else None)
        empty = lambda t, dt: t if t is not None else dy.new_empty((0,), dtype=dt)  # noqa: E731
        return empty(dx, dy.dtype), empty(db, torch.float32), empty(c, torch.float32)
    return dora_bwd_cpu(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling,
                        mask_scale, bool(compute_dx), bool(compute_db))


@dora_bwd.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
      compute_dx, compute_db):
    f32 = torch.float32
    return (dy.new_empty((dy.shape[0], K) if compute_dx else (0,)),
            dy.new_empty((N if compute_db else 0,), dtype=f32), dy.new_empty((N if y is not None else 0,), dtype=f32))


@torch.library.custom_op("deltakern::dora_colsum", mutates_args=())
def dora_colsum(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
    code: Optional[torch.Tensor], N: int, K: int, blocksize: int, keep: Optional[torch.Tensor], xa: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, mask_scale: float, cols: Optional[torch.Tensor],
) -> torch.Tensor:
    """c = sum_rows dy * (x_d W^T + s xa B^T), fp32 [N] (masked by `cols` when given)."""
    if use_kernels(dy):
        return _linear_kernels().frozen_forward(x, weight, N, nf4=nf4_args(absmax, code, blocksize),
                                                lora=(xa, lora_B, scaling), keep=keep, mask_scale=mask_scale,
                                                colsum=dy, cols=cols)
    return dora_colsum_cpu(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols)


@dora_colsum.register_fake
def _(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    return dy.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("deltakern::dora_ctw", mutates_args=())
def dora_ctw(
    c: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int,
) -> torch.Tensor:
    """C^T W, fp32 [r, K]; c [N, r] in the compute dtype."""
    if use_kernels(c):
        return _dora_kernels().ctw(c, weight, K, nf4=nf4_args(absmax, code, blocksize))
    return dora_ctw_ref(c, dense_weight(weight, absmax, code, N, K, blocksize, c.dtype)).float()


@dora_ctw.register_fake
def _(c, weight, absmax, code, N, K, blocksize):
    return c.new_empty((c.shape[1], K), dtype=torch.float32)
