# Frozen-weight linear kernels with fused epilogues: BitFit (bias-only) and DoRA building blocks.
#
# W [N, K] is frozen: dense (fp16 / bf16 / fp32, any strides) or NF4 (bitsandbytes layout: flat
# index n*K + k, byte index // 2, high nibble first, one fp32 absmax per `blocksize` consecutive
# flat elements), dequantized in registers as cast(fp32(code[nibble] * absmax)) -- never written
# to memory.
#
# _fwd_kernel, one output tile [BM, BN], reduction over K:
#   plain         out = x W^T (+ b)                                          (BitFit forward)
#   DoRA          out = g * (x W^T + s xa B^T) + b                            (g: fp32 column scale)
#   DoRA, DROP    out = x W^T + (g - 1) * (x_d W^T) + g * s xa B^T + b        x_d = keep * x / (1-p)
#                 (PEFT's dropout semantics; two accumulators share every W tile)
#   COLSUM        part[pid_m, n] = sum_i dy[i, n] * z[i, n],  z = x_d W^T + s xa B^T
#                 (DoRA's magnitude gradient when z cannot be recovered from y; optional column
#                 mask: tiles without a selected column skip their reduction loop and epilogue loads,
#                 so an all-clear mask costs one launch and no pass over x, W or dy)
# _dx_kernel, one output tile [BM, BK] of dx, reduction over N:
#   plain         dx = dy W                                                   (BitFit backward)
#   DoRA          dx = (dy * g) W + s dyb A                 (dy * g formed in registers, rounded
#                                                            once to the compute dtype)
#   DoRA, DROP    dx = dy W + keep/(1-p) * ((dy * (g - 1)) W + s dyb A)
#   and, in the programs of the first column tile, column sums of the dy tiles they read anyway:
#   DB            part_db[pid_m, n] = sum_i dy[i, n]
#   CY            part_c[pid_m, n]  = sum_i dy[i, n] * (y[i, n] - b[n])       (DoRA: dm = c / m)
#   Column sums without dX run in _colsums_kernel (a 2-D grid over row groups and column tiles).
# Column sums go to a zero-initialised fp32 buffer [ceil(M / min BM), N], one row per row tile,
# summed by the caller (deterministic; no atomics). Its size is bounded by pruning small-BM
# configs at large M (see _min_block_m). A config with a larger BM writes fewer rows, so the
# autotuner zeroes the buffer before every trial and before the real launch (zero_when).
#
# Limits: r <= 128 (padded to a power of two >= 16); element offsets < 2**31 (int32 index math,
# checked). Cost: the GEMMs are 2*M*N*K FLOP (DROP: twice that); the epilogues add one read of
# dy/y tiles (column sums) or of the small [M, r] / [N, r] LoRA factors. The column sums ride on
# programs that already load the dy tile, so they add no pass over dy.
#
# Autotuning: untuned guesses (no GPU was available when this was written), keyed on the M bucket,
# N, K and the mode flags; pinned to one tiny config in the interpreter (TRITON_INTERPRET=1) and
# to the first GPU config with DELTAKERN_TRITON_PIN=1.

import torch
import triton
import triton.language as tl

from ._common import (
    DTYPES, autotuned, check, check_int32, config_shapes, dot_flags, fit_registers, fit_smem, grouped_tile, launch,
    m_bucket, mma, nf4_aligned, nf4_rows_tile, r_pad, smem_estimate, target_arch, w_tile, weight_args, zero_when,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the first entry is the pinned one.
# For the dx kernel BLOCK_N is the reduction tile and BLOCK_K the output-column tile.
_CONFIGS = {
    ("fwd", "dense"): [(128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
                       (64, 64, 64, 8, 4, 4), (16, 64, 128, 1, 4, 4), (16, 128, 64, 1, 4, 3)],
    ("fwd", "nf4"): [(128, 128, 64, 8, 8, 2), (64, 128, 64, 8, 4, 2), (64, 64, 64, 8, 4, 3),
                     (16, 128, 64, 1, 4, 2), (16, 64, 128, 1, 4, 2)],
    ("dx", "dense"): [(128, 64, 128, 8, 8, 3), (64, 64, 128, 8, 4, 4), (64, 64, 64, 8, 4, 4),
                      (16, 128, 64, 1, 4, 3)],
    ("dx", "nf4"): [(128, 64, 128, 8, 8, 2), (64, 64, 128, 8, 4, 2), (64, 64, 64, 8, 4, 3),
                    (16, 128, 64, 1, 4, 2)],
}
_SMALL_M = 256  # M above this never uses BLOCK_M < 64 (bounds the column-sum buffer)


def _min_block_m(kernel, weight, M):
    """The smallest BLOCK_M the pruner can keep for this M: sizes the column-sum buffer."""
    bms = [s[0] for s in config_shapes(_CONFIGS, kernel, weight)]
    big = [bm for bm in bms if bm >= 64]
    return min(big) if (M > _SMALL_M and big) else min(bms)


def _acc_per_thread(kernel, cfg):
    """fp32 accumulator values one thread holds for a [BLOCK_M, output tile] accumulator."""
    out = cfg.kwargs["BLOCK_N"] if kernel == "fwd" else cfg.kwargs["BLOCK_K"]
    return cfg.kwargs["BLOCK_M"] * out // (32 * cfg.num_warps)


def _prune(kernel, nf4):
    def prune(configs, named_args, **kwargs):
        elem = named_args["x_ptr" if kernel == "fwd" else "dy_ptr"].element_size()
        drop = bool(kwargs.get("DROP", named_args.get("DROP", 0)))
        colsum = bool(kwargs.get("COLSUM", named_args.get("COLSUM", 0)))
        scale = bool(kwargs.get("HAS_SCALE", named_args.get("HAS_SCALE", 0)))
        candidates = configs
        if named_args["M"] > _SMALL_M and any(c.kwargs["BLOCK_M"] >= 64 for c in configs):
            candidates = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
        if drop and not colsum:
            # two fp32 accumulators: more than 64 values each per thread (32 beside the NF4 decode)
            # spill (the kernel report's sm_90 compiles)
            fit = [c for c in candidates if _acc_per_thread(kernel, c) <= (32 if nf4 else 64)]
            candidates = fit or candidates
        # DROP: two fp32 tiles live (two accumulators, or the column sums' z beside the dY tile);
        # heavy: epilogues the sm_80 compiles spill in (DoRA's dX; the dropout column sums of z)
        heavy = (scale and kernel == "dx") or (colsum and drop)
        out_key, red_key = ("BLOCK_N", "BLOCK_K") if kernel == "fwd" else ("BLOCK_K", "BLOCK_N")
        candidates = fit_registers(candidates, target_arch(named_args["x_ptr" if kernel == "fwd" else "dy_ptr"]),
                                   nf4, out_key, red_key, 2 if drop else 1, heavy=heavy)
        kept = fit_smem(candidates, lambda cfg: smem_estimate(kernel, cfg, elem, nf4, drop))
        if not kept:  # nothing fits: the largest BLOCK_M (keeps the column-sum buffer large enough), 1 stage
            cfg = max(configs, key=lambda c: c.kwargs["BLOCK_M"])
            kept = [triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=1)]
        return kept

    return {"early_config_prune": prune}


# --------------------------------------------------------------------------------------------
# kernels (the shared jit helpers live in _common.py)
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, keep_ptr, xa_ptr, lb_ptr, g_ptr, bias_ptr, dy_ptr, cols_ptr, out_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_km, stride_kk, stride_am, stride_ar,
    stride_bn, stride_br, stride_dm, stride_dn, stride_om, stride_on,
    scaling, mask_scale,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROP: tl.constexpr, COLSUM: tl.constexpr, COLMASK: tl.constexpr,
    R_PAD: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n < N
    cdt = x_ptr.dtype.element_ty

    k_end = K
    live = m_ok  # rows whose epilogue loads happen
    if COLMASK:  # a column tile with no selected column skips its loop and its epilogue loads
        sel = tl.load(cols_ptr + offs_n, mask=n_ok, other=0).to(tl.int32)
        active = tl.max(sel, axis=0) > 0
        k_end = K * active.to(tl.int32)
        live = m_ok & active

    # The LoRA term s xa B^T is computed first and seeds an accumulator, so the loop holds one fp32
    # [BM, BN] tile (two with DROP) instead of a further one for the LoRA term, which spilled.
    # Only the fp32 summation order differs from adding it after the loop.
    #   acc   = x_d W^T (+ s xa B^T unless DROP's output)     acc_x = x W^T + g s xa B^T (DROP output)
    g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_SCALE:
        g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # DROP output only
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                     mask=live & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(lb_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=n_ok[None, :] & (offs_r[:, None] < R), other=0.0)
        lora = scaling * mma(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
        if DROP and not COLSUM:
            acc_x = lora * g[None, :]  # the launcher guarantees g with DROP
        else:
            acc = lora
    if NF4_ALIGNED:
        # the transposed products acc^T = W x_d^T (and W x^T): the decoded W tile is the MMA's left
        # operand, read from registers, so the MMA stays asynchronous while the next tile decodes
        acct = tl.trans(acc)
        acc_xt = tl.trans(acc_x)
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + offs_k
            okt = (offs_m[None, :] < M) & (ks[:, None] < K)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None] * stride_xk, mask=okt, other=0.0)
            w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCK, cdt)
            if DROP:
                keep = tl.load(keep_ptr + offs_m[None, :] * stride_km + ks[:, None] * stride_kk, mask=okt, other=0)
                xdt = tl.where(keep != 0, xt.to(tl.float32) * mask_scale, 0.0).to(cdt)
                acct = mma(w, xdt, acct, DOT_FP32, INPUT_PRECISION)
                if not COLSUM:
                    acc_xt = mma(w, xt, acc_xt, DOT_FP32, INPUT_PRECISION)
            else:
                acct = mma(w, xt, acct, DOT_FP32, INPUT_PRECISION)
        acc = tl.trans(acct)
        acc_x = tl.trans(acc_xt)
    else:
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + offs_k
            ok = m_ok & (ks[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk, mask=ok, other=0.0)
            wt = w_tile(w_ptr, absmax_ptr, code_ptr, offs_n[None, :], ks[:, None], N, K, stride_wn, stride_wk,
                        IS_NF4, NF4_BLOCK, cdt)
            if DROP:
                keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + ks[None, :] * stride_kk, mask=ok, other=0)
                xd = tl.where(keep != 0, x.to(tl.float32) * mask_scale, 0.0).to(cdt)
                acc = mma(xd, wt, acc, DOT_FP32, INPUT_PRECISION)
                if not COLSUM:
                    acc_x = mma(x, wt, acc_x, DOT_FP32, INPUT_PRECISION)
            else:
                acc = mma(x, wt, acc, DOT_FP32, INPUT_PRECISION)

    if COLSUM:
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=live & n_ok[None, :], other=0.0).to(tl.float32)
        part = tl.sum(dy * acc, axis=0)
        if COLMASK:
            part = tl.where(sel != 0, part, 0.0)
        tl.store(out_ptr + pid_m * stride_om + offs_n * stride_on, part, mask=n_ok)
    else:
        z = acc
        if DROP:  # g (x_d W^T + s xa B^T) + (x - x_d) W^T
            z = acc_x + acc * (g - 1.0)[None, :]
        elif HAS_SCALE:
            z = acc * g[None, :]
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 z.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok[None, :])


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, g_ptr, dyb_ptr, a_ptr, keep_ptr, y_ptr, bias_ptr,
    dx_ptr, db_ptr, c_ptr,
    M, N, K, R, M_BUCKET, K_GRID,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bm, stride_br, stride_ar, stride_ak,
    stride_km, stride_kk, stride_ym, stride_yn, stride_xm, stride_xk,
    scaling, mask_scale,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, COMPUTE_DX: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_LORA: tl.constexpr, DROP: tl.constexpr, DB: tl.constexpr, CY: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(M, K_GRID, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    k_ok = offs_k[None, :] < K
    cdt = dy_ptr.dtype.element_ty
    sums = pid_k == 0  # the first column tile's programs also reduce dy over their rows

    # The LoRA term s dyb A is computed first and seeds an accumulator (one fp32 tile in the loop,
    # two with DROP); only the fp32 summation order differs from adding it after the loop.
    #   acc = (dy * g) W (+ s dyb A unless DROP)      acc_d = (dy * (g - 1)) W + s dyb A   (DROP)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if COMPUTE_DX:
        if HAS_LORA:
            offs_r = tl.arange(0, R_PAD)
            dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                          mask=m_ok & (offs_r[None, :] < R), other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=(offs_r[:, None] < R) & k_ok, other=0.0)
            lora = scaling * mma(dyb, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
            if DROP:
                acc_d = lora
            else:
                acc = lora
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_ok = ns < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=m_ok & n_ok[None, :], other=0.0)
        if COMPUTE_DX:
            if NF4_ALIGNED:
                w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, ns, pid_k * BLOCK_K, N, K, BLOCK_N, BLOCK_K,
                                  NF4_BLOCK, cdt)
            else:
                w = w_tile(w_ptr, absmax_ptr, code_ptr, ns[:, None], offs_k[None, :], N, K, stride_wn, stride_wk,
                           IS_NF4, NF4_BLOCK, cdt)
            if HAS_SCALE:
                g = tl.load(g_ptr + ns, mask=n_ok, other=0.0)
                if DROP:
                    acc = mma(dy, w, acc, DOT_FP32, INPUT_PRECISION)
                    dyg = (dy.to(tl.float32) * (g - 1.0)[None, :]).to(cdt)
                    acc_d = mma(dyg, w, acc_d, DOT_FP32, INPUT_PRECISION)
                else:
                    dyg = (dy.to(tl.float32) * g[None, :]).to(cdt)
                    acc = mma(dyg, w, acc, DOT_FP32, INPUT_PRECISION)
            else:
                acc = mma(dy, w, acc, DOT_FP32, INPUT_PRECISION)
        if DB or CY:
            if sums:
                dyf = dy.to(tl.float32)
                if DB:
                    tl.store(db_ptr + pid_m * N + ns, tl.sum(dyf, axis=0), mask=n_ok)
                if CY:
                    yv = tl.load(y_ptr + offs_m[:, None] * stride_ym + ns[None, :] * stride_yn,
                                 mask=m_ok & n_ok[None, :], other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        yv = yv - tl.load(bias_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    tl.store(c_ptr + pid_m * N + ns, tl.sum(dyf * yv, axis=0), mask=n_ok)

    if COMPUTE_DX:
        if DROP:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_k[None, :] * stride_kk,
                           mask=m_ok & k_ok, other=0)
            acc += tl.where(keep != 0, acc_d * mask_scale, 0.0)
        tl.store(dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                 acc.to(dx_ptr.dtype.element_ty), mask=m_ok & k_ok)


@triton.jit
def _colsums_kernel(
    dy_ptr, y_ptr, bias_ptr, db_ptr, c_ptr, M, N, ROWS,
    stride_dym, stride_dyn, stride_ym, stride_yn,
    DB: tl.constexpr, CY: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums alone (frozen_backward without dX): program (i, j) sums rows [i ROWS, (i + 1) ROWS)
    of columns [j BLOCK_N, (j + 1) BLOCK_N) in BLOCK_M-row steps, fp32:
        part_db[i, n] = sum dy[m, n]          part_c[i, n] = sum dy[m, n] (y[m, n] - b[n])
    A 2-D grid (row groups x column tiles) fills the GPU at any M; the partial rows are summed after."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    sdb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if CY and HAS_BIAS:
        b = tl.load(bias_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
    row0 = pid_m * ROWS
    for m0 in range(row0, tl.minimum(row0 + ROWS, M), BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: any M x N
        ok = (offs_m[:, None] < M) & n_ok[None, :]
        dyf = tl.load(dy_ptr + offs_m[:, None] * stride_dym + ns[None, :] * stride_dyn, mask=ok, other=0.0)
        dyf = dyf.to(tl.float32)
        if DB:
            sdb += tl.sum(dyf, axis=0)
        if CY:
            yv = tl.load(y_ptr + offs_m[:, None] * stride_ym + ns[None, :] * stride_yn, mask=ok, other=0.0)
            yv = yv.to(tl.float32)
            if HAS_BIAS:
                yv = yv - b[None, :]
            sc += tl.sum(dyf * yv, axis=0)
    if DB:
        tl.store(db_ptr + pid_m * N + ns, sdb, mask=n_ok)
    if CY:
        tl.store(c_ptr + pid_m * N + ns, sc, mask=n_ok)


COLSUM_TILE = (32, 128, 4)  # BLOCK_M, BLOCK_N, warps of _colsums_kernel
COLSUM_ROWS = 1024  # rows per program (a multiple of BLOCK_M): M / 1024 partial rows to sum after


def column_sums(dy, y=None, bias=None, want_db=True):
    """(sum_i dy [N] or None, sum_i dy * (y - bias) [N] or None), fp32, by `_colsums_kernel`."""
    M, N = dy.shape
    want_c = y is not None
    bm, bn, warps = COLSUM_TILE
    groups = max(triton.cdiv(M, COLSUM_ROWS), 1)
    db = torch.zeros((groups, N), device=dy.device, dtype=torch.float32) if want_db else None
    c = torch.zeros((groups, N), device=dy.device, dtype=torch.float32) if want_c else None
    if M and N and (want_db or want_c):
        yy = y if want_c else dy
        launch(_colsums_kernel, (groups, triton.cdiv(N, bn)), dy.device,
               dy, yy, bias if bias is not None else dy, db if want_db else c, c if want_c else db, M, N, COLSUM_ROWS,
               dy.stride(0), dy.stride(1), yy.stride(0), yy.stride(1),
               DB=int(want_db), CY=int(want_c), HAS_BIAS=int(bias is not None), BLOCK_M=bm, BLOCK_N=bn,
               num_warps=warps)
    return (db.sum(0) if want_db else None), (c.sum(0) if want_c else None)


def _tuned(fn, kernel, weight, flags, pre_hook):
    return autotuned(fn, _CONFIGS, kernel, weight, flags, _prune(kernel, weight == "nf4"), pre_hook)


_FWD_FLAGS = ["HAS_LORA", "HAS_SCALE", "DROP", "COLSUM", "COLMASK", "NF4_ALIGNED"]
_DX_FLAGS = ["COMPUTE_DX", "HAS_SCALE", "DROP", "DB", "CY", "NF4_ALIGNED"]
# the column-sum buffers' used rows depend on BLOCK_M: zero them between autotuning trials
_FWD_HOOK = zero_when(("out_ptr", "COLSUM"))
_DX_HOOK = zero_when(("db_ptr", "DB"), ("c_ptr", "CY"))
_FWD = {w: _tuned(_fwd_kernel, "fwd", kind, _FWD_FLAGS, _FWD_HOOK) for w, kind in ((0, "dense"), (1, "nf4"))}
_DX = {w: _tuned(_dx_kernel, "dx", kind, _DX_FLAGS, _DX_HOOK) for w, kind in ((0, "dense"), (1, "nf4"))}


# --------------------------------------------------------------------------------------------
# launcher helpers
# --------------------------------------------------------------------------------------------


def _same(name, t, dtype, device, shape=None):
    if t is None:
        return
    check(t.dtype == dtype, f"{name} dtype {t.dtype} != compute dtype {dtype}")
    check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if shape is not None:
        check(tuple(t.shape) == tuple(shape), f"{name} must be {list(shape)}, got {list(t.shape)}")


def _vec32(name, t, N, device):
    check(t.dtype == torch.float32 and t.shape == (N,) and t.device == device,
          f"{name} must be fp32 [{N}] on {device}, got {t.dtype} {list(t.shape)} on {t.device}")
    return t.contiguous()


def _keep(keep, M, K):
    if keep is None:
        return None
    check(tuple(keep.shape) == (M, K), f"keep mask must be [{M}, {K}], got {list(keep.shape)}")
    return keep.view(torch.uint8) if keep.dtype == torch.bool else keep


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def frozen_forward(x, weight, N, nf4=None, bias=None, lora=None, g=None, keep=None, mask_scale=1.0,
                   colsum=None, cols=None):
    """The forward kernel in any of its modes (see the header).

    x [M, K]; weight dense [N, K] (x's dtype) or packed NF4 with nf4=(absmax_fp32, code, blocksize);
    bias [N]; lora=(xa [M, r], lora_B [N, r], scaling); g fp32 [N] (DoRA column scale); keep: dropout
    keep-mask [M, K] (bool/uint8) -> DROP mode, needs g and lora. colsum=dy [M, N] switches to the
    COLSUM mode and returns fp32 [N] = sum_i dy * (x_d W^T + s xa B^T), restricted to the columns
    where `cols` (bool/uint8 [N]) is set when given. Otherwise returns [M, N] in x's dtype.
    """
    check(x.dim() == 2, f"x must be 2-D, got {x.dim()}-D")
    M, K = x.shape
    dtype, device = x.dtype, x.device
    check(dtype in DTYPES, f"unsupported dtype {dtype}")
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, device)
    check(K >= 1, "K must be >= 1")
    mode_colsum = colsum is not None
    _same("bias", bias, dtype, device, (N,))
    bias = bias.contiguous() if bias is not None else None  # the kernel reads bias[n] at offset n
    if lora is not None:
        xa, lb, scaling = lora
        r = lb.shape[1] if lb.dim() == 2 else -1
        _same("xa", xa, dtype, device, (M, r))
        _same("lora_B", lb, dtype, device, (N, r))
        rp = r_pad(r)
    else:
        xa = lb = x
        scaling, r, rp = 0.0, 1, 16
    if g is not None:
        g = _vec32("g", g, N, device)
    keep = _keep(keep, M, K)
    check(keep is None or (lora is not None and (g is not None or mode_colsum)),
          "the dropout (DROP) mode needs the LoRA factors and the column scale g")
    if mode_colsum:
        _same("dy", colsum, dtype, device, (M, N))
        if cols is not None:
            check(cols.shape == (N,) and cols.device == device, f"cols must be a [{N}] mask on {device}")
            cols = (cols.view(torch.uint8) if cols.dtype == torch.bool else cols).contiguous()
        rows = -(-M // _min_block_m("fwd", "nf4" if is_nf4 else "dense", M))
        out = torch.zeros((max(rows, 1), N), device=device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=device, dtype=dtype)
    for name, t in (("x", x), ("keep", keep), ("xa", xa), ("lora_B", lb), ("out", out), ("dy", colsum)):
        check_int32(name, t)
    if M == 0 or N == 0:
        return out.sum(0) if mode_colsum else out
    dot_fp32, prec = dot_flags(dtype)
    kp = keep if keep is not None else x
    dy = colsum if mode_colsum else x

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_FWD[is_nf4], grid, device,
        x, w, absmax, code, kp, xa, lb, g if g is not None else absmax, bias if bias is not None else x, dy,
        cols if cols is not None else kp, out,
        M, N, K, r, m_bucket(M),
        x.stride(0), x.stride(1), swn, swk, kp.stride(0), kp.stride(1), xa.stride(0), xa.stride(1),
        lb.stride(0), lb.stride(1), dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(mask_scale),
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), HAS_LORA=int(lora is not None), HAS_SCALE=int(g is not None and not mode_colsum),
        HAS_BIAS=int(bias is not None and not mode_colsum), DROP=int(keep is not None), COLSUM=int(mode_colsum),
        COLMASK=int(mode_colsum and cols is not None), R_PAD=rp, DOT_FP32=dot_fp32, INPUT_PRECISION=prec,
    )
    return out.sum(0) if mode_colsum else out


def frozen_backward(dy, weight, K, nf4=None, compute_dx=True, g=None, lora=None, keep=None, mask_scale=1.0,
                    want_db=False, y=None, bias=None):
    """The dx kernel in any of its modes (see the header). Returns (dx or None, db or None, c or None).

    dy [M, N]; weight as in frozen_forward; g fp32 [N]; lora=(dyb [M, r], lora_A [r, K], scaling) with
    dyb = (dy * g) B; keep [M, K] -> DROP mode (needs g and lora). want_db: db = sum_i dy (fp32 [N]).
    y [M, N] (the forward output) -> c = sum_i dy * (y - bias) (fp32 [N]).
    """
    check(dy.dim() == 2, f"dy must be 2-D, got {dy.dim()}-D")
    M, N = dy.shape
    dtype, device = dy.dtype, dy.device
    check(dtype in DTYPES, f"unsupported dtype {dtype}")
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, device)
    if lora is not None:
        dyb, la, scaling = lora
        r = la.shape[0] if la.dim() == 2 else -1
        _same("dyb", dyb, dtype, device, (M, r))
        _same("lora_A", la, dtype, device, (r, K))
        rp = r_pad(r)
    else:
        dyb = la = dy
        scaling, r, rp = 0.0, 1, 16
    if g is not None:
        g = _vec32("g", g, N, device)
    keep = _keep(keep, M, K)
    check(keep is None or (lora is not None and g is not None), "the DROP mode needs the LoRA factors and g")
    _same("y", y, dtype, device, (M, N))
    _same("bias", bias, dtype, device, (N,))
    bias = bias.contiguous() if bias is not None else None
    want_c = y is not None
    if not (compute_dx and K > 0) and M and N:  # column sums alone: their own kernel (2-D grid)
        db, c = column_sums(dy, y, bias, want_db)
        return (torch.zeros((M, K), device=device, dtype=dtype) if compute_dx else None), db, c
    dx = torch.empty((M, K), device=device, dtype=dtype) if compute_dx else None
    rows = max(-(-M // _min_block_m("dx", "nf4" if is_nf4 else "dense", M)), 1)
    db = torch.zeros((rows, N), device=device, dtype=torch.float32) if want_db else None
    c = torch.zeros((rows, N), device=device, dtype=torch.float32) if want_c else None
    for name, t in (("dy", dy), ("keep", keep), ("dyb", dyb), ("lora_A", la), ("y", y), ("dx", dx), ("db", db)):
        check_int32(name, t)
    finish = lambda t: None if t is None else t.sum(0)  # noqa: E731
    run_dx = compute_dx and K > 0
    if M == 0 or N == 0 or not (run_dx or want_db or want_c):
        if dx is not None and N == 0:
            dx.zero_()
        return dx, finish(db), finish(c)
    dot_fp32, prec = dot_flags(dtype)
    k_grid = K if run_dx else 1
    kp = keep if keep is not None else dy
    yy = y if y is not None else dy
    out = dx if run_dx else dy

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(k_grid, meta["BLOCK_K"]),)

    launch(_DX[is_nf4], grid, device,
        dy, w, absmax, code, g if g is not None else absmax, dyb, la, kp, yy, bias if bias is not None else dy,
        out, db if db is not None else absmax, c if c is not None else absmax,
        M, N, K, r, m_bucket(M), k_grid,
        dy.stride(0), dy.stride(1), swn, swk, dyb.stride(0), dyb.stride(1), la.stride(0), la.stride(1),
        kp.stride(0), kp.stride(1), yy.stride(0), yy.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(mask_scale),
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), COMPUTE_DX=int(run_dx), HAS_SCALE=int(g is not None),
        HAS_LORA=int(lora is not None), DROP=int(keep is not None), DB=int(want_db), CY=int(want_c),
        HAS_BIAS=int(bias is not None), R_PAD=rp, DOT_FP32=dot_fp32, INPUT_PRECISION=prec,
    )
    return dx, finish(db), finish(c)


# ---- BitFit ---------------------------------------------------------------------------------


def linear_forward(x, weight, bias, N, nf4=None):
    """y = x W^T (+ bias): x [M, K], W dense [N, K] or packed NF4 (nf4=(absmax_fp32, code, blocksize))."""
    return frozen_forward(x, weight, N, nf4=nf4, bias=bias)


def linear_backward(dy, weight, K, nf4=None, want_db=True):
    """(dx = dy W, db = sum over rows of dy in fp32 or None) in one pass over dy."""
    dx, db, _ = frozen_backward(dy, weight, K, nf4=nf4, compute_dx=True, want_db=want_db)
    return dx, db
