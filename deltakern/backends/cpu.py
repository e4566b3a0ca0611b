"""The `cpu` backend: native CPU kernels of the extension `deltakern._cpu` (loaded by
deltakern._cpu_ext on first use), for CPU tensors.

    nf4_dequantize                  the native dequantize kernel (bit-exact with the reference)
    nf4_quantize, nf4_quantize_nested   the native quantizers (bit-exact with the references)

The layer ops (linear_*, lora_*, dora_*) of the `cpu` backend are registered in
deltakern.backends.cpu_blas: BLAS compositions that need no extension, and that use this
extension's NF4 matmuls (M <= 16, K % blocksize == 0: W read as 4-bit, never built) and its reused
per-thread fp32 workspace for W when it is loaded. Ops registered by neither run the torch references.
"""

import torch

from deltakern import _cpu_ext
from deltakern.backends.reference import nf4 as ref_nf4
from deltakern.backends.registry import register

DEVICES = ("cpu",)


def _cpu(op):
    return register(op, "cpu", DEVICES, _cpu_ext.available)


@_cpu("nf4_dequantize")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return _cpu_ext.dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype)


# ---- NF4 quantize and the 8-bit quantize of double quantization (bit-exact with the references) ----

@_cpu("nf4_quantize")
def nf4_quantize(x, blocksize):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return ref_nf4.nf4_quantize(x, blocksize)
    return _cpu_ext.quantize_nf4(x, blocksize)


@_cpu("nf4_quantize_nested")
def nf4_quantize_nested(x):
    if x.dtype != torch.float32:
        return ref_nf4.nf4_quantize_nested(x)
    return _cpu_ext.quantize_nested(x)
