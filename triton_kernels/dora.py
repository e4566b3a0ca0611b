# DoRA / QDoRA weight-norm kernels (the output and dX kernels with DoRA's column scale live in
# triton_kernels/linear.py).
#
# DoRA scales each output feature j by m_j / ||W_j + s (B A)_j||. The row norms are computed
# without materialising B A or a dense W:
#     ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2 s <B_j, (W A^T)_j> + s^2 <B_j, (B (A A^T))_j>
# _norm_parts_kernel streams W once (dense, or NF4 dequantized in registers to the compute dtype
# exactly as the forward uses it) and produces W A^T [N, r] (fp32) and, optionally, the row sums of
# squares ||W_j||^2 (fp32) from the same tiles. A A^T and B (A A^T) are tiny torch matmuls.
# _ctw_kernel computes C^T W [r, K] (C [N, r]) in one pass over W: the extra gradient term of the
# exact (non-detached) norm, dA += s (w * B)^T W.
#
# Both kernels split their reduction over programs (fp32 partials summed by the caller) so a few
# hundred programs stream W even when N or K alone gives few tiles. Bytes: W once (N*K*elem dense,
# N*K/2 + 4*N*K/blocksize NF4) + O((N + K) r); FLOPs 2*N*K*r. They run once per optimizer step
# (the norm is cached on the module) or once per backward with exact_norm_grad, so the tile sizes
# are plain untuned defaults (no GPU was available when this was written). Limits: r <= 128,
# int32 offsets (checked).

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, check, check_int32, dot_flags, launch, mma, nf4_aligned, nf4_rows_tile, r_pad, w_tile, weight_args,
)

# (BLOCK_N, BLOCK_K): rows of W x reduction tile for norm_parts, reduction tile x columns for ctw.
# Chunks of the split reduction are whole tiles, so tiles never cross into the next chunk.
_NORM_TILE = (16, 32) if INTERPRET else (64, 128)
_CTW_TILE = (32, 32) if INTERPRET else (128, 64)


@triton.jit
def _norm_parts_kernel(
    w_ptr, absmax_ptr, code_ptr, a_ptr, wa_ptr, sq_ptr,
    N, K, R, K_CHUNK,
    stride_wn, stride_wk, stride_ar, stride_ak,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, SUMSQ: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)  # which K chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    cdt = a_ptr.dtype.element_ty
    k_lo = pid_s * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)  # K_CHUNK is a multiple of BLOCK_K
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if NF4_ALIGNED:
            w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCK, cdt)
        else:
            w = w_tile(w_ptr, absmax_ptr, code_ptr, offs_n[:, None], ks[None, :], N, K, stride_wn, stride_wk,
                       IS_NF4, NF4_BLOCK, cdt)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                     mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)
        acc = mma(w, at, acc, DOT_FP32, INPUT_PRECISION)
        if SUMSQ:
            wf = w.to(tl.float32)
            sq += tl.sum(wf * wf, axis=1)
    n_ok = offs_n < N
    base = pid_s * N
    tl.store(wa_ptr + (base + offs_n[:, None]) * R + offs_r[None, :], acc,
             mask=n_ok[:, None] & (offs_r[None, :] < R))
    if SUMSQ:
        tl.store(sq_ptr + base + offs_n, sq, mask=n_ok)


@triton.jit
def _ctw_kernel(
    c_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr,
    N, K, R, N_CHUNK,
    stride_cn, stride_cr, stride_wn, stride_wk,
    IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_ALIGNED: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)  # which N chunk
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    cdt = c_ptr.dtype.element_ty
    n_lo = pid_s * N_CHUNK
    n_hi = tl.minimum(n_lo + N_CHUNK, N)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        ct = tl.load(c_ptr + ns[None, :] * stride_cn + offs_r[:, None] * stride_cr,
                     mask=(ns[None, :] < N) & (offs_r[:, None] < R), other=0.0)  # [R_PAD, BLOCK_N]
        if NF4_ALIGNED:
            w = nf4_rows_tile(w_ptr, absmax_ptr, code_ptr, ns, pid_k * BLOCK_K, N, K, BLOCK_N, BLOCK_K, NF4_BLOCK,
                              cdt)
        else:
            w = w_tile(w_ptr, absmax_ptr, code_ptr, ns[:, None], offs_k[None, :], N, K, stride_wn, stride_wk,
                       IS_NF4, NF4_BLOCK, cdt)
        acc = mma(ct, w, acc, DOT_FP32, INPUT_PRECISION)
    tl.store(out_ptr + (pid_s * R + offs_r[:, None]) * K + offs_k[None, :], acc,
             mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(tiles, reduce_len, block, device):
    """How many chunks to split a reduction of `reduce_len` into, so ~2 programs per SM run."""
    if device.type != "cuda":
        return 2 if reduce_len > 2 * block else 1  # the interpreter: exercise the split path
    want = -(-2 * _sm_count(device.index or 0) // max(tiles, 1))
    return max(1, min(want, -(-reduce_len // (4 * block))))


def _chunks(tiles, reduce_len, block, device):
    """(number of chunks, chunk length): the reduction split into whole `block` tiles per chunk."""
    split = _splits(tiles, reduce_len, block, device) if reduce_len > 0 else 1
    chunk = triton.cdiv(triton.cdiv(max(reduce_len, 1), split), block) * block
    return triton.cdiv(max(reduce_len, 1), chunk), chunk


def norm_parts(weight, lora_A, N, nf4=None, want_sumsq=True):
    """(W A^T fp32 [N, r], ||W_j||^2 fp32 [N] or None) in one pass over W.

    weight: dense [N, K] in lora_A's dtype, or packed NF4 bytes with nf4=(absmax_fp32, code,
    blocksize) (dequantized to lora_A's dtype, the compute dtype). lora_A [r, K].
    """
    check(lora_A.dim() == 2, "lora_A must be [r, K]")
    r, K = lora_A.shape
    dtype, device = lora_A.dtype, lora_A.device
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, device)
    rp = r_pad(r)
    check_int32("lora_A", lora_A)
    bn, bk = _NORM_TILE
    tiles = triton.cdiv(N, bn)
    split, chunk = _chunks(tiles, K, bk, device)
    wa = torch.zeros((split, N, r), device=device, dtype=torch.float32)
    sq = torch.zeros((split, N), device=device, dtype=torch.float32)
    if N == 0 or K == 0:
        return wa.sum(0), (sq.sum(0) if want_sumsq else None)
    dot_fp32, prec = dot_flags(dtype)
    launch(_norm_parts_kernel, (tiles, split), device,
        w, absmax, code, lora_A, wa, sq, N, K, r, chunk, swn, swk, lora_A.stride(0), lora_A.stride(1),
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), SUMSQ=int(want_sumsq), R_PAD=rp, DOT_FP32=dot_fp32, INPUT_PRECISION=prec,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1 if INTERPRET else (2 if is_nf4 else 3),
    )
    return wa.sum(0), (sq.sum(0) if want_sumsq else None)


def ctw(c, weight, K, nf4=None):
    """C^T W as fp32 [r, K]: c [N, r] in the compute dtype; weight as in norm_parts."""
    check(c.dim() == 2, "c must be [N, r]")
    N, r = c.shape
    dtype, device = c.dtype, c.device
    w, absmax, code, swn, swk, is_nf4, blk = weight_args(weight, nf4, N, K, dtype, device)
    rp = r_pad(r)
    check_int32("c", c)
    bn, bk = _CTW_TILE
    tiles = triton.cdiv(K, bk)
    split, chunk = _chunks(tiles, N, bn, device)
    out = torch.zeros((split, r, K), device=device, dtype=torch.float32)
    if N == 0 or K == 0:
        return out.sum(0)
    dot_fp32, prec = dot_flags(dtype)
    launch(_ctw_kernel, (tiles, split), device,
        c, w, absmax, code, out, N, K, r, chunk, c.stride(0), c.stride(1), swn, swk,
        IS_NF4=is_nf4, NF4_BLOCK=blk, NF4_ALIGNED=nf4_aligned(is_nf4, K, blk), R_PAD=rp, DOT_FP32=dot_fp32, INPUT_PRECISION=prec,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1 if INTERPRET else (2 if is_nf4 else 3),
    )
    return out.sum(0)
