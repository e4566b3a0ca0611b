# NF4 decode GEMV: out[M, N] = x[M, K] . W^T (+ bias) for small M (M <= 16, e.g. token-by-token
# generation), written to be bound by reading W rather than by instruction issue.
#
# W is NF4 in the bitsandbytes layout with rows starting on a block (K % blocksize == 0, which also
# makes K even): row n holds bytes [n*K/2, (n+1)*K/2), byte j = (code(2j) << 4) | code(2j+1), one fp32
# absmax per `blocksize` consecutive elements. Elements decode as cast(fp32(code[nibble] * absmax))
# (the dequantize rule), so out equals x . dequantize(W)^T computed with fp32 accumulation.
#
# Per program: BLOCK_N rows of W over all of K, in steps of BLOCK_K elements:
#   * one vector load of the BLOCK_K / 2 packed bytes of each row;
#   * a 256-entry pair table indexed by the byte (pair[b] = code[b >> 4] | code[b & 15] << 32, 2 KB,
#     L1-resident) gives both levels of a byte with one 8-byte load: half a lookup per element and no
#     nibble arithmetic;
#   * one absmax per (row, block), broadcast over the block;
#   * no interleave: the high nibbles are the even columns and the low nibbles the odd ones, so x is
#     read as its even and odd columns (x is tiny and stays in L1/L2) and the tile is two dots,
#     x_even . W_hi^T + x_odd . W_lo^T, with M padded to 16 rows.
# Bytes moved: N*K/2 (W) + 4*N*K/blocksize (absmax) + M*K*2 (x, per program, from cache) + M*N*2.
# At 14336 x 4096 that is 29.4 MB + 3.7 MB: ~11 us at 3 TB/s (the H100 target is <= 14 us, M = 1).
#
# Limits: M <= 16; K % blocksize == 0; N * K < 2**31 (int32 offsets). Autotuned over a few tile
# shapes (untuned guesses: no GPU was available when this was written); pinned to one tiny config in
# the interpreter.

import torch
import triton
import triton.language as tl

from ._common import (  # noqa: F401
    DTYPES, INTERPRET, PIN, check, check_int32, dot_flags, launch, mma, pair_table, target_arch,
)

MAX_M = 16

# (BLOCK_N, BLOCK_K, warps, stages)
# (the kernel report's sm_90 compiles: none spills; wider tiles did, and so did 32 x 512 once x is
# loaded as one contiguous tile)
_CONFIGS = [(64, 256, 4, 1), (32, 256, 4, 1), (64, 128, 4, 1)]
if INTERPRET:
    _CONFIGS = [(16, 64, 4, 1)]
elif PIN:
    _CONFIGS = _CONFIGS[:1]


def _prune(configs, named_args, **kwargs):
    """sm_8x: W tiles of at most 8192 elements (the kernel report's sm_80 compiles spill at 64 x 256)."""
    if target_arch(named_args["x_ptr"]) >= 90:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 8192] or configs[-1:]


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _CONFIGS],
    key=["M_PAD", "N", "K", "NF4_BLOCK", "HAS_BIAS"], prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, absmax_ptr, pair_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_xk, stride_om, stride_on,
    NF4_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    NB: tl.constexpr = BLOCK_K // NF4_BLOCK if BLOCK_K > NF4_BLOCK else 1
    WIDTH: tl.constexpr = HALF // NB  # bytes per (row, block) within a tile
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m[:, None] < M
    j = tl.arange(0, HALF)
    cdt = x_ptr.dtype.element_ty
    half_k = K // 2
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + j  # byte column
        k_ok = kb < half_k
        b = tl.load(w_ptr + rows[:, None] * half_k + kb[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        pair = tl.load(pair_ptr + b.to(tl.int32))  # int64: level(high nibble) | level(low nibble) << 32
        hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        cb = k0 + tl.arange(0, NB) * (2 * WIDTH)
        scale = tl.load(absmax_ptr + (rows[:, None] * K + cb[None, :]) // NF4_BLOCK,
                        mask=row_ok[:, None] & (cb[None, :] < K), other=0.0)[:, :, None]
        w_hi = tl.reshape(tl.reshape(hi, (BLOCK_N, NB, WIDTH)) * scale, (BLOCK_N, HALF)).to(cdt)
        w_lo = tl.reshape(tl.reshape(lo, (BLOCK_N, NB, WIDTH)) * scale, (BLOCK_N, HALF)).to(cdt)
        xk = k0 + tl.arange(0, BLOCK_K)  # one contiguous load of the x tile, split into even / odd columns
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                     mask=m_ok & (xk < K)[None, :], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(xt, (M_PAD, HALF, 2)))
        acc = mma(x_even, tl.trans(w_hi), acc, DOT_FP32, INPUT_PRECISION)
        acc = mma(x_odd, tl.trans(w_lo), acc, DOT_FP32, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + rows[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok & row_ok[None, :])


def decode_forward(x, weight, bias, N, nf4):
    """out = x . W^T (+ bias) for an NF4 W [N, K] and x [M, K] with M <= 16.

    weight: the packed bytes; nf4 = (absmax fp32 [ceil(N*K/blocksize)], code fp32 [16], blocksize)
    with K % blocksize == 0; bias [N] or None in x's dtype. Returns [M, N] in x's dtype.
    """
    check(x.dim() == 2, f"x must be 2-D, got {x.dim()}-D")
    M, K = x.shape
    dtype, device = x.dtype, x.device
    check(dtype in DTYPES, f"unsupported dtype {dtype}")
    check(M <= MAX_M, f"the decode kernel takes M <= {MAX_M} rows, got {M}")
    absmax, code, blocksize = nf4
    check(blocksize > 0 and blocksize & (blocksize - 1) == 0, f"blocksize {blocksize} must be a power of two")
    check(K % blocksize == 0, f"the decode kernel needs K % blocksize == 0 (K={K}, blocksize={blocksize})")
    check(N * K < 2**31, f"N*K = {N * K} needs int64 offsets (unsupported)")
    packed = weight.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    check(packed.numel() >= N * K // 2, f"packed NF4 data has {packed.numel()} bytes, need {N * K // 2}")
    check(absmax.dtype == torch.float32 and absmax.numel() >= N * K // blocksize,
          "absmax must be fp32 with N*K/blocksize entries (decode nested scales first)")
    check(code.dtype == torch.float32 and code.numel() == 16, "code must be 16 fp32 values")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code), ("bias", bias)):
        if t is not None:
            check(t.device == device, f"{name} is on {t.device}, x on {device}")
    if bias is not None:
        check(bias.shape == (N,) and bias.dtype == dtype, f"bias must be [{N}] in {dtype}")
        bias = bias.contiguous()
    out = torch.empty((M, N), device=device, dtype=dtype)
    check_int32("x", x)
    if M == 0 or N == 0:
        return out
    check(K >= 1, "K must be >= 1")
    dot_fp32, precision = dot_flags(dtype)
    launch(_decode_kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), device,
           x, packed, absmax.reshape(-1).contiguous(), pair_table(code), bias if bias is not None else x, out,
           M, N, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
           NF4_BLOCK=int(blocksize), HAS_BIAS=int(bias is not None), M_PAD=16,
           DOT_FP32=dot_fp32, INPUT_PRECISION=precision)
    return out
