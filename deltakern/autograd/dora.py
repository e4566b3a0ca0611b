"""DoRA / QDoRA linear: one autograd Function over the `deltakern::dora_*` ops, plus the cached
row norms ||W + s B A||."""

from __future__ import annotations

import math
from typing import Optional

import torch

from deltakern._autocast import autocast_off
from deltakern.autograd._common import (
    autocast_dtype, check_dropout_p, check_features, check_float_dtype, check_input, check_param, check_weight,
    dense_weight, dropped, frozen_weight_kind, projects_in_gemm,
)
import deltakern.ops.dora  # noqa: F401,E402  (defines torch.ops.deltakern.dora_*)
from deltakern.autograd.dora_norm import (  # noqa: F401  (re-exported: they lived here)
    NORM_CANCELLATION_RTOL, REPAIR_ROWS, DoRANormCache, FrozenWeight, _deferred, _tensor_key, _W, check_dora_norms,
    dora_weight_norm,
)
from deltakern.nf4 import NF4Weight
from deltakern.backends import compose, registry
from deltakern.ops import lowrank
import deltakern.ops.linear  # noqa: F401,E402  (defines torch.ops.deltakern.linear_*)

# Columns whose scale g = m / ||.|| is below this (or whose magnitude is exactly 0) get their
# magnitude gradient from a recomputed unscaled output instead of (y - b) / m (see the Function).
RECOVER_MIN_SCALE = 0.25


# ---- path choice --------------------------------------------------------------------------------


def _use_triton(M: int, N: int, K: int, weight_kind: str, r: int = 16) -> bool:
    """The registry's cost model for a CUDA DoRA call (`registry.prefer_fused`): the fused Triton ops
    (True) or the composition (False).

    Fused: the output kernel applies g, the LoRA term and the bias in the GEMM's epilogue; the dX
    kernel scales dY tiles by g in registers and sums dY and dY * (y - b) per column in the same
    pass (db and the magnitude gradient), so no [M, N] temporary exists. Composition: cuBLAS GEMMs
    (an NF4 W is dequantized to a transient dense copy), the column scale as an elementwise pass,
    dY * g as an [M, N] temporary, and the column sums by the fused column-sum kernel.
    `DELTAKERN_DORA_IMPL=triton|torch` forces it.
    """
    return registry.prefer_fused("dora", M, N, K, weight_kind, r)


def _fused(x: torch.Tensor, M: int, N: int, K: int, weight_kind: str, r: int) -> bool:
    return registry.fused_path("dora", x, M, N, K, weight_kind, r)


def _triton_usable(t: torch.Tensor) -> bool:
    """Whether the composition can use the Triton column-sum kernels (they resolve to Triton here)."""
    return registry.resolve("dora_colsum", t.device.type) == "triton"


_CHUNK = 2**25  # elements of an [rows, N] temporary in the composition path (64 MiB of bf16)


def _row_chunks(M: int, N: int, budget: Optional[int] = None):
    """Row ranges whose [rows, N] temporaries hold at most `budget` (default _CHUNK) elements."""
    step = max(1, (_CHUNK if budget is None else budget) // max(N, 1))
    return [(i, min(i + step, M)) for i in range(0, M, step)]


# ---- the Function -------------------------------------------------------------------------------


class DoRALinearFunction(torch.autograd.Function):
    r"""DoRA: y = g * (x W^T + s (x_d A^T) B^T) + b,  g = m / ||W + s B A||_row  (PEFT 0.21 semantics).

    Shapes: x [M, K], W [N, K] frozen (dense or NF4), A [r, K], B [N, r], m [N], b [N], s = scaling.
    n = ||W + s B A||_row (fp32 [N], computed outside, see dora_weight_norm); g = m / n (fp32 [N]).
    Dropout (probability p, training only) follows PEFT exactly: PEFT adds (g - 1) * (x_d W^T) +
    g * s (x_d A^T) B^T to the base layer's output x W^T + b, with x_d = dropout(x); so

        p = 0:  y = g * z + b                                 z = x W^T + s xa B^T, xa = x A^T
        p > 0:  y = x W^T + b + (g - 1) * (x_d W^T) + g * s xa B^T
                  = x W^T - x_d W^T + g * z + b               z = x_d W^T + s xa B^T, xa = x_d A^T

    (x_d = x * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn as torch's dropout draws it.)

    On the CPU without dropout, xa (and dyb below) come from the op that runs the GEMM
    (`dora_fwd_xa`, `dora_bwd_dyb`: projected from its packed tiles of x, dY * g).

    Backward, dY = dL/dy, dYg = dY * g (never materialised on the fused GPU path):
        dyb = dYg B = dY (g * B)                               [M, r]
        dX  = dYg W + s dyb A                                  (p = 0)
        dX  = dY W + keep/(1-p) * ((dY * (g - 1)) W + s dyb A) (p > 0)
        dA  = s dyb^T x_d
        dB  = s diag(g) dY^T xa
        dm  = c / n,   c_j = sum_i dY_ij z_ij
        db  = sum_i dY_ij
        norm: treated as a constant (PEFT's default, DoRA paper section 4.3), so A and B get no
              gradient through it. With exact_norm_grad the gradient through n is added: with
              u_j = -g_j dm_j / n_j and V = W + s B A,
                  dB += s diag(u) V A^T = s diag(u) (W A^T + s B (A A^T))
                  dA += s B^T diag(u) V = s ((u * B)^T W + s ((u * B)^T B) A)
              where W A^T is the cached [N, r] from the norm pass and (u * B)^T W one more pass
              over W (`deltakern::dora_ctw`).
    How c is obtained without saving an [M, N] tensor besides the output y:
        p = 0: c_j = sum_i dY_ij (y_ij - b_j) / g_j, so dm_j = sum_i dY_ij (y_ij - b_j) / m_j, from
               y itself (saved: it is the output) in the pass that computes dX / db. For columns
               with |g_j| < RECOVER_MIN_SCALE (or m_j = 0) dividing would amplify y's rounding
               by 1/g_j, so z is recomputed for those columns only (`deltakern::dora_colsum` with a
               column mask; tiles without such a column skip their GEMM loop).
        p > 0: z cannot be recovered from y (it mixes x W^T and x_d W^T), so c is recomputed by
               one GEMM whose epilogue reduces dY * z per column (`deltakern::dora_colsum`); no
               [M, N] tensor is stored.
    Saved for backward: the weight as given (dense, or packed NF4 + fp32 block scales + code),
    A, B, m, b (parameters), g and n (fp32 [N]), x (if dA or dm is needed), the bool keep-mask
    (p > 0), xa (if dB or dm is needed), y (p = 0 and dm needed), W A^T (fp32 [N, r], exact_norm_grad
    only). Nothing of size [M, N] besides the output, which the caller holds anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, absmax, code, bias, lora_A, lora_B, magnitude, norm, wa, N, scaling, dropout_p,
                blocksize, exact_norm_grad):
        with autocast_off(x.device.type):
            M, K = x.shape
            r = lora_A.shape[0]
            is_nf4 = absmax is not None
            fused = _fused(x, M, N, K, "nf4" if is_nf4 else "dense", r)
            g = magnitude.detach().float() / norm
            ms = 1.0 / (1.0 - dropout_p)
            if dropout_p > 0.0:
                xd, keep = torch.native_dropout(x, dropout_p, True)  # xd = x * keep / (1 - p), as `dropped` gives
            else:
                keep, xd = None, x
            project = fused and keep is None and projects_in_gemm(x, "dora_fwd")
            xa = None if project else lowrank.xat(xd, lora_A)
            if project:  # xa computed inside the forward GEMM
                y, xa = registry.run("dora_fwd_xa", x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g,
                                     scaling)
            elif fused:
                y = registry.run("dora_fwd", x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep,
                                                 scaling, ms)
            else:
                y = _compose_forward(x, xd, dense_weight(weight, absmax, code, N, K, blocksize, x.dtype),
                                     bias, xa, lora_B, g, keep is not None, scaling, is_nf4)
            need_A, need_B, need_m = ctx.needs_input_grad[5:8]
            exact = bool(exact_norm_grad) and (need_A or need_B)
            need_c = need_m or exact
            ctx.save_for_backward(
                x if (need_A or need_c) else None, keep, xa if (need_B or need_c) else None,
                y if (need_c and keep is None) else None, weight, absmax, code, bias, lora_A, lora_B, magnitude,
                g, norm, wa if exact else None,
            )
            ctx.meta = (M, N, K, r, float(scaling), float(dropout_p), int(blocksize), fused, exact)
            return y

    @staticmethod
    def backward(ctx, dy):
        with autocast_off(dy.device.type):
            return DoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, keep, xa, y, weight, absmax, code, bias, A, B, m, g, norm, wa = ctx.saved_tensors
        M, N, K, r, s, p, blocksize, fused, exact = ctx.meta
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        need_A, need_B, need_m = ctx.needs_input_grad[5:8]
        need_c = need_m or exact
        dtype = dy.dtype
        ms = 1.0 / (1.0 - p)
        W = (weight, absmax, code, N, K, blocksize)
        dx = db = dA = dB = dm = None

        project = fused and need_x and keep is None and projects_in_gemm(dy, "dora_bwd")
        need_dyb = (need_x or need_A) and not project
        dyb = lowrank.xat(dy, (B.float() * g[:, None]).to(dtype).t()) if need_dyb else None
        want_cy = need_c and keep is None
        c = None
        if project:  # dyb computed inside the dX GEMM
            dx, db_, c_, dyb = registry.run("dora_bwd_dyb", dy, *W, B, A, g, y if want_cy else None, bias, s,
                                            int(need_b))
            db = db_ if need_b else None
            c = c_ if want_cy else None
        elif fused:
            if need_x or need_b or want_cy:
                dx_, db_, c_ = registry.run(
                    "dora_bwd", dy, *W, dyb if need_x else dy[:, :0], A, g, keep, y if want_cy else None, bias, s,
                    ms, int(need_x), int(need_b))
                dx = dx_ if need_x else None
                db = db_ if need_b else None
                c = c_ if want_cy else None
        else:
            w = dense_weight(weight, absmax, code, N, K, blocksize, dtype) if need_x else None
            if need_x:
                dx = _compose_dx(dy, w, dyb, A, g, keep, s, ms, absmax is not None)
                del w
            if need_b or want_cy:
                db, c = _colsums(dy, W, g, y if want_cy else None, bias, need_b)

        if need_c:
            if keep is None:
                # dm = c / m where |g| is large enough, else recompute z for those columns only
                mf = m.detach().float()
                redo = (g.abs() < RECOVER_MIN_SCALE) | (mf == 0)
                cz = _colsum_z(dy, x, W, None, xa, B, s, ms, redo, fused)
                dmf = torch.where(redo, cz / norm, c / torch.where(redo, 1.0, mf))
            else:
                dmf = _colsum_z(dy, x, W, keep, xa, B, s, ms, None, fused) / norm
            dm = dmf.to(m.dtype) if need_m else None

        if need_A:
            xd = x if keep is None else dropped(x, keep, ms)
            dA = lowrank.gtx(dyb, xd, s)[0]
        if need_B:
            dB = (compose.lora_db_dB(dy, xa, 1.0, False)[0].float() * (g * s)[:, None]).to(dtype)
        if exact:
            u = -g * dmf / norm  # dL/dn_j / n_j
            Bf, Af = B.float(), A.float()
            if need_B:
                va = wa + s * torch.mm(Bf, torch.mm(Af, Af.t()))  # V A^T
                dB = (dB.float() + s * u[:, None] * va).to(dtype)
            if need_A:
                ub = u[:, None] * Bf  # [N, r]
                ctw = registry.run("dora_ctw", ub.to(dtype), *W)
                dA = (dA.float() + s * (ctw + s * torch.mm(torch.mm(ub.t(), Bf), Af))).to(dtype)
        if db is not None:
            db = db.to(bias.dtype)
        return dx, None, None, None, db, dA, dB, dm, None, None, None, None, None, None, None


def _compose_forward(x, xd, w, bias, xa, lora_B, g, dropout, scaling, w_scratch=False):
    """The torch composition of DoRA's forward. Without dropout: compose.dora_out (g folded into the
    GEMM operands, the rank-r term and the bias first, the base GEMM adding into them; a scratch W,
    i.e. a dequantized NF4 copy, is scaled in place). The dropout form's x_d W^T is formed in row
    chunks (temporaries bounded by _CHUNK elements)."""
    gc = g.to(x.dtype)
    if not dropout:
        return compose.dora_out(x, w, bias, xa, lora_B, gc, scaling, w_scratch)
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    for lo, hi in _row_chunks(x.shape[0], w.shape[0]):
        z = torch.mm(xd[lo:hi], w.t())
        y[lo:hi].sub_(z)
        z.addmm_(xa[lo:hi], lora_B.t(), alpha=scaling)
        y[lo:hi].add_(z.mul_(gc))
    return y


def _compose_dx(dy, w, dyb, A, g, keep, s, ms, w_scratch=False):
    """dX by cuBLAS. Without dropout, when g fits better into W (compose.scale_w: W is a scratch copy,
    or K <= M) dX = s dyb A, then += dY (g W), with no [M, N] temporary; otherwise dY * g (and
    dY * (g - 1)) are formed per row chunk, never as a whole [M, N]."""
    M, N = dy.shape
    gc = g.to(dy.dtype)
    if keep is None and compose.scale_w(M, w.shape[1], w_scratch):
        return compose.dora_dx(dy, w, dyb, A, gc, s, w_scratch)
    dx = torch.empty((M, w.shape[1]), dtype=dy.dtype, device=dy.device) if keep is None else torch.mm(dy, w)
    for lo, hi in _row_chunks(M, N):
        if keep is None:
            torch.mm(dy[lo:hi] * gc, w, out=dx[lo:hi])
            dx[lo:hi].addmm_(dyb[lo:hi], A, alpha=s)
        else:
            inner = torch.mm(dy[lo:hi] * (gc - 1), w)
            inner.addmm_(dyb[lo:hi], A, alpha=s)
            dx[lo:hi].add_(dropped(inner, keep[lo:hi], ms))
    return dx


# The Triton kernels index with int32: the composition's column sums split the rows so that no
# operand of one call reaches this many elements (column sums add up over rows).
INT32_ELEMS = 2**31 - 1


def _int32_row_chunks(M: int, width: int):
    """Row ranges of at most INT32_ELEMS // width rows (one range when everything fits)."""
    if M * width <= INT32_ELEMS:
        return [(0, M)]
    return _row_chunks(M, width, INT32_ELEMS)


def _colsums(dy, W, g, y, bias, need_b):
    """(db fp32 or None, c = sum_rows dy * (y - b) fp32 or None) for the composition path: the
    fused column-sum kernel (no dx) where Triton runs, over row chunks that int32 indexing can
    address, else torch in row chunks (bounded temporaries)."""
    M, N = dy.shape
    db = dy.new_zeros(N, dtype=torch.float32) if need_b else None
    c = dy.new_zeros(N, dtype=torch.float32) if y is not None else None
    if _triton_usable(dy):
        for lo, hi in _int32_row_chunks(M, N):
            d = dy[lo:hi]  # dyb / lora_A / g / keep are not read without dx: placeholders
            _, db_i, c_i = registry.run("dora_bwd", d, *W, d, d, g, None, None if y is None else y[lo:hi], bias,
                                                        1.0, 1.0, 0, int(need_b))
            if need_b:
                db += db_i
            if y is not None:
                c += c_i
        return db, c
    for lo, hi in _row_chunks(M, N, _CHUNK // 4):  # fp32 temporaries
        d = dy[lo:hi].float()
        if need_b:
            db += d.sum(0)
        if y is not None:
            yb = y[lo:hi].float()
            c += (d * (yb if bias is None else yb - bias.float())).sum(0)
    return db, c


def _colsum_z(dy, x, W, keep, xa, B, s, ms, cols, fused):
    """c_j = sum_i dy_ij z_ij for the selected columns (all when cols is None), z = x_d W^T + s xa B^T;
    the op runs over row chunks that int32 indexing can address."""
    if fused or _triton_usable(dy) or dy.device.type != "cuda":
        M, N, K = dy.shape[0], dy.shape[1], x.shape[1]
        out = None
        for lo, hi in _int32_row_chunks(M, max(N, K)):
            c = registry.run("dora_colsum", dy[lo:hi], x[lo:hi], *W, None if keep is None else keep[lo:hi],
                                                xa[lo:hi], B, s, ms, cols)
            out = c if out is None else out.add_(c)
        return out
    return _colsum_z_torch(dy, x, W, keep, xa, B, s, ms, cols)


def _colsum_z_torch(dy, x, W, keep, xa, B, s, ms, cols):
    """_colsum_z in torch (CUDA without Triton): only the selected columns, in row chunks (one host
    read of the selection)."""
    N = W[3]
    idx = torch.arange(N, device=dy.device) if cols is None else cols.nonzero().flatten()
    out = dy.new_zeros(N, dtype=torch.float32)
    if idx.numel() == 0:
        return out
    w = dense_weight(W[0], W[1], W[2], W[3], W[4], W[5], x.dtype)[idx]
    xd = x if keep is None else dropped(x, keep, ms)
    acc = out[idx]
    for lo, hi in _row_chunks(x.shape[0], idx.numel(), _CHUNK // 4):
        z = torch.mm(xd[lo:hi], w.t()).float() + s * torch.mm(xa[lo:hi].float(), B[idx].float().t())
        acc += (dy[lo:hi, idx].float() * z).sum(0)
    return out.index_put_((idx,), acc)


# ---- the function users call --------------------------------------------------------------------


def dora_linear(
    x: torch.Tensor,
    weight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    exact_norm_grad: bool = False,
    norm_cache: Optional[DoRANormCache] = None,
) -> torch.Tensor:
    """DoRA linear: y = (m / ||W + s B A||_row) * (x W^T + s (x_d A^T) B^T) + b (PEFT 0.21 semantics,
    including its dropout form; see DoRALinearFunction for every formula and gradient).

    x [..., K]; weight: frozen dense [N, K] or `deltakern.NF4Weight` [N, K] (QDoRA); bias [N] or None;
    lora_A [r, K]; lora_B [N, r]; magnitude [N] (PEFT's lora_magnitude_vector); dropout with
    probability `dropout_p` applies when `training`. The row norm is detached (a constant in
    backward, as PEFT and the DoRA paper do) unless `exact_norm_grad`, which adds the gradient
    through it to A and B. `norm_cache` (a DoRANormCache, held by DoRALinear) reuses ||W||^2 and
    the row norms until A or B change; without it they are recomputed on every call.

    x, bias, A, B, magnitude and a dense weight share one dtype (fp16 / bf16 / fp32) and device;
    under torch.autocast the floating inputs are cast to the autocast dtype first.
    """
    check_input(x)
    check_dropout_p(dropout_p)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite float, got {scaling!r}")
    if norm_cache is not None and not isinstance(norm_cache, DoRANormCache):
        raise TypeError(f"norm_cache must be a DoRANormCache or None, got {type(norm_cache).__name__}")

    is_nf4 = frozen_weight_kind(weight, "weight requires grad: dora_linear never computes a gradient for the base "
                                        "weight; freeze it (weight.requires_grad_(False)) as PEFT does")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not torch.compiler.is_compiling():
        ab_key = (_tensor_key(lora_A), _tensor_key(lora_B))  # of the parameters themselves (before any cast)

    cast = autocast_dtype(x)
    if cast is not None:
        x, lora_A, lora_B, magnitude = x.to(cast), lora_A.to(cast), lora_B.to(cast), magnitude.to(cast)
        bias = None if bias is None else bias.to(cast)
        weight = weight if is_nf4 else weight.to(cast)

    dtype, device = x.dtype, x.device
    check_float_dtype(dtype)
    N, K = check_weight(weight, is_nf4, dtype, device)
    check_features(x, K)
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A must be 2-D [r, in_features], got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check_param("lora_A", lora_A, dtype, device, (r, K))
    check_param("lora_B", lora_B, dtype, device, (N, r))
    check_param("magnitude", magnitude, dtype, device, (N,))
    if bias is not None:
        check_param("bias", bias, dtype, device, (N,))

    if torch.compiler.is_compiling():
        # data pointers and version counters cannot be traced: a compiled graph recomputes the row
        # norms (one extra pass over W for ||W||^2 and W A^T) on every call instead of caching them
        absmax = weight.absmax_fp32() if is_nf4 else None
        W = FrozenWeight(weight.packed_bytes(), absmax, weight.code, N, K, int(weight.blocksize)) if is_nf4 else \
            FrozenWeight(weight, None, None, N, K, 0)
        norm, wa, _ = torch.ops.deltakern.dora_weight_norm(*W.args, lora_A.detach(), lora_B.detach(), float(scaling))
    else:
        cache = norm_cache if norm_cache is not None else DoRANormCache()
        if is_nf4:
            w_key = (_tensor_key(weight.packed), _tensor_key(weight.absmax), dtype)
            W = FrozenWeight(weight.packed_bytes(), cache.absmax(weight, w_key), weight.code, N, K, int(weight.blocksize))
        else:
            w_key = (_tensor_key(weight), dtype)
            W = FrozenWeight(weight, None, None, N, K, 0)
        norm, wa = cache.norm(W, w_key, lora_A, lora_B, ab_key + (dtype,), float(scaling))

    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, K)
    y = DoRALinearFunction.apply(x2, W.w, W.absmax, W.code, bias, lora_A, lora_B, magnitude, norm, wa, N,
                                 float(scaling), p, W.blocksize, bool(exact_norm_grad))
    return y.view(*x.shape[:-1], N)


def dora_linear_ref(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True, keep=None,
                    exact_norm_grad=False):
    """Plain-torch DoRA in PEFT 0.21's form (torch autograd; any float dtype incl. float64).

    The norm is computed as PEFT does (||W + s B A|| over the input dim, in x's dtype) and detached
    unless exact_norm_grad. `keep` replays a bool dropout keep-mask [..., K] instead of drawing one.
    """
    if isinstance(weight, NF4Weight):
        weight = weight.dequantize(torch.float32).to(x.dtype)
    weight = weight.to(x.dtype)
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)
    if not exact_norm_grad:
        norm = norm.detach()
    scale = magnitude / norm
    base = torch.nn.functional.linear(x, weight, bias)
    lora = lambda t: torch.nn.functional.linear(torch.nn.functional.linear(t, lora_A), lora_B)  # noqa: E731
    if training and dropout_p > 0.0:
        if keep is None:
            xd = torch.nn.functional.dropout(x, dropout_p, True)
        else:
            xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
        return base + (scale - 1) * torch.nn.functional.linear(xd, weight) + scale * lora(xd) * scaling
    base_nb = base if bias is None else base - bias
    return base + (scale - 1) * base_nb + scale * lora(x) * scaling
