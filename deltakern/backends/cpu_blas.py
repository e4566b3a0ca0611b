"""CPU implementations of the layer ops, registered as the `cpu` backend of

    linear_fwd, linear_bwd, lora_fwd, lora_fwd_nf4, lora_dx, lora_dx_nf4, lora_fwd_xa, lora_dx_dyb,
    dora_norm_parts, dora_fwd, dora_bwd, dora_colsum, dora_fwd_xa, dora_bwd_dyb

so a CPU call runs them by default (`DELTAKERN_BACKEND=torch` still runs the references, the oracle).

* The large products run on the native packed GEMM (`deltakern._cpu_ext.gemm`) when `_gemm` says so
  (extension loaded, AVX2 / AVX-512, M > 16, at least GEMM_MIN_WORK multiply-adds): the rank-r term
  rides as r more steps of its K loop and DoRA's column scale and the bias go into its last pass,
  so y = (x W^T + s xa B^T) [* g] + b and dX = dY W + s dyb A are each one pass over their output;
  an NF4 W is decoded while packed (fp32 inputs), never built; lora_fwd_xa / dora_fwd_xa and
  lora_dx_dyb / dora_bwd_dyb also compute xa = x A^T / dyb = dY B ((dY * g) B) from the GEMM's packed
  tiles of x / dY. Otherwise they are composed of torch's fp32 matmuls as in
  `deltakern.backends.compose`: the rank-r term (and the bias) first, the big GEMM adding into it
  (beta = 1); DoRA's g folded into W or into the [M, N] operand, whichever is smaller.
* DoRA's db and c = sum dY (y - b) come from one native pass (which also forms dY * g); without the
  extension a cache-resident torch loop. dora_colsum with a column mask computes only those columns.
* Everything is computed in fp32: fp16 / bf16 inputs are upcast and the outputs rounded once (what
  the references do; a CPU without half-precision units runs fp32 far faster). float64 inputs
  (tests) stay float64 (BLAS).
* With the native extension loaded (fp32 / fp16 / bf16 inputs): an NF4 W that the GEMM cannot decode
  itself (fp16 / bf16 inputs: W rounded to their dtype; K % 8 != 0; BLAS paths) is decoded into its
  reused per-thread fp32 workspace (`_weight`), and for M <= 16 rows (decode) linear_* and
  lora_*_nf4 run its NF4 matmuls, which read W as 4-bit. Without it, the reference decode builds W
  per call.
* The dropout (keep-mask) forms of dora_fwd / dora_bwd run the references; a masked lora_dx, BLAS.
"""

from __future__ import annotations

import torch

from deltakern._autocast import autocast_off
from deltakern import _cpu_ext
from deltakern.backends import compose
from deltakern.backends.reference import dora as ref_dora
from deltakern.backends.reference._util import dense_weight_ref
from deltakern.backends.registry import register
from deltakern.ops import lowrank

DEVICES = ("cpu",)


KIND = "fp32: the native packed GEMM and NF4 kernels where built, BLAS compositions otherwise"


def _cpu(op):
    return register(op, "cpu", DEVICES, kind=KIND)


def f32(t):
    """t as an fp32 GEMM operand: itself when fp32 or float64, else upcast; None stays None."""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


def _round(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _native(dtype) -> bool:
    """Whether the native NF4 kernels take inputs of this dtype here (extension loaded; not float64)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and _cpu_ext.available()


def _decode(M: int, K: int, blocksize: int, dtype) -> bool:
    """Whether the native NF4 matmuls (W read as 4-bit, M <= 16) run this call."""
    return _native(dtype) and _cpu_ext.decode_supported(M, K, blocksize)


GEMM_MIN_WORK = 1 << 25  # multiply-adds below which BLAS (unpacked small-M kernels) beats the native GEMM


def _gemm(M: int, N: int, K: int, dtype, r: int = 0) -> bool:
    """Whether the native packed GEMM (deltakern._cpu_ext.gemm: the rank-r term, a column scale and the
    bias in the same pass, an NF4 W decoded while packed) runs an [M, K] x [K, N] product (+ a rank-r
    term): extension loaded with a vector unit (AVX2 / AVX-512; the portable build leaves GEMMs to
    BLAS), fp32 / fp16 / bf16 operands, M > 16 (smaller M: the decode kernels or BLAS's GEMV), r <= 64
    and at least GEMM_MIN_WORK multiply-adds (smaller products run faster in BLAS)."""
    return _native(dtype) and M >= _cpu_ext.GEMM_MIN_M and M * N * K >= GEMM_MIN_WORK \
        and r <= _cpu_ext.MAX_LOWRANK_R and _cpu_ext.gemm_fast()


LINEAR_NATIVE_MIN_WORK = 1 << 30  # multiply-adds per GEMM from which a dense BitFit layer takes the native GEMM


def native_linear(M: int, N: int, K: int, dtype) -> bool:
    """Whether a dense frozen linear (BitFit) on the CPU runs these ops (the native GEMM) rather than
    torch's own F.linear, whose autograd is C++: the native GEMM saves a few % of each of its two
    GEMMs, the autograd Function and these ops' checks cost about 0.2-0.4 ms a step (more when other
    layers ran in between and evicted them from cache), so it pays from about 2^30 multiply-adds a
    GEMM (measured: M=512, K=N=1024 ran 1.05x the frozen layer through the Function and 1.02x
    through F.linear; M=1024, K=N=2048 0.93x and 1.01x)."""
    return M * N * K >= LINEAR_NATIVE_MIN_WORK and _gemm(M, N, K, dtype)


def _nf4_packed(packed, absmax, code, N: int, K: int, blocksize: int, dtype):
    """The `nf4=` operand of _cpu_ext.gemm (W decoded while packed), or None when W must be decoded to
    the workspace first: inputs not fp32 (W rounded to their dtype) or K % 8 != 0."""
    if dtype != torch.float32 or K % 8:
        return None
    return (packed, absmax, code, N, K, blocksize)


def _weight(weight, absmax, code, N: int, K: int, blocksize: int, dtype):
    """(W [N, K] as an fp32 (float64) GEMM operand, whether it is a scratch copy the caller may overwrite).
    Dense: W itself (upcast when half). NF4: the native extension's per-thread workspace (valid until
    the next decode on this thread: used for one op, never returned or saved), or else the reference
    decode to `dtype`, upcast (float64 too); both hold cast_dtype(fp32(code * absmax))."""
    if absmax is None:
        w = f32(weight)
        return w, w is not weight
    if _native(dtype):
        return _cpu_ext.dense_weight_fp32(weight, absmax, code, N, K, blocksize, round_to=dtype), True
    return f32(dense_weight_ref(weight, absmax, code, N, K, blocksize, dtype)), True


# ---- frozen linear (BitFit) -------------------------------------------------------------------


def _dense_product(a, w, b_t: bool, bias=None, a2=None, b2=None, b2_t: bool = False, scale2: float = 1.0):
    """fp32 bias + a . op(W) + scale2 * a2 . op2(b2) for a ready fp32 (float64) W [N, K], op(W) = W^T
    (b_t: y = x W^T) or W (dX = dY W), op2(b2) = b2^T (b2_t) or b2: the native GEMM when `_gemm` says so
    (the rank-r term as r more steps, the bias in its last pass), else BLAS (the rank-r term and bias
    first, then the big product adds into them)."""
    (M, K), N = a.shape, (w.shape[0] if b_t else w.shape[1])
    r = 0 if a2 is None else a2.shape[1]
    if w.dtype == torch.float32 and _gemm(M, N, K, a.dtype, r):
        return _cpu_ext.gemm(f32(a), w, b_t=b_t, bias=f32(bias), a2=f32(a2), b2=f32(b2), b2_t=b2_t, scale2=scale2)
    wt = w.t() if b_t else w
    if a2 is None:
        return torch.mm(f32(a), wt) if bias is None else torch.addmm(f32(bias), f32(a), wt)
    term = lowrank.gb(f32(a2), f32(b2).t().contiguous() if b2_t else f32(b2), scale2, f32(bias))
    return term.addmm_(f32(a), wt)


def _gemm_weight(weight, absmax, code, N: int, K: int, blocksize: int, dtype):
    """(w, nf4): W as the native GEMM takes it. An NF4 W it can decode while packing (`_nf4_packed`) as
    (None, its nf4= operand), else (the fp32 W of `_weight`: dense, or the decoded workspace, None)."""
    nf4 = None if absmax is None else _nf4_packed(weight, absmax, code, N, K, blocksize, dtype)
    return (None if nf4 is not None else _weight(weight, absmax, code, N, K, blocksize, dtype)[0]), nf4


def _on_gemm(a, weight, absmax, code, N: int, K: int, blocksize: int, dtype, b_t: bool, **terms):
    """_cpu_ext.gemm(a, op(W), **terms) for a dense or NF4 W [N, K] as the layer ops receive it (the caller
    checked `_gemm`): an NF4 W decoded while packed where it can be (`_gemm_weight`); the tensors of
    `terms` (bias, a2, b2, col_scale, proj) as fp32."""
    w, nf4 = _gemm_weight(weight, absmax, code, N, K, blocksize, dtype)
    kw = {k: f32(v) if isinstance(v, torch.Tensor) else v for k, v in terms.items()}
    return _cpu_ext.gemm(f32(a), w, nf4=nf4, b_t=b_t, **kw)


def _product(a, weight, absmax, code, N: int, K: int, blocksize: int, dtype, b_t: bool, bias=None, a2=None, b2=None,
             b2_t: bool = False, scale2: float = 1.0):
    """_dense_product for a dense or NF4 W [N, K] as the layer ops receive it: `_on_gemm` when `_gemm`
    says so, else BLAS on W as `_weight` gives it."""
    r = 0 if a2 is None else a2.shape[1]
    if _gemm(a.shape[0], N, K, dtype, r):
        return _on_gemm(a, weight, absmax, code, N, K, blocksize, dtype, b_t, bias=bias, a2=a2, b2=b2, b2_t=b2_t,
                        scale2=scale2)
    return _dense_product(a, _weight(weight, absmax, code, N, K, blocksize, dtype)[0], b_t, bias, a2, b2, b2_t, scale2)


@_cpu("linear_fwd")
def linear_fwd(x, weight, absmax, code, N, K, blocksize, bias):
    """b + x W^T as one GEMM (the bias added as its tiles are stored); NF4 decode: the native matmul."""
    if absmax is not None and _decode(x.shape[0], K, blocksize, x.dtype):
        return _cpu_ext.nf4_matmul(x, weight, absmax, code, N, K, blocksize, bias)
    with autocast_off("cpu"):
        return _round(_product(x, weight, absmax, code, N, K, blocksize, x.dtype, True, bias), x.dtype)


@_cpu("linear_bwd")
def linear_bwd(dy, weight, absmax, code, N, K, blocksize, compute_db):
    with autocast_off("cpu"):
        if absmax is not None and _decode(dy.shape[0], K, blocksize, dy.dtype):
            dx = _cpu_ext.nf4_matmul_dx(dy, weight, absmax, code, N, K, blocksize)
        else:
            dx = _round(_product(dy, weight, absmax, code, N, K, blocksize, dy.dtype, False), dy.dtype)
        return dx, (_round(f32(dy).sum(0), dy.dtype) if compute_db else dy.new_empty((0,)))


# ---- LoRA ---------------------------------------------------------------------------------------


def _lora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    """x W^T + b + s xa B^T (the rank-r term as r more steps of the native GEMM, or first by BLAS)."""
    with autocast_off("cpu"):
        y = _product(x, weight, absmax, code, N, K, blocksize, x.dtype, True, bias, xa, lora_B, True, scaling)
        return _round(y, x.dtype)


def _lora_dx(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    """dY W + s dyb A [* keep * ms] (unmasked: the rank-r term rides in the GEMM as in _lora_fwd)."""
    with autocast_off("cpu"):
        if mask is None:
            dx = _product(dy, weight, absmax, code, N, K, blocksize, dy.dtype, False, None, dyb, lora_A, False, scaling)
        else:
            w = _weight(weight, absmax, code, N, K, blocksize, dy.dtype)[0]
            dx = compose.lora_dx(f32(dy), w, f32(dyb), f32(lora_A), scaling, mask.bool(), mask_scale)
        return _round(dx, dy.dtype)


@_cpu("lora_fwd")
def lora_fwd(x, weight, bias, xa, lora_B, scaling):
    N, K = weight.shape
    return _lora_fwd(x, weight, None, None, N, K, 0, bias, xa, lora_B, scaling)


@_cpu("lora_fwd_nf4")
def lora_fwd_nf4(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    if _decode(x.shape[0], K, blocksize, x.dtype):  # fp32 x W^T + b by the native matmul, then + s xa B^T
        acc = _cpu_ext.nf4_matmul(x, packed, absmax, code, N, K, blocksize, bias, out_dtype=torch.float32)
        with autocast_off("cpu"):
            return _round(acc.addmm_(f32(xa), f32(lora_B).t(), alpha=scaling), x.dtype)
    return _lora_fwd(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling)


@_cpu("lora_dx")
def lora_dx(dy, weight, dyb, lora_A, scaling, mask, mask_scale):
    N, K = weight.shape
    return _lora_dx(dy, weight, None, None, N, K, 0, dyb, lora_A, scaling, mask, mask_scale)


@_cpu("lora_dx_nf4")
def lora_dx_nf4(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    if _decode(dy.shape[0], K, blocksize, dy.dtype):  # fp32 dY W by the native matmul, then + the LoRA term
        acc = _cpu_ext.nf4_matmul_dx(dy, packed, absmax, code, N, K, blocksize, out_dtype=torch.float32)
        with autocast_off("cpu"):
            lora = torch.mm(f32(dyb), f32(lora_A))
            if mask is not None:
                lora = torch.where(mask.bool(), lora * mask_scale, 0.0)
            return _round(acc.add_(lora, alpha=scaling), dy.dtype)
    return _lora_dx(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale)


def _projected(a, weight, absmax, code, N, K, blocksize, b_t: bool, proj, proj_t: bool, b2, b2_t: bool, scaling,
               bias=None, col_scale=None, dtype=None):
    """((bias +) (a . op(W) + s (a . op(proj)) . op2(b2)) [* col_scale], a . op(proj)), both rounded to `dtype`
    (default a's), by one pass of the native GEMM (the projection computed from its packed tiles of a),
    or None when `_gemm` declines. `dtype` is also the one W is decoded for (a may be fp32 already)."""
    dtype = dtype or a.dtype
    r = proj.shape[0] if proj_t else proj.shape[1]
    if not _gemm(a.shape[0], N, K, dtype, r):
        return None
    with autocast_off("cpu"):
        out, a2 = _on_gemm(a, weight, absmax, code, N, K, blocksize, dtype, b_t, bias=bias, proj=proj, proj_t=proj_t,
                           b2=b2, b2_t=b2_t, scale2=scaling, col_scale=col_scale)
    return _round(out, dtype), _round(a2, dtype)


@_cpu("lora_fwd_xa")
def lora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, scaling):
    """(y, xa): xa = x A^T computed inside the forward GEMM (see _projected); else xat, then lora_fwd."""
    done = _projected(x, weight, absmax, code, N, K, blocksize, True, lora_A, True, lora_B, True, scaling, bias)
    if done is not None:
        return done
    xa = lowrank.xat(x, lora_A)
    return _lora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling), xa


@_cpu("lora_dx_dyb")
def lora_dx_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, scaling):
    """(dX, dyb): dyb = dY B computed inside the dX GEMM; else xat, then lora_dx."""
    done = _projected(dy, weight, absmax, code, N, K, blocksize, False, lora_B, False, lora_A, False, scaling)
    if done is not None:
        return done
    dyb = lowrank.xat(dy, lora_B.t())
    return _lora_dx(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, scaling, None, 1.0), dyb


# ---- DoRA ---------------------------------------------------------------------------------------


@_cpu("dora_norm_parts")
def dora_norm_parts(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq):
    """W A^T as (A W^T)^T (the fast BLAS layout), fp32; ||W_j||^2 as the reference. An NF4 W without the
    squares (the steady state: they are cached) and r <= 16: A W^T by the decode matmul, which reads W as
    4-bit (one pass over 0.5 byte per weight instead of decoding to a 4-byte workspace and reading it)."""
    if absmax is not None and not compute_sumsq and _decode(lora_A.shape[0], K, blocksize, lora_A.dtype):
        awt = _cpu_ext.nf4_matmul(lora_A, weight, absmax, code, N, K, blocksize, out_dtype=torch.float32)
        return awt.t().contiguous(), awt.new_empty((0,))
    w, _ = _weight(weight, absmax, code, N, K, blocksize, lora_A.dtype)
    with autocast_off("cpu"):
        wa = lowrank.xat(w, f32(lora_A)).contiguous().float()
        sq = w.square().sum(1).float() if compute_sumsq else wa.new_empty((0,))
    return wa, sq


@_cpu("dora_fwd")
def dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    if keep is not None:
        w = dense_weight_ref(weight, absmax, code, N, K, blocksize, x.dtype)
        return ref_dora.dora_fwd_ref(x, w, bias, xa, lora_B, g, keep, scaling, mask_scale)
    with autocast_off("cpu"):
        if _gemm(x.shape[0], N, K, x.dtype, lora_B.shape[1]):  # y = (x W^T + s xa B^T) * g + b in one GEMM pass
            y = _on_gemm(x, weight, absmax, code, N, K, blocksize, x.dtype, True, bias=bias, a2=xa, b2=lora_B,
                         b2_t=True, scale2=scaling, col_scale=g)
            return _round(y, x.dtype)
        w, scratch = _weight(weight, absmax, code, N, K, blocksize, x.dtype)
        xf, gw, xaf = f32(x), g.to(w.dtype), f32(xa)
        if w.dtype == torch.float32 and _cpu_ext.lowrank_supported(xaf, xaf.shape[1]) \
                and not compose.scale_w(x.shape[0], K, scratch):
            # g goes into the [M, N] output: y = x W^T, then y = y * g + b + s xa (g B)^T in one native pass
            # (compose.dora_out spends three: y *= g, a rank-r BLAS addmm_, y += b)
            gbt = (f32(lora_B) * gw[:, None]).t().contiguous()
            y = _cpu_ext.lowrank_gb(xaf, gbt, scaling, f32(bias), out=_dense_product(xf, w, True), out_scale=gw)
        else:
            y = compose.dora_out(xf, w, f32(bias), xaf, f32(lora_B), gw, scaling, scratch)
    return _round(y, x.dtype)


@_cpu("dora_fwd_xa")
def dora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g, scaling):
    """(y, xa): y = (x W^T + s xa B^T) * g + b and xa = x A^T in one pass of the native GEMM; else
    xat, then dora_fwd."""
    done = _projected(x, weight, absmax, code, N, K, blocksize, True, lora_A, True, lora_B, True, scaling, bias,
                      col_scale=g)
    if done is not None:
        return done
    xa = lowrank.xat(x, lora_A)
    return dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, None, scaling, 1.0), xa


def _or_empty(t, like):
    """t, or a fresh empty fp32 tensor (an op's absent output; outputs must not alias one another)."""
    return t if t is not None else like.new_empty((0,), dtype=torch.float32)


def _col_sums(dy, y, bias, want_db: bool, g=None):
    """(dY * g or None, sum_rows dY or None, sum_rows dY * (y - b) or None), fp32: one pass of the native
    kernel (dY * g only when g is given) for fp32 operands with the extension loaded, else
    compose.col_sums (no dY * g)."""
    if _cpu_ext.available() and dy.dtype == torch.float32 and (y is None or y.dtype == torch.float32):
        return _cpu_ext.lowrank_colsums(dy, y, f32(bias), g, want_db)
    return (None, *compose.col_sums(dy, y, bias, want_db))


def _scaled_col_sums(dy, y, bias, compute_db, g):
    """(dY * g fp32, db, c): `_col_sums` with g, forming dY * g by torch when the native pass cannot."""
    dyg, db, c = _col_sums(dy, y, bias, bool(compute_db), f32(g))
    return (f32(dy) * f32(g) if dyg is None else dyg), db, c


@_cpu("dora_bwd")
def dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
             compute_dx, compute_db):
    """dx = dY (g W) + s dyb A (compose.dora_dx; the reference with a mask), and db, c from one pass
    over dY and y (`_col_sums`: the native kernel, which also writes dY * g when g goes into the [M, N]
    operand rather than into W; else compose.col_sums)."""
    dx = dy.new_empty((0,))
    with autocast_off("cpu"):
        if compute_dx and keep is not None:
            w = dense_weight_ref(weight, absmax, code, N, K, blocksize, dy.dtype)
            dx = ref_dora.dora_bwd_ref(dy, w, dyb, lora_A, g, keep, None, None, scaling, mask_scale, True, False)[0]
            _, db, c = _col_sums(dy, y, bias, bool(compute_db))
        elif compute_dx and _gemm(dy.shape[0], N, K, dy.dtype, lora_A.shape[0]):
            # dX = (dY * g) W + s dyb A in one GEMM pass (an NF4 W decoded while packed); dY * g comes from
            # the pass that sums db and c
            dyg, db, c = _scaled_col_sums(dy, y, bias, compute_db, g)
            dx = _product(dyg, weight, absmax, code, N, K, blocksize, dy.dtype, False, None, dyb, lora_A, False,
                          scaling)
            dx = _round(dx, dy.dtype)
        elif compute_dx:
            w, scratch = _weight(weight, absmax, code, N, K, blocksize, dy.dtype)
            gw = g.to(w.dtype)
            fold = not compose.scale_w(dy.shape[0], K, scratch)  # g into dY (as dY * g), not into W
            dyg, db, c = _col_sums(dy, y, bias, bool(compute_db), gw if fold and gw.dtype == torch.float32 else None)
            if dyg is not None:
                dx = compose.lora_dx(dyg, w, f32(dyb), f32(lora_A), scaling)
            else:
                dx = compose.dora_dx(f32(dy), w, f32(dyb), f32(lora_A), gw, scaling, scratch)
            dx = _round(dx, dy.dtype)
        else:
            _, db, c = _col_sums(dy, y, bias, bool(compute_db))
    return dx, _or_empty(db, dy), _or_empty(c, dy)


@_cpu("dora_bwd_dyb")
def dora_bwd_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, g, y, bias, scaling, compute_db):
    """(dx, db, c, dyb): dY * g, db and c from one pass (`_col_sums`), then dX = (dY * g) W + s dyb A with
    dyb = (dY * g) B computed inside the native GEMM; else dyb by xat, then dora_bwd."""
    with autocast_off("cpu"):
        if _gemm(dy.shape[0], N, K, dy.dtype, lora_B.shape[1]):
            dyg, db, c = _scaled_col_sums(dy, y, bias, compute_db, g)
            dx, dyb = _projected(dyg, weight, absmax, code, N, K, blocksize, False, lora_B, False, lora_A, False,
                                 scaling, dtype=dy.dtype)
            return dx, _or_empty(db, dy), _or_empty(c, dy), dyb
        dyb = lowrank.xat(dy, (lora_B.float() * g[:, None]).to(dy.dtype).t())
    dx, db, c = dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, None, y, bias, scaling, 1.0, 1,
                         compute_db)
    return dx, db, c, dyb


@_cpu("dora_colsum")
def dora_colsum(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    """The reference over the selected columns only (none selected: no GEMM at all)."""
    if cols is None:
        w = dense_weight_ref(weight, absmax, code, N, K, blocksize, x.dtype)
        return ref_dora.dora_colsum_ref(dy, x, w, keep, xa, lora_B, scaling, mask_scale).float()
    idx = cols.bool().nonzero().flatten()
    out = dy.new_zeros((N,), dtype=torch.float32)
    if idx.numel() == 0:
        return out
    w = _weight(weight, absmax, code, N, K, blocksize, x.dtype)[0][idx]
    c = ref_dora.dora_colsum_ref(dy[:, idx], x, w, keep, xa, lora_B[idx], scaling, mask_scale)
    return out.index_put_((idx,), c.float())
