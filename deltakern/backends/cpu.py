"""The `cpu` backend: native CPU kernels of the extension `deltakern._cpu` (loaded by
deltakern._cpu_ext on first use), for CPU tensors.

    nf4_dequantize                  the native dequantize kernel (bit-exact with the reference)
    nf4_quantize, nf4_quantize_nested   the native quantizers (bit-exact with the references)
    lowrank_xat, lowrank_gtx, lowrank_gb   the rank-r products (fp32, r <= 64, calls of at least
                                    LOWRANK_MIN_WORK multiply-adds; others: the references' BLAS)

The layer ops (linear_*, lora_*, dora_*) of the `cpu` backend are registered in
deltakern.backends.cpu_blas: with this extension loaded, its packed fp32 GEMM (the rank-r term,
column scale and bias in the same pass, NF4 W decoded while packed), its NF4 matmuls (M <= 16,
K % blocksize == 0: W read as 4-bit, never built) and its reused per-thread fp32 workspace for W;
without it, BLAS compositions. Ops registered by neither run the torch references.
"""

import torch

from deltakern import _cpu_ext
from deltakern.backends.reference import lowrank as ref_lowrank
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


# ---- the rank-r products of the LoRA / DoRA layers ------------------------------------------------

LOWRANK_MIN_WORK = 1 << 16  # multiply-adds below which BLAS's lower call overhead wins


def _lowrank(R: int, work: int, *ts) -> bool:
    return work >= LOWRANK_MIN_WORK and all(t is None or _cpu_ext.lowrank_supported(t, R) for t in ts)


@_cpu("lowrank_xat")
def lowrank_xat(x, a):
    if _lowrank(a.shape[0], x.numel() * a.shape[0], x, a):
        return _cpu_ext.lowrank_xat(x, a)
    return ref_lowrank.lowrank_xat_ref(x, a)


@_cpu("lowrank_gtx")
def lowrank_gtx(g, x, scale, colsum, transpose):
    if _lowrank(g.shape[1], x.numel() * g.shape[1], g, x):
        out, cs = _cpu_ext.lowrank_gtx(g, x, scale, colsum, transpose)
        return out, (cs if colsum else x.new_empty((0,)))
    return ref_lowrank.lowrank_gtx_ref(g, x, scale, colsum, transpose)


@_cpu("lowrank_gb")
def lowrank_gb(g, bt, scale, bias):
    if _lowrank(g.shape[1], g.shape[0] * bt.shape[1] * g.shape[1], g, bt, bias):
        return _cpu_ext.lowrank_gb(g, bt, scale, bias)
    return ref_lowrank.lowrank_gb_ref(g, bt, scale, bias)
