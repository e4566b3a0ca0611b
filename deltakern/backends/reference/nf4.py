"""References of `deltakern::nf4_quantize` / `nf4_dequantize` (the maths: triton_kernels/nf4_ref.py)."""

from deltakern.backends.registry import register
from deltakern.triton_kernels.nf4_ref import absmax_ref, dequantize_nf4_ref, quantize_nf4_ref

__all__ = ["absmax_ref", "dequantize_nf4_ref", "quantize_nf4_ref"]


@register("nf4_quantize", "torch")
def nf4_quantize(x, blocksize):
    return quantize_nf4_ref(x, blocksize)


@register("nf4_dequantize", "torch")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return dequantize_nf4_ref(packed, absmax, n, blocksize, dtype, code, nested_absmax, nested_code, offset)
