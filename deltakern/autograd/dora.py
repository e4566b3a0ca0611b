"""DoRA / QDoRA linear: one autograd Function over the `deltakern::dora_*` ops, plus the cached
row norms ||W + s B A||."""

from __future__ import annotations

import math
from typing import Optional

import torch

from deltakern.autograd._common import (
    autocast_dtype, check_dropout_p, check_features, check_float_dtype, check_input, check_param, check_weight,
    dense_weight, dropped, frozen_weight_kind, nf4_type,
)
import deltakern.ops.dora  # noqa: F401,E402  (defines torch.ops.deltakern.dora_*)
from deltakern.backends import compose, registry
import deltakern.ops.linear  # noqa: F401,E402  (defines torch.ops.deltakern.linear_*)

# Columns whose scale g = m / ||.|| is below this (or whose magnitude is exactly 0) get their
# magnitude gradient from a recomputed unscaled output instead of (y - b) / m (see the Function).
RECOVER_MIN_SCALE = 0.25
# A row whose expanded squared norm is below this fraction of its parts (||W_j||^2 + s^2 ||(BA)_j||^2)
# lost too many digits to cancellation and is recomputed exactly from W_j + s B_j A.
NORM_CANCELLATION_RTOL = 1e-3


# ---- the row norms ------------------------------------------------------------------------------


class _W:
    """A frozen weight as the ops take it: (weight-or-packed, absmax fp32 or None, code or None, N, K, blocksize)."""

    __slots__ = ("w", "absmax", "code", "N", "K", "blocksize")

    def __init__(self, w, absmax, code, N, K, blocksize):
        self.w, self.absmax, self.code, self.N, self.K, self.blocksize = w, absmax, code, N, K, blocksize

    @property
    def args(self):
        return self.w, self.absmax, self.code, self.N, self.K, self.blocksize

    def dense_rows(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """W[rows] in dtype (NF4 decoded for those rows only)."""
        if self.absmax is None:
            return self.w[rows].to(dtype)
        flat = rows[:, None].long() * self.K + torch.arange(self.K, device=rows.device)
        byte = self.w.reshape(-1).view(torch.uint8)[flat >> 1].long()
        nib = torch.where(flat % 2 == 0, byte >> 4, byte & 15)
        return (self.code[nib] * self.absmax[flat // self.blocksize]).to(dtype)


def _row_list(rows: torch.Tensor, limit: int = 10) -> str:
    idx = rows.tolist()
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"{idx[:limit]}{more}"


# Steady-state norm recomputations (after an optimizer step) repair at most this many cancelled rows
# on the device, without reading anything back (see dora_weight_norm).
REPAIR_ROWS = 32
_deferred = {}  # device -> int32 flags of the sync-free recomputations: 1 = a zero row, 2 = too many cancelled rows


def _deferred_flags(device) -> torch.Tensor:
    flags = _deferred.get(device)
    if flags is None:
        flags = _deferred[device] = torch.zeros((), dtype=torch.int32, device=device)
    return flags


def check_dora_norms():
    """Raise ValueError if a sync-free DoRA norm recomputation since the last check met a row whose
    norm ||W_j + s (BA)_j|| is exactly 0 (the output scale m / 0 is undefined: those outputs are
    inf/NaN, as in PEFT) or more cancelled rows than it repairs (REPAIR_ROWS; the rest keep the
    expanded sum's value). Reads one flag per device (a synchronisation): call it where the host
    waits anyway (logging, checkpointing); the first norm computation of every DoRA layer calls it.
    """
    for device, flags in list(_deferred.items()):
        bits = int(flags.item())
        if bits:
            flags.zero_()
            if bits & 1:
                raise ValueError(
                    "DoRA weight norm ||W + s*B@A|| became zero for some output row during training "
                    "(recomputed after an optimizer step); the magnitude/norm scale is undefined there.")
            raise ValueError(
                f"more than {REPAIR_ROWS} rows of a DoRA weight norm lost their digits to cancellation "
                "in one recomputation; the rest were not repaired. Raise "
                "deltakern.autograd.dora.REPAIR_ROWS or check the adapter for divergence.")


def dora_weight_norm(weight: _W, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     sumsq: Optional[torch.Tensor] = None, sync: bool = True):
    """Row norms ||W_j + s (B A)_j|| (fp32 [N]) without forming B A or a dense W.

        ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2 s <B_j, (W A^T)_j> + s^2 <B_j, (B (A A^T))_j>

    W A^T and ||W_j||^2 come from one pass over W (`deltakern::dora_norm_parts`; W in lora_A's dtype,
    NF4 dequantized exactly as the forward uses it); pass `sumsq` (cached ||W_j||^2) to skip the
    squares. All sums are fp32. Rows whose expansion cancels badly (below NORM_CANCELLATION_RTOL of
    its parts) are recomputed exactly from W_j + s B_j A.

    sync=True (a layer's first norm): every such row is repaired, and a row whose norm is then
        exactly 0 raises ValueError naming it (m / 0 has no meaning; PEFT would silently produce
        NaN). This reads the row set back to the host: one synchronisation.
    sync=False (the steady state, after each optimizer step): nothing is read back. The
        REPAIR_ROWS rows with the smallest ratio n2 / parts are recomputed exactly (a fixed-size
        gather, so no data-dependent shape) and taken where they are cancelled; a zero row, or more
        cancelled rows than that, sets a device flag that `check_dora_norms()` raises on later.
        Between the event and that check the outputs of a zero row are inf/NaN (PEFT's behaviour).

    Returns (norm [N], W A^T [N, r], ||W_j||^2 [N]), all fp32.
    """
    with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
        A, B = lora_A.detach(), lora_B.detach()
        wa, sq = torch.ops.deltakern.dora_norm_parts(*weight.args, A, int(sumsq is None))
        if sumsq is not None:
            sq = sumsq
        Af, Bf = A.float(), B.float()
        bq = torch.mm(Bf, torch.mm(Af, Af.t()))  # B (A A^T)  [N, r]
        quad = (bq * Bf).sum(1)  # ||(BA)_j||^2
        cross = (wa * Bf).sum(1)  # <W_j, (BA)_j>
        n2 = sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
        parts = sq + (scaling * scaling) * quad
        bad = n2 <= NORM_CANCELLATION_RTOL * parts
        if not sync:
            if weight.N:
                k = min(REPAIR_ROWS, weight.N)
                ratio = torch.where(parts > 0, n2 / parts, torch.zeros_like(n2))  # zero parts: a zero row
                rows = torch.topk(ratio, k, largest=False).indices
                v = weight.dense_rows(rows, A.dtype).float() + scaling * torch.mm(Bf[rows], Af)
                exact = v.square().sum(1)
                fix = bad[rows]
                n2 = n2.index_put((rows,), torch.where(fix, exact, n2[rows]))
                zero = (fix & (exact == 0)).any().to(torch.int32)
                over = (bad.sum() > k).to(torch.int32)
                _deferred_flags(n2.device).bitwise_or_(zero | (over << 1))
        elif bool(bad.any()):
            rows = bad.nonzero().flatten()
            v = weight.dense_rows(rows, A.dtype).float() + scaling * torch.mm(Bf[rows], Af)
            exact = v.square().sum(1)
            n2 = n2.index_put((rows,), exact)
            zero = rows[exact == 0]
            if zero.numel():
                raise ValueError(
                    f"DoRA weight norm ||W + s*B@A|| is zero for output rows {_row_list(zero)} "
                    f"({zero.numel()} of {weight.N}); the magnitude/norm scale is undefined there. "
                    "Drop or perturb those rows of the base weight (or of B) before using DoRA."
                )
        return n2.clamp_min(0.0).sqrt(), wa, sq


def _tensor_key(t: torch.Tensor):
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


@torch.library.custom_op("deltakern::dora_weight_norm", mutates_args=())
def _dora_weight_norm_op(w: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor], N: int,
                         K: int, blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dora_weight_norm` as one opaque op, for torch.compile (a traced graph cannot raise on values).
    The first call for a weight (storage, version, shape) checks synchronously; later calls, the
    compiled steady state, are sync-free (sync=False)."""
    key = (w.data_ptr(), w._version, w.device, tuple(w.shape), None if absmax is None else absmax.data_ptr())
    first = key not in _checked_weights
    if first:
        if len(_checked_weights) >= 4096:
            _checked_weights.clear()
        check_dora_norms()
    out = dora_weight_norm(_W(w, absmax, code, N, K, blocksize), lora_A, lora_B, scaling, None, sync=first)
    _checked_weights.add(key)
    return out


_checked_weights: set = set()


@_dora_weight_norm_op.register_fake
def _(w, absmax, code, N, K, blocksize, lora_A, lora_B, scaling):
    f32 = dict(dtype=torch.float32, device=lora_A.device)
    return lora_A.new_empty(N, **f32), lora_A.new_empty(N, lora_A.shape[0], **f32), lora_A.new_empty(N, **f32)


class DoRANormCache:
    """Caches what DoRA's row norms need between optimizer steps.

    * ||W_j||^2 (fp32 [N]) and, for NF4, the decoded fp32 block scales: W is frozen, so these are
      computed once (keyed on the weight storage and its version, and the compute dtype);
    * ||W + s B A||_row (fp32 [N]) and W A^T (fp32 [N, r]): recomputed only when A or B changed,
      tracked by their data pointers and `_version` counters (an optimizer step bumps both
      versions), or when the scaling or compute dtype changes. Holds O(N r) memory.
    `clear()` forgets everything (e.g. after writing W in place without bumping its version).
    Inside torch.compile the cache is bypassed (data pointers and version counters cannot be
    traced): the compiled graph recomputes the norms on every call through one opaque op,
    `deltakern::dora_weight_norm`, which costs one extra read of W per call.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self._w_key = self._sumsq = self._absmax = None
        self._key = self._norm = self._wa = None

    def _weight(self, w_key):
        if self._w_key != w_key:  # a different (or rewritten) base weight: forget everything
            self.clear()
            self._w_key = w_key

    def absmax(self, nf4_weight, w_key):
        """The decoded fp32 block scales of an NF4 weight (decoded once)."""
        self._weight(w_key)
        if self._absmax is None:
            self._absmax = nf4_weight.absmax_fp32()
        return self._absmax

    def norm(self, weight: _W, w_key, lora_A, lora_B, ab_key, scaling):
        """(||W + s B A||_row, W A^T), recomputed only when W, A, B, s or the dtype changed."""
        self._weight(w_key)
        key = (ab_key, float(scaling))
        if self._key != key or self._norm is None:
            first = self._norm is None  # a layer's first norm checks synchronously; later ones do not
            if first:
                check_dora_norms()
            self._norm, self._wa, self._sumsq = dora_weight_norm(weight, lora_A, lora_B, scaling, self._sumsq,
                                                                 sync=first)
            self._key = key
        return self._norm, self._wa


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

    Backward, dY = dL/dy, dYg = dY * g (never materialised on the fused path):
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
        with torch.autocast(x.device.type, enabled=False):
            M, K = x.shape
            r = lora_A.shape[0]
            is_nf4 = absmax is not None
            fused = _fused(x, M, N, K, "nf4" if is_nf4 else "dense", r)
            g = magnitude.detach().float() / norm
            ms = 1.0 / (1.0 - dropout_p)
            if dropout_p > 0.0:
                keep = torch.native_dropout(x, dropout_p, True)[1]
                xd = dropped(x, keep, ms)
            else:
                keep, xd = None, x
            xa = torch.mm(xd, lora_A.t())
            if fused:
                y = torch.ops.deltakern.dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep,
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
        with torch.autocast(dy.device.type, enabled=False):
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

        dyb = compose.small_mm_t(dy, (B.float() * g[:, None]).to(dtype).t()) if (need_x or need_A) else None
        want_cy = need_c and keep is None
        c = None
        if fused:
            if need_x or need_b or want_cy:
                dx_, db_, c_ = torch.ops.deltakern.dora_bwd(
                    dy, *W, dyb if need_x else dy[:, :0], A, g, keep, y if want_cy else None, bias, s, ms,
                    int(need_x), int(need_b))
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
            dA = torch.mm(dyb.t(), xd).mul_(s)
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
                ctw = torch.ops.deltakern.dora_ctw(ub.to(dtype), *W)
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


def _colsums(dy, W, g, y, bias, need_b):
    """(db fp32 or None, c = sum_rows dy * (y - b) fp32 or None) for the composition path: the
    fused column-sum kernel (no dx) where Triton runs, else torch in row chunks (bounded temporaries)."""
    if _triton_usable(dy):  # dyb / lora_A / g / keep are not read without dx: placeholders
        _, db, c = torch.ops.deltakern.dora_bwd(dy, *W, dy, dy, g, None, y, bias, 1.0, 1.0, 0, int(need_b))
        return (db if need_b else None), (c if y is not None else None)
    M, N = dy.shape
    db = dy.new_zeros(N, dtype=torch.float32) if need_b else None
    c = dy.new_zeros(N, dtype=torch.float32) if y is not None else None
    for lo, hi in _row_chunks(M, N, _CHUNK // 4):  # fp32 temporaries
        d = dy[lo:hi].float()
        if need_b:
            db += d.sum(0)
        if y is not None:
            yb = y[lo:hi].float()
            c += (d * (yb if bias is None else yb - bias.float())).sum(0)
    return db, c


def _colsum_z(dy, x, W, keep, xa, B, s, ms, cols, fused):
    """c_j = sum_i dy_ij z_ij for the selected columns (all when cols is None), z = x_d W^T + s xa B^T."""
    if fused or _triton_usable(dy) or dy.device.type != "cuda":
        return torch.ops.deltakern.dora_colsum(dy, x, *W, keep, xa, B, s, ms, cols)
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
        W = _W(weight.packed_bytes(), absmax, weight.code, N, K, int(weight.blocksize)) if is_nf4 else \
            _W(weight, None, None, N, K, 0)
        norm, wa, _ = torch.ops.deltakern.dora_weight_norm(*W.args, lora_A.detach(), lora_B.detach(), float(scaling))
    else:
        cache = norm_cache if norm_cache is not None else DoRANormCache()
        if is_nf4:
            w_key = (_tensor_key(weight.packed), _tensor_key(weight.absmax), dtype)
            W = _W(weight.packed_bytes(), cache.absmax(weight, w_key), weight.code, N, K, int(weight.blocksize))
        else:
            w_key = (_tensor_key(weight), dtype)
            W = _W(weight, None, None, N, K, 0)
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
    if isinstance(weight, nf4_type()):
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
