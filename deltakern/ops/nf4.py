"""`deltakern::nf4_quantize` and `deltakern::nf4_dequantize`.

CPU: the pure-torch references in deltakern.triton_kernels.nf4 (importable without Triton).
CUDA: the Triton kernels, or with DELTAKERN_BACKEND=cuda the CUDA C++ dequantize kernel.
Both give the same bits as the reference (bitsandbytes' format and rounding).
"""

from typing import Optional

import torch

from deltakern import _backend


def _refs():
    from deltakern.triton_kernels import nf4_ref

    return nf4_ref


@torch.library.custom_op("deltakern::nf4_quantize", mutates_args=())
def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp16/bf16/fp32 x -> (packed uint8 [(n+1)//2], fp32 absmax [ceil(n/blocksize)])."""
    if x.device.type == "cuda" and _backend.backend() != "torch":
        return _backend.triton_module("nf4").quantize_nf4(x, blocksize)
    return _refs().quantize_nf4_ref(x, blocksize)


@nf4_quantize.register_fake
def _(x, blocksize):
    n = x.numel()
    return x.new_empty(((n + 1) // 2,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.custom_op("deltakern::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat packed uint8 + scales -> flat [n] tensor of `dtype`; absmax is uint8 when nested."""
    args = (packed, absmax, n, blocksize, dtype, code, nested_absmax, nested_code, offset)
    if packed.device.type == "cuda" and _backend.backend() != "torch":
        if _backend.backend() == "cuda":
            from deltakern import _ext

            return _ext.dequantize_nf4_cuda(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype)
        return _backend.triton_module("nf4").dequantize_nf4(*args)
    return _refs().dequantize_nf4_ref(*args)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return packed.new_empty((n,), dtype=dtype)
