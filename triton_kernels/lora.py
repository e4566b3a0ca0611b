# Fused LoRA / QLoRA linear: Triton kernels.
#
# Forward   out[M, N] = x[M, K] . W[N, K]^T + s * xa[M, r] . B[N, r]^T (+ bias[N])
# Backward  dx[M, K]  = dy[M, N] . W[N, K]   + s * (dyb[M, r] . A[r, K]) * mask * 1/(1-p)
#
# W is dense (fp16 / bf16 / fp32, any strides) or NF4 (bitsandbytes layout: flat index n*K + k,
# byte index // 2, high nibble first, one fp32 absmax per `blocksize` consecutive flat elements).
# NF4 tiles are dequantized in registers inside the reduction loop: bytes and absmax are gathered
# by flat index, so odd K (rows straddling bytes and blocks) needs no special case and no dense
# copy of W is ever written to memory. xa = dropout(x) . A^T and dyb = dy . B are computed by the
# caller (tiny [M, r] matmuls); the LoRA term is one extra tl.dot per output tile before the
# reduction loop and seeds its fp32 accumulator (one accumulator, no spills), bias in the epilogue.
#
# Limits: r <= 128 (r is padded to a power of two >= 16 as a constexpr); every operand's element
# offsets (and N * K for NF4) < 2**31 (int32 index math; the launchers check). No split-K yet, so
# small M under-fills the GPU (the dX grid is ceil(M/BM) * ceil(K/BK) programs). The references
# these kernels are tested against live in deltakern/ops/lora.py (pure torch, no Triton needed).
#
# Cost model (bf16, M=8192, K=4096, N=14336, r=16): forward 2*M*N*K = 0.96 TFLOP, so it is
# matmul-bound (~1.4 ms at 700 TFLOP/s); the LoRA dot adds 2*M*N*r (+0.4 %). Bytes: x and W read
# once per tile row/column (W: 117 MB dense, 29 MB + 3.7 MB absmax as NF4), out written once.
# For decode (M <= 16) the kernel is bound by reading W: NF4 moves ~0.27x the bytes of bf16.
#
# Autotuning: a few configs keyed on (M bucket, N, K, flags). Pinned to one config when
# TRITON_INTERPRET=1 (tiny tiles, CPU interpreter) or DELTAKERN_TRITON_PIN=1 (first GPU config).
# The GPU configs are untuned guesses: no GPU was available when this file was written.

import torch
import triton
import triton.language as tl

from ._common import (
    DTYPES, autotuned, check, check_int32, dot_flags, fit_registers, fit_smem, grouped_tile, launch, m_bucket, mma,
    nf4_aligned, nf4_rows_tile, r_pad, smem_estimate, target_arch, w_tile, weight_args,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the first entry is the pinned one.
# For the dX kernel BLOCK_N is the reduction tile (over N) and BLOCK_K the output-column tile.
# NF4 tiles gather two fp32 values per weight element (code, absmax), which the software pipeline
# stages through shared memory, so the NF4 lists use fewer stages.
_CONFIGS = {
    ("fwd", "dense"): [
        (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4), (16, 64, 128, 1, 4, 4), (16, 128, 64, 1, 4, 3), (16, 32, 128, 1, 4, 4),
    ],
    ("fwd", "nf4"): [
        (128, 128, 64, 8, 8, 2), (128, 128, 32, 8, 8, 3), (64, 128, 64, 8, 4, 2), (64, 64, 64, 8, 4, 3),
        (32, 128, 64, 4, 4, 2), (16, 128, 64, 1, 4, 2), (16, 64, 128, 1, 4, 2),
    ],
    ("dx", "dense"): [
        (128, 64, 128, 8, 8, 3), (128, 64, 256, 8, 8, 3), (128, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
        (64, 64, 64, 8, 4, 4), (16, 128, 64, 1, 4, 3),
    ],
    ("dx", "nf4"): [
        (128, 64, 128, 8, 8, 2), (128, 32, 128, 8, 8, 3), (64, 64, 128, 8, 4, 2), (64, 64, 64, 8, 4, 3),
        (16, 128, 64, 1, 4, 2),
    ],
}


def _fit_smem(kernel, nf4):
    def prune(configs, named_args, **kwargs):
        t = named_args["x_ptr" if kernel == "fwd" else "dy_ptr"]
        out_key, red_key = ("BLOCK_N", "BLOCK_K") if kernel == "fwd" else ("BLOCK_K", "BLOCK_N")
        configs = fit_registers(configs, target_arch(t), nf4, out_key, red_key)
        return fit_smem(configs, lambda cfg: smem_estimate(kernel, cfg, t.element_size(), nf4)) or configs[-1:]

    return {"early_config_prune": prune}


# --------------------------------------------------------------------------------------------
# kernels (the shared jit helpers live in _common.py)
# --------------------------------------------------------------------------------------------


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, out_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_ar,
    stride_bn, stride_br, stride_om, stride_on,
    scaling,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    cdt = x_ptr.dtype.element_ty

    offs_r = tl.arange(0, R_PAD)
    if NF4_ALIGNED:
        # out^T = W x^T + s B xa^T: the decoded W tile is the MMA's left operand, which the MMA can
        # read from registers, so the decoded tile need not be written to shared memory first.
        bm = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        xat = tl.load(xa_ptr + offs_m[None, :] * stride_am + offs_r[:, None] * stride_ar,
                      mask=(offs_m[None, :] < M) & (offs_r[:, None] < R), other=0.0)
        acct = scaling * mma(bm, xat, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None] * stride_xk,
                         mask=(offs_m[None, :] < M) & (ks[:, None] < K), other=0.0)
            w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCK, cdt)
            acct = mma(w, xt, acct, DOT_FP32, INPUT_PRECISION)
        acc = tl.trans(acct)
    else:
        # LoRA term first, [BLOCK_M, R_PAD] . [R_PAD, BLOCK_N] (r zero-padded) times s in fp32: it seeds
        # the accumulator, so a single fp32 [BLOCK_M, BLOCK_N] tile is live in the loop (a second one
        # for the LoRA term spilled). Only the fp32 summation order differs from adding it last.
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                     mask=m_ok & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
        acc = scaling * mma(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)

        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=m_ok & (ks[None, :] < K), other=0.0)
            # W^T tile [BLOCK_K, BLOCK_N]: rows of W are n, columns k
            if NF4_ALIGNED:
                wt = tl.trans(nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K,
                                            BLOCK_N, BLOCK_K, NF4_BLOCK, cdt))
            else:
                wt = w_tile(w_ptr, absmax_ptr, code_ptr, offs_n[None, :], ks[:, None], N, K,
                            stride_wn, stride_wk, IS_NF4, NF4_BLOCK, cdt)
            acc = mma(x, wt, acc, DOT_FP32, INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += bias[None, :]

    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok & (offs_n[None, :] < N))


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, code_ptr, dyb_ptr, a_ptr, mask_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bm, stride_br,
    stride_ar, stride_ak, stride_mm, stride_mk, stride_xm, stride_xk,
    scaling, mask_scale,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, HAS_MASK: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # output tile [BLOCK_M, BLOCK_K] of dx; reduction over N; HAS_MASK: dropout keep-mask
    pid_m, pid_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    k_ok = offs_k[None, :] < K
    cdt = dy_ptr.dtype.element_ty

    # the (masked) LoRA term first: it seeds the single fp32 accumulator of the loop (see the forward)
    offs_r = tl.arange(0, R_PAD)
    dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                  mask=m_ok & (offs_r[None, :] < R), other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & k_ok, other=0.0)
    lora = mma(dyb, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, INPUT_PRECISION)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_k[None, :] * stride_mk,
                       mask=m_ok & k_ok, other=0)
        lora = tl.where(keep != 0, lora * mask_scale, 0.0)
    acc = scaling * lora

    if NF4_ALIGNED:
        # dx^T = W^T dy^T: the decoded W tile is the MMA's left operand (registers; see the forward)
        acct = tl.trans(acc)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + offs_n
            dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + ns[:, None] * stride_dyn,
                          mask=(offs_m[None, :] < M) & (ns[:, None] < N), other=0.0)
            w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, ns, pid_k * BLOCK_K, N, K,
                              BLOCK_N, BLOCK_K, NF4_BLOCK, cdt)
            acct = mma(tl.trans(w), dyt, acct, DOT_FP32, INPUT_PRECISION)
        acc = tl.trans(acct)
    else:
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + offs_n
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + ns[None, :] * stride_dyn,
                         mask=m_ok & (ns[None, :] < N), other=0.0)
            w = w_tile(w_ptr, absmax_ptr, code_ptr, ns[:, None], offs_k[None, :], N, K,
                       stride_wn, stride_wk, IS_NF4, NF4_BLOCK, cdt)
            acc = mma(dy, w, acc, DOT_FP32, INPUT_PRECISION)

    tl.store(dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok & k_ok)


def _tuned(fn, kernel, weight, flag):
    return autotuned(fn, _CONFIGS, kernel, weight, [flag, "NF4_ALIGNED"], _fit_smem(kernel, weight == "nf4"))


_FWD = {0: _tuned(_lora_fwd_kernel, "fwd", "dense", "HAS_BIAS"), 1: _tuned(_lora_fwd_kernel, "fwd", "nf4", "HAS_BIAS")}
_DX = {0: _tuned(_lora_dx_kernel, "dx", "dense", "HAS_MASK"), 1: _tuned(_lora_dx_kernel, "dx", "nf4", "HAS_MASK")}


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def lora_forward(x, weight, bias, xa, lora_B, scaling, nf4=None):
    """out = x . W^T + s * xa . B^T (+ bias).

    x [M, K]; weight: dense [N, K] in x's dtype, or (with `nf4=(absmax_fp32, code, blocksize)`)
    the packed NF4 bytes of an [N, K] weight whose N is lora_B.shape[0]; xa [M, r]; lora_B [N, r];
    bias [N] or None. Returns [M, N] in x's dtype.
    """
    check(x.dim() == 2, f"x must be 2-D, got {x.dim()}-D")
    M, K = x.shape
    N, r = lora_B.shape
    dtype = x.dtype
    check(dtype in DTYPES, f"unsupported dtype {dtype}")
    check(tuple(xa.shape) == (M, r), f"xa must be [{M}, {r}], got {tuple(xa.shape)}")
    for name, t in (("xa", xa), ("lora_B", lora_B), ("bias", bias)) + ((("weight", weight),) if nf4 is None else ()):
        if t is not None:
            check(t.dtype == dtype, f"{name} dtype {t.dtype} != x dtype {dtype}")
            check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")
    if bias is not None:
        check(bias.shape == (N,), f"bias must be [{N}]")
        bias = bias.contiguous()
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, x.device)
    out = torch.empty((M, N), device=x.device, dtype=dtype)
    for name, t in (("x", x), ("xa", xa), ("lora_B", lora_B), ("out", out)):
        check_int32(name, t)
    if M == 0 or N == 0:
        return out
    if K == 0:
        raise ValueError("K must be >= 1")
    dot_fp32, precision = dot_flags(dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_FWD[is_nf4], grid, x.device,
        x, w, absmax, code, xa, lora_B, bias if bias is not None else x, out,
        M, N, K, r, m_bucket(M),
        x.stride(0), x.stride(1), swn, swk, xa.stride(0), xa.stride(1),
        lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), HAS_BIAS=int(bias is not None), R_PAD=r_pad(r),
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    return out


def lora_backward_dx(dy, weight, dyb, lora_A, scaling, mask=None, mask_scale=1.0, nf4=None):
    """dx = dy . W + s * (dyb . A) [* mask * mask_scale].

    dy [M, N]; weight dense [N, K] or packed NF4 (see lora_forward); dyb = dy . B [M, r];
    lora_A [r, K]; mask: the dropout keep-mask [M, K] (bool / uint8) or None. Returns [M, K].
    """
    check(dy.dim() == 2, f"dy must be 2-D, got {dy.dim()}-D")
    M, N = dy.shape
    r, K = lora_A.shape
    dtype = dy.dtype
    check(dtype in DTYPES, f"unsupported dtype {dtype}")
    check(tuple(dyb.shape) == (M, r), f"dyb must be [{M}, {r}], got {tuple(dyb.shape)}")
    for name, t in (("dyb", dyb), ("lora_A", lora_A)) + ((("weight", weight),) if nf4 is None else ()):
        check(t.dtype == dtype, f"{name} dtype {t.dtype} != dy dtype {dtype}")
        check(t.device == dy.device, f"{name} is on {t.device}, dy on {dy.device}")
    if mask is not None:
        check(tuple(mask.shape) == (M, K), f"mask must be [{M}, {K}]")
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, dy.device)
    out = torch.empty((M, K), device=dy.device, dtype=dtype)
    for name, t in (("dy", dy), ("dyb", dyb), ("lora_A", lora_A), ("mask", mask), ("dx", out)):
        check_int32(name, t)
    if M == 0 or K == 0:
        return out
    if N == 0:
        raise ValueError("N must be >= 1")
    dot_fp32, precision = dot_flags(dtype)
    m = mask if mask is not None else dy

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    launch(_DX[is_nf4], grid, dy.device,
        dy, w, absmax, code, dyb, lora_A, m, out,
        M, N, K, r, m_bucket(M),
        dy.stride(0), dy.stride(1), swn, swk, dyb.stride(0), dyb.stride(1),
        lora_A.stride(0), lora_A.stride(1), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(mask_scale),
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), HAS_MASK=int(mask is not None), R_PAD=r_pad(r),
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    return out
