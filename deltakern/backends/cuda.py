"""The `cuda` backend: kernels of the CUDA C++ extension `deltakern._C` (loaded by deltakern._ext on
first use). Ops it does not implement run the torch reference under DELTAKERN_BACKEND=cuda, and the
layer functions take their cuBLAS compositions."""

from deltakern import _ext
from deltakern.backends.registry import register


@register("nf4_dequantize", "cuda", ("cuda",), _ext.available)
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return _ext.dequantize_nf4_cuda(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype)
