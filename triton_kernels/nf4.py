# NF4 blockwise 4-bit quantization, bit-compatible with bitsandbytes 0.50.2.
#
# Format. n elements, flattened row-major, split into blocks of `blocksize` consecutive elements
# (32, 64, ..., 4096; the last block may be partial). Byte i = nibble(2i) << 4 | nibble(2i+1):
# the high nibble is the first element; an odd n pads the low nibble with the code of a 0. Scales: fp32 absmax per
# block, or (nested / double quantization) a uint8 per block decoded as
#     absmax_f = fp32(nested_code[q] * nested_absmax[block // 256]);  absmax_f = fp32(absmax_f + offset)
# (two roundings, never an FMA).
#
# dequantize_nf4: out[e] = cast_rne(fp32(code[nibble(e)] * absmax_f[e // blocksize])).
#   One launch. A program expands BLOCK packed bytes into 2*BLOCK outputs: one vector load of
#   bytes, both levels of a byte from one 8-byte load of a 256-entry pair table (L1-resident), one
#   scale per NF4 block (blocksize is a constexpr; a byte never straddles blocks because blocksize
#   is even), and the byte's two outputs stored as one 32- (or 64-) bit word: no interleave.
#   Memory bound: n/2 + n*sizeof(out) bytes + the scales (4 B per block, or 1 B per block + 4 B
#   per 256 blocks nested).
#
# quantize_nf4 / quantize_nested: bitsandbytes' CUDA blockwise quantizer (kQuantizeBlockwise), whose
# rule deltakern/backends/reference/nf4.py states once (blockwise_scale, nf4_codes_of, dynamic_codes_of). x is read as fp32;
# per block (the last one padded with zeros), with ftz() flushing subnormals to zero:
#   absmax = max|ftz(x)|;  inv = ftz(rcp(absmax));  z = ftz(ftz(x) * inv)
#   NF4 nibble = #{j : z > t_j} over 15 fixed fp32 thresholds (4-step binary search; NaN -> 0)
#   8-bit code = #{j : z > m_j} over the 255 fp32 midpoints of the dynamic map (8-step binary
#                search), then a z equal to m_q with q odd moves to q + 1 (ties to the even index)
# so an all-zero block (absmax 0, z = 0 * inf = NaN) packs 0x00 / stores code 0. rcp is the hardware
# reciprocal rcp.approx.ftz.f32 on the GPU (what bitsandbytes' fast-math build uses, hence its exact
# bytes), and the correctly rounded 1/absmax in the interpreter, which cannot run inline PTX (the
# references' rule, bit for bit). The flushes are explicit, whatever the compiler's denormal mode.
#   quantize_nf4: one program per ROWS blocks, a [ROWS, blocksize] tile.
#     Bytes: n*sizeof(x) + n/2 + 4 per block.
#   quantize_nested: one program per ROWS blocks of 256 fp32 values. Bytes: 5n + 4 per 256.
#
# Exactness on the GPU: every launch passes enable_fp_fusion=False so no multiply/add pair is
# contracted into an FMA.
# Autotuning is pinned to its first config when DELTAKERN_TRITON_PIN=1 or TRITON_INTERPRET=1.
import contextlib
import os

import torch
import triton
import triton.language as tl

from ._common import launch, pair_table
from deltakern.backends.reference.nf4 import dequantize_nf4_ref, quantize_nested_ref, quantize_nf4_ref  # noqa: F401,E501  (the references)

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX there
_PIN = os.environ.get("DELTAKERN_TRITON_PIN") == "1" or _INTERPRET
# The hardware reciprocal is inline PTX, which only a GPU compile can run; the interpreter takes the
# correctly rounded 1/x instead (the reference's rule). A GPU launch always passes HW_RCP=1.
HW_RCP = 0 if _INTERPRET else 1


def _ieee_quiet():
    """The interpreter computes with NumPy, which warns on 1/0 and 0 * inf; an all-zero block does both
    on purpose (absmax 0 -> inv = inf -> z = NaN -> code 0). The GPU computes the same silently."""
    if _INTERPRET:
        import numpy as np

        return np.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _pinned(configs):
    return configs[:1] if _PIN else configs


# ----------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_pinned([
        # 32 packed bytes (64 outputs) per thread in every config: the per-program set-up then costs
        # under 1 SASS instruction per output (16 bytes per thread measured 8.2-9.1 in all, 6.9-7.1 in
        # total with 32 in the kernel report); the smaller programs keep small tensors spread over the SMs.
        # first (the pinned one): the fewest SASS instructions per output in the kernel report
        triton.Config({"BLOCK": 8192}, num_warps=8),
        triton.Config({"BLOCK": 16384}, num_warps=16),
        triton.Config({"BLOCK": 4096}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=2),
    ]),
    key=["n", "NESTED", "BLOCKSIZE", "OUT_BITS", "ODD"],
)
@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, pair_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    n, nbytes, offset,
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, OUT_BITS: tl.constexpr, ODD: tl.constexpr, PACK_ASM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # BLOCK packed bytes per program as [BLOCK / BPB, BPB] (BPB = bytes per NF4 block; BLOCK >= BPB):
    # one scale per row of that tile; both levels of a byte from one 8-byte load of the pair table;
    # the two outputs of a byte written as one word (OUT_BITS = 16: two 16-bit values in a 32-bit
    # word, the first element in the low half, i.e. at the lower address; 32: two fp32 in 64 bits),
    # so there is no interleave. An odd n: the last byte's word would write past the end, so the
    # program holding it writes its first element alone.
    BPB: tl.constexpr = BLOCKSIZE // 2
    ROWS: tl.constexpr = BLOCK // BPB
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)
    byte = blk[:, None] * BPB + tl.arange(0, BPB)[None, :]
    full = byte < n // 2  # bytes holding two elements
    b = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0)
    pair = tl.load(pair_ptr + b.to(tl.int32))
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    blk_ok = blk * BPB < nbytes
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + (blk >> 8), mask=blk_ok, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
    fh = hi * scale[:, None]
    fl = lo * scale[:, None]
    if OUT_BITS == 16:
        if PACK_ASM:  # one round-to-nearest-even cvt packs both outputs of a byte (sm_80+)
            op: tl.constexpr = "cvt.rn.bf16x2.f32" if out_ptr.dtype.element_ty == tl.bfloat16 else "cvt.rn.f16x2.f32"
            word = tl.inline_asm_elementwise(op + " $0, $2, $1;", "=r,f,f", [fh, fl], dtype=tl.uint32,
                                             is_pure=True, pack=1)  # low half: the first element
        else:
            vh = fh.to(out_ptr.dtype.element_ty).to(tl.uint16, bitcast=True).to(tl.uint32)
            word = vh | (fl.to(out_ptr.dtype.element_ty).to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
        tl.store(out_ptr.to(tl.pointer_type(tl.uint32)) + byte, word, mask=full)
    else:
        word = fh.to(tl.uint32, bitcast=True).to(tl.uint64) | (fl.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
        tl.store(out_ptr.to(tl.pointer_type(tl.uint64)) + byte, word, mask=full)
    if ODD:
        last = n // 2  # the byte whose low nibble is padding
        tl.store(out_ptr + 2 * byte, fh.to(out_ptr.dtype.element_ty), mask=byte == last)


@triton.jit
def _ftz(v):
    """v with subnormals (exponent bits all zero) replaced by +0; NaN and inf pass."""
    return tl.where((v.to(tl.int32, bitcast=True) & 0x7F800000) == 0, 0.0, v)


@triton.jit
def _rcp(a, HW_RCP: tl.constexpr):
    """ftz(1 / a): the hardware rcp.approx.ftz.f32 (within 1 ulp) or the correctly rounded quotient."""
    if HW_RCP:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), a)
    return _ftz(r)


@triton.jit
def _scale_blocks(x_ptr, row, n, BLOCKSIZE: tl.constexpr, HW_RCP: tl.constexpr):
    """(z [ROWS, BLOCKSIZE], absmax [ROWS]) of blocks `row`: elements past n load as 0 (reference.nf4.blockwise_scale)."""
    elem = row[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    v = _ftz(tl.load(x_ptr + elem, mask=elem < n, other=0.0).to(tl.float32))
    amax = tl.max(tl.abs(v), axis=1)
    z = _ftz(v * _rcp(amax, HW_RCP)[:, None])
    return z, amax


@triton.jit
def _quantize_nf4_kernel(
    x_ptr, thr_ptr, packed_ptr, absmax_ptr, n, nbytes, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, HW_RCP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    z, amax = _scale_blocks(x_ptr, row, n, BLOCKSIZE, HW_RCP)
    # q = number of thresholds strictly below z (binary search over the 15 sorted ones; NaN -> 0)
    q = tl.zeros([ROWS, BLOCKSIZE], tl.int32)
    for i in tl.static_range(4):
        q = tl.where(z > tl.load(thr_ptr + q + (7 >> i)), q + (8 >> i), q)
    hi, lo = tl.split(tl.reshape(q, (ROWS, BLOCKSIZE // 2, 2)))
    byte = row[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte, ((hi << 4) | lo).to(tl.uint8), mask=byte < nbytes)
    tl.store(absmax_ptr + row, amax, mask=row < nblocks)


@triton.jit
def _quantize_nested_kernel(
    x_ptr, mid_ptr, q_ptr, absmax_ptr, n, nblocks,
    ROWS: tl.constexpr, HW_RCP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    z, amax = _scale_blocks(x_ptr, row, n, 256, HW_RCP)
    # q = number of the 255 sorted midpoints strictly below z (NaN -> 0), then ties to the even index
    q = tl.zeros([ROWS, 256], tl.int32)
    for i in tl.static_range(8):
        q = tl.where(z > tl.load(mid_ptr + q + ((128 >> i) - 1)), q + (128 >> i), q)
    at = tl.load(mid_ptr + tl.minimum(q, 254))
    q = tl.where(((q & 1) == 1) & (z == at), q + 1, q)
    elem = row[:, None] * 256 + tl.arange(0, 256)[None, :]
    tl.store(q_ptr + elem, q.to(tl.uint8), mask=elem < n)
    tl.store(absmax_ptr + row, amax, mask=row < nblocks)


# ----------------------------------------------------------------------------- helpers

_table_cache = {}


def _table(name, device):
    """The NF4 thresholds or the dynamic map's midpoints (deltakern._codes), cached per device."""
    t = _table_cache.get((name, device))
    if t is None:
        from deltakern import _codes

        t = _table_cache[(name, device)] = getattr(_codes, name)().to(device)
    return t


def _check_blocksize(blocksize):
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _as_bytes(packed):
    packed = packed.reshape(-1)
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)


def _check_dequant_args(packed, absmax, n, blocksize, out_dtype, code, nested_absmax, nested_code):
    _check_blocksize(blocksize)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if n < 0 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected (n + 1) // 2 = {(n + 1) // 2}")
    nblocks = -(-n // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} values, expected {nblocks}")
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError("code must hold 16 float32 values")
    tensors = [packed, absmax, code]
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError("nested_absmax and nested_code go together")
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 (uint8 only with nested_absmax), got {absmax.dtype}")
    else:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"nested absmax must be uint8, got {absmax.dtype}")
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-nblocks // NESTED_BLOCKSIZE):
            raise ValueError("nested_absmax must be float32 with one value per 256 blocks")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError("nested_code must hold 256 float32 values")
        tensors += [nested_absmax, nested_code]
    if any(t.device != packed.device for t in tensors):
        raise ValueError("all tensors must be on one device")


# ----------------------------------------------------------------------------- dequantize


def dequantize_nf4(packed, absmax, n, blocksize, out_dtype, code,
                   nested_absmax=None, nested_code=None, offset=0.0):
    """Expand n NF4 values to `out_dtype` (a flat tensor of n elements); one kernel launch."""
    packed = _as_bytes(packed)
    _check_dequant_args(packed, absmax, n, blocksize, out_dtype, code, nested_absmax, nested_code)
    out = torch.empty(n, dtype=out_dtype, device=packed.device)
    if n == 0:
        return out
    nested = nested_absmax is not None
    absmax = absmax.reshape(-1).contiguous()
    code = code.reshape(-1).contiguous()
    if nested:
        nested_absmax = nested_absmax.reshape(-1).contiguous()
        nested_code = nested_code.reshape(-1).contiguous()
    nbytes = packed.numel()
    grid = lambda meta: (triton.cdiv(nbytes, meta["BLOCK"]),)  # noqa: E731
    launch(_dequantize_nf4_kernel, grid, packed.device,
        packed.contiguous(), absmax, pair_table(code),
        nested_absmax if nested else absmax, nested_code if nested else code, out,
        n, nbytes, float(offset),
        NESTED=int(nested), BLOCKSIZE=int(blocksize), OUT_BITS=8 * out.element_size(), ODD=n % 2,
        PACK_ASM=int(not _INTERPRET),
        enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- quantize


def quantize_nf4(x, blocksize):
    """Quantize x (fp16/bf16/fp32, any shape) to NF4: (packed uint8 [(n+1)//2], absmax fp32 [nblocks])."""
    _check_blocksize(blocksize)
    if x.dtype not in _OUT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    x = x.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return packed, absmax
    rows = max(1, 2048 // blocksize)
    with _ieee_quiet():
        launch(_quantize_nf4_kernel, (triton.cdiv(nblocks, rows),), x.device,
            x, _table("nf4_thresholds", x.device), packed, absmax, n, packed.numel(), nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, HW_RCP=HW_RCP, num_warps=8 if blocksize >= 4096 else 4,
            enable_fp_fusion=False,
        )
    return packed, absmax


def quantize_nested(x):
    """8-bit blockwise quantization (blocks of 256, signed dynamic map) of fp32 x:
    (uint8 codes [n], fp32 absmax [ceil(n/256)])."""
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    x = x.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return q, absmax
    rows = 8
    with _ieee_quiet():
        launch(_quantize_nested_kernel, (triton.cdiv(nblocks, rows),), x.device,
            x, _table("dynamic_midpoints", x.device), q, absmax, n, nblocks,
            ROWS=rows, HW_RCP=HW_RCP, num_warps=4, enable_fp_fusion=False,
        )
    return q, absmax
