"""Pure-torch references for the NF4 kernels in nf4.py (importable without Triton).

These are the CPU kernels of `deltakern::nf4_quantize` / `deltakern::nf4_dequantize` and the
oracle the Triton and CUDA kernels are tested against. They reproduce bitsandbytes 0.50's
rounding exactly (see nf4.py for the format).
"""

from typing import Optional

import torch


def _levels(n: int, blocksize: int):
    """Split n flat elements into `full` blocks of blocksize and a partial tail of `rem`."""
    rem = n % blocksize
    return (n - rem) // blocksize, rem


def quantize_nf4_ref(x: torch.Tensor, blocksize: int, code: Optional[torch.Tensor] = None):
    """Flat x -> (packed uint8 [(n+1)//2], fp32 absmax [ceil(n/blocksize)]).

    Full blocks: absmax = max|x| (stored as is), scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1).
    A partial last block: am = max(max|x|, 1e-38) is stored and scaled = clamp(x / am, -1, 1).
    (The reciprocal-then-multiply vs division difference is bitsandbytes', kept for bit-exactness.)
    Code index = number of midpoints between consecutive levels strictly below `scaled`, so a tie
    goes to the lower level and an all-zero block packs index 7 (0x77).
    """
    if code is None:
        from deltakern._codes import nf4_code

        code = nf4_code(x.device)
    xf = x.reshape(-1).float()
    n = xf.numel()
    full, rem = _levels(n, blocksize)
    body = xf[: full * blocksize].view(full, blocksize)
    absmax = body.abs().amax(dim=1) if full else xf.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if rem:
        am = xf[full * blocksize:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(xf[full * blocksize:] / am, -1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


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
