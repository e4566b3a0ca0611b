"""The `cpu` backend: native CPU kernels of the extension `deltakern._cpu` (loaded by
deltakern._cpu_ext on first use), for CPU tensors.

    nf4_dequantize                  the native dequantize kernel (bit-exact with the reference)
    linear_fwd, linear_bwd,         NF4 weights: for M <= 16 rows (decode) and K % blocksize == 0, the
    lora_fwd_nf4, lora_dx_nf4       kernels that read W as 4-bit and never build it; otherwise W is
                                    dequantized into a reused per-thread fp32 workspace (rounded to the
                                    input dtype, as the other backends decode it) and torch's fp32 matmul
                                    (BLAS) runs on it. The LoRA terms are added in fp32 before the one
                                    rounding to the input dtype.
                                    Dense weights: the torch references.
Ops not registered here run the torch references on the CPU.
"""

import torch

from deltakern import _cpu_ext
from deltakern.backends.reference import linear as ref_linear
from deltakern.backends.reference import lora as ref_lora
from deltakern.backends.registry import register

DEVICES = ("cpu",)


def _cpu(op):
    return register(op, "cpu", DEVICES, _cpu_ext.available)


def _base_fwd(x, packed, absmax, code, N, K, blocksize, bias):
    """fp32 [M, N] = x . W^T (+ bias) for an NF4 W."""
    M = x.shape[0]
    if _cpu_ext.decode_supported(M, K, blocksize):
        return _cpu_ext.nf4_matmul(x, packed, absmax, code, N, K, blocksize, bias, out_dtype=torch.float32)
    w = _cpu_ext.dense_weight_fp32(packed, absmax, code, N, K, blocksize, round_to=x.dtype)
    with torch.autocast("cpu", enabled=False):
        acc = torch.mm(x.float(), w.t())
        if bias is not None:
            acc += bias.float()
    return acc


def _base_dx(dy, packed, absmax, code, N, K, blocksize):
    """fp32 [M, K] = dy . W for an NF4 W."""
    M = dy.shape[0]
    if _cpu_ext.decode_supported(M, K, blocksize):
        return _cpu_ext.nf4_matmul_dx(dy, packed, absmax, code, N, K, blocksize, out_dtype=torch.float32)
    w = _cpu_ext.dense_weight_fp32(packed, absmax, code, N, K, blocksize, round_to=dy.dtype)
    with torch.autocast("cpu", enabled=False):
        return torch.mm(dy.float(), w)


@_cpu("nf4_dequantize")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return _cpu_ext.dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype)


@_cpu("linear_fwd")
def linear_fwd(x, weight, absmax, code, N, K, blocksize, bias):
    if absmax is None or x.dtype == torch.float64:
        return ref_linear.linear_fwd(x, weight, absmax, code, N, K, blocksize, bias)
    return _base_fwd(x, weight, absmax, code, N, K, blocksize, bias).to(x.dtype)


@_cpu("linear_bwd")
def linear_bwd(dy, weight, absmax, code, N, K, blocksize, compute_db):
    if absmax is None or dy.dtype == torch.float64:
        return ref_linear.linear_bwd(dy, weight, absmax, code, N, K, blocksize, compute_db)
    dx = _base_dx(dy, weight, absmax, code, N, K, blocksize).to(dy.dtype)
    db = dy.float().sum(0).to(dy.dtype) if compute_db else dy.new_empty((0,))
    return dx, db


@_cpu("lora_fwd_nf4")
def lora_fwd_nf4(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    if x.dtype == torch.float64:
        return ref_lora.lora_fwd_nf4(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling)
    acc = _base_fwd(x, packed, absmax, code, N, K, blocksize, bias)
    with torch.autocast("cpu", enabled=False):
        acc.addmm_(xa.float(), lora_B.float().t(), alpha=scaling)
    return acc.to(x.dtype)


@_cpu("lora_dx_nf4")
def lora_dx_nf4(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    if dy.dtype == torch.float64:
        return ref_lora.lora_dx_nf4(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale)
    acc = _base_dx(dy, packed, absmax, code, N, K, blocksize)
    with torch.autocast("cpu", enabled=False):
        lora = torch.mm(dyb.float(), lora_A.float())
        if mask is not None:
            lora = torch.where(mask.bool(), lora * mask_scale, 0.0)
        acc.add_(lora, alpha=scaling)
    return acc.to(dy.dtype)


# ---- NF4 quantize and the 8-bit quantize of double quantization (bit-exact with the references) ----

from deltakern.backends.reference import nf4 as ref_nf4  # noqa: E402


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
