"""Schemas of `deltakern::nf4_quantize`, `deltakern::nf4_quantize_nested` and `deltakern::nf4_dequantize`.

Implementations are registered per backend and device in `deltakern.backends` (the references in
`deltakern.backends.reference.nf4`; Triton and the CUDA C++ dequantize on CUDA); the registry picks
one per call. Dequantization gives the same bits everywhere (bitsandbytes' format and rounding).
Quantization follows bitsandbytes' CUDA kernel: the Triton kernels use its hardware reciprocal and
write its exact bytes, the reference the correctly rounded one (rarely a code apart; see nf4.py).
"""

from typing import Optional

import torch

from deltakern.backends import registry


@torch.library.custom_op("deltakern::nf4_quantize", mutates_args=())
def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp16/bf16/fp32 x -> (packed uint8 [(n+1)//2], fp32 absmax [ceil(n/blocksize)])."""
    return registry.call("nf4_quantize", x, blocksize)


@nf4_quantize.register_fake
def _(x, blocksize):
    n = x.numel()
    return x.new_empty(((n + 1) // 2,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.custom_op("deltakern::nf4_quantize_nested", mutates_args=())
def nf4_quantize_nested(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 x -> (uint8 codes [n], fp32 absmax [ceil(n/256)]): the 8-bit dynamic-map step of
    double quantization, blocks of 256."""
    return registry.call("nf4_quantize_nested", x)


@nf4_quantize_nested.register_fake
def _(x):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty((-(-n // 256),), dtype=torch.float32)


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
    return registry.call("nf4_dequantize", packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize,
                         dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return packed.new_empty((n,), dtype=dtype)
