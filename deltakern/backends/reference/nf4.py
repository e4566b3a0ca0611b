"""The references of the NF4 ops (the `torch` backend), and the one statement of the quantization rule.

These are the CPU kernels of `deltakern::nf4_quantize`, `deltakern::nf4_quantize_nested` and
`deltakern::nf4_dequantize`, and what the Triton and CUDA kernels are tested against. Quantization
follows bitsandbytes' CUDA kernel (the rule is stated once, here: `blockwise_scale`, `nf4_codes_of`,
`dynamic_codes_of`); dequantization reproduces bitsandbytes 0.50's rounding exactly (see
deltakern.nf4 for the format).
"""

import math
from typing import Optional

import torch

from deltakern.backends.registry import register


FLT_MIN = 2.0**-126  # the smallest normal fp32; anything of smaller magnitude is subnormal (or zero)


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """fp32 t with subnormal values (exponent bits all zero) replaced by +0: what an FTZ instruction
    does to its inputs and result. NaN and inf pass."""
    return torch.where((t.contiguous().view(torch.int32) & 0x7F800000) == 0, 0.0, t)


def blockwise_scale(x: torch.Tensor, blocksize: int):
    """The scaling step of bitsandbytes' CUDA blockwise quantizer, with the correctly rounded reciprocal.

    x is cut into blocks of `blocksize` consecutive elements; the last block is padded with zeros to
    full size (the CUDA kernel loads 0 for the missing elements and packs the code of that 0 into the
    pad nibble of an odd n). With ftz() flushing subnormals to zero:

        v      = ftz(x)
        absmax = max |v| over the block                  (stored; 0 for an all-zero block)
        inv    = ftz(1 / absmax)                          (+inf when absmax = 0)
        z      = ftz(fp32(v * inv))                       (NaN for v = 0 and inv = +inf)

    Every block is multiplied by the reciprocal, the partial last one too; nothing is clamped. On the
    GPU, inv is rcp.approx.ftz(absmax), within 1 ulp of 1 / absmax (not IEEE-specified); here it is
    the correctly rounded 1 / absmax, so rarely a z and then its code can differ from the GPU's.
    The last ftz is not computed: a subnormal z gets the code of 0 anyway (every NF4 threshold and
    every midpoint of the 8-bit map is at least 2.7e-7 in magnitude).
    Returns (z [blocks, blocksize] fp32, absmax [blocks] fp32).
    """
    xf = x.reshape(-1).float()
    blocks = -(-xf.numel() // blocksize)
    if blocks * blocksize != xf.numel():
        xf = torch.nn.functional.pad(xf, (0, blocks * blocksize - xf.numel()))
    v = flush_subnormals(xf).view(blocks, blocksize)
    absmax = v.abs().amax(dim=1)
    inv = flush_subnormals(torch.reciprocal(absmax))
    return v * inv[:, None], absmax


def nf4_codes_of(z: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """NF4 code of each z: the number of the 15 sorted thresholds t_j with z > t_j (int32).

    This is bitsandbytes' comparison tree (strict `>` at every node, so z == t_j takes the lower
    code) written as a count; a NaN z fails every comparison and gets code 0.
    """
    return torch.bucketize(torch.nan_to_num(z, nan=-math.inf), thresholds, out_int32=True)  # #{j : t_j < z}


def dynamic_codes_of(z: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """8-bit code of each z against the 256-entry signed dynamic map, as bitsandbytes' CUDA search.

    q = the number of midpoints m_j = fp32(fp32(map[j] + map[j+1]) * 0.5) strictly below z; a z equal
    to a midpoint m_q lies between map[q] and map[q+1] and takes the even one of q, q+1 (that is
    where its 7-step binary search, pivot 127 and steps 64..1, always lands); a NaN z gets 0.
    """
    z = torch.nan_to_num(z, nan=-math.inf)
    q = torch.bucketize(z, midpoints, out_int32=True)
    tie = (q % 2 == 1) & (midpoints[q.clamp(max=midpoints.numel() - 1).long()] == z)
    return q + tie.to(q.dtype)


def quantize_nf4_ref(x: torch.Tensor, blocksize: int, thresholds: Optional[torch.Tensor] = None):
    """Flat x -> (packed uint8 [(n+1)//2], fp32 absmax [ceil(n/blocksize)]), bitsandbytes' CUDA rule.

    z and absmax from `blockwise_scale`, nibble = `nf4_codes_of(z)`, byte i = nibble(2i) << 4 |
    nibble(2i+1). So an all-zero block stores absmax 0 and packs 0x00 (NaN z -> code 0), and an odd
    n pads the code of z = 0 (7, or 0 when the last block is all zero).
    """
    if thresholds is None:
        from deltakern._codes import nf4_thresholds

        thresholds = nf4_thresholds(x.device)
    n = x.numel()
    z, absmax = blockwise_scale(x, blocksize)
    idx = nf4_codes_of(z.reshape(-1)[: n + n % 2], thresholds).to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


def quantize_nested_ref(x: torch.Tensor, blocksize: int = 256, midpoints: Optional[torch.Tensor] = None):
    """Flat fp32 x -> (uint8 codes [n], fp32 absmax [ceil(n/blocksize)]): 8-bit blockwise quantization
    with the signed dynamic map, bitsandbytes' CUDA rule (double quantization of the NF4 scales).

    z and absmax from `blockwise_scale`, code = `dynamic_codes_of(z)`. A block whose absmax is 0
    stores code 0, which still decodes to exactly 0 (map[0] * 0).
    """
    if midpoints is None:
        from deltakern._codes import dynamic_midpoints

        midpoints = dynamic_midpoints(x.device)
    z, absmax = blockwise_scale(x, blocksize)
    return dynamic_codes_of(z.reshape(-1)[: x.numel()], midpoints).to(torch.uint8), absmax


def absmax_ref(absmax, nested_absmax, nested_code, offset, nested_blocksize: int = 256):
    """fp32 block scales; a uint8 absmax decodes as fp32(fp32(map[q] * nested_absmax[g]) + offset).

    The offset is added as a Python scalar: torch rounds it to fp32 and adds in fp32 (the same single
    rounding as an fp32 tensor holding it) without a host -> device copy (which would synchronise).
    """
    if nested_absmax is None:
        return absmax
    groups = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
    scaled = nested_code[absmax.long()] * nested_absmax[groups]
    return scaled + float(offset)


def dequantize_nf4_ref(packed, absmax, n: int, blocksize: int, out_dtype, code,
                       nested_absmax=None, nested_code=None, offset: float = 0.0):
    """Flat packed uint8 -> [n] of out_dtype: cast(fp32(code[nibble] * absmax[block]))."""
    scales = absmax_ref(absmax, nested_absmax, nested_code, offset)
    b = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1).long()
    values = torch.nn.functional.pad(code[nibbles], (0, scales.numel() * blocksize - nibbles.numel()))
    return (values.view(-1, blocksize) * scales[:, None]).reshape(-1)[:n].to(out_dtype)


# ---- registered as the torch backend of the ops ------------------------------------------------

@register("nf4_quantize", "torch")
def nf4_quantize(x, blocksize):
    return quantize_nf4_ref(x, blocksize)


@register("nf4_quantize_nested", "torch")
def nf4_quantize_nested(x):
    return quantize_nested_ref(x)


@register("nf4_dequantize", "torch")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return dequantize_nf4_ref(packed, absmax, n, blocksize, dtype, code, nested_absmax, nested_code, offset)
