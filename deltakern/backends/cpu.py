"""The `cpu` backend: native CPU kernels of the extension `deltakern._cpu` (loaded by
deltakern._cpu_ext on first use), for CPU tensors.

    nf4_dequantize                  the native dequantize kernel (bit-exact with the reference)

The layer ops (linear_*, lora_*, dora_*) of the `cpu` backend are registered in
deltakern.backends.cpu_blas: BLAS compositions that need no extension, and that use this
extension's NF4 matmuls (M <= 16, K % blocksize == 0: W read as 4-bit, never built) and its reused
per-thread fp32 workspace for W when it is loaded. Ops registered by neither run the torch references.
"""

from deltakern import _cpu_ext
from deltakern.backends.registry import register

DEVICES = ("cpu",)


def _cpu(op):
    return register(op, "cpu", DEVICES, _cpu_ext.available)


@_cpu("nf4_dequantize")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return _cpu_ext.dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype)
