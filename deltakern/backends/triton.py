"""The `triton` backend: the Triton kernels (top-level `triton_kernels/`, installed as
`deltakern.triton_kernels`) registered for CUDA tensors, and for CPU tensors in the interpreter
lane (see `registry.interpreter_lane`). Triton is imported on the first call, never at import."""

import functools
import importlib

import torch

from deltakern.backends.registry import register

DEVICES = ("cuda", "cpu")  # "cpu" only ever resolves here in the interpreter lane


@functools.cache
def _import_error():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    return _import_error() is None


def require():
    err = _import_error()
    if err is not None:
        raise RuntimeError(
            f"this deltakern op needs Triton on CUDA tensors, but importing it failed ({err}); "
            "install it with `pip install triton`, or set DELTAKERN_BACKEND=cuda (CUDA C++ kernels and "
            "cuBLAS compositions) or DELTAKERN_BACKEND=torch (the references)"
        )


def module(name: str):
    """deltakern.triton_kernels.<name>, imported on first use."""
    require()
    return importlib.import_module(f"deltakern.triton_kernels.{name}")


def _nf4(absmax, code, blocksize):
    """The `nf4=` argument of the Triton launchers (None for a dense weight)."""
    return None if absmax is None else (absmax, code, blocksize)


def _impl(op):
    return register(op, "triton", DEVICES, available)


# ---- NF4 ----------------------------------------------------------------------------------------

@_impl("nf4_quantize")
def nf4_quantize(x, blocksize):
    return module("nf4").quantize_nf4(x, blocksize)


@_impl("nf4_quantize_nested")
def nf4_quantize_nested(x):
    return module("nf4").quantize_nested(x)


@_impl("nf4_dequantize")
def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    return module("nf4").dequantize_nf4(packed, absmax, n, blocksize, dtype, code, nested_absmax, nested_code, offset)


# ---- LoRA ---------------------------------------------------------------------------------------

@_impl("lora_fwd")
def lora_fwd(x, weight, bias, xa, lora_B, scaling):
    return module("lora").lora_forward(x, weight, bias, xa, lora_B, scaling)


@_impl("lora_fwd_nf4")
def lora_fwd_nf4(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    return module("lora").lora_forward(x, packed, bias, xa, lora_B, scaling, nf4=(absmax, code, blocksize))


@_impl("lora_dx")
def lora_dx(dy, weight, dyb, lora_A, scaling, mask, mask_scale):
    return module("lora").lora_backward_dx(dy, weight, dyb, lora_A, scaling, mask, mask_scale)


@_impl("lora_dx_nf4")
def lora_dx_nf4(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    return module("lora").lora_backward_dx(dy, packed, dyb, lora_A, scaling, mask, mask_scale,
                                           nf4=(absmax, code, blocksize))


@_impl("lora_fwd_xa")
def lora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, scaling):
    """xa by the rank-r op (cuBLAS on CUDA), then the fused forward (the CPU backend computes xa in its GEMM)."""
    from deltakern.ops import lowrank

    xa = lowrank.xat(x, lora_A)
    return module("lora").lora_forward(x, weight, bias, xa, lora_B, scaling, nf4=_nf4(absmax, code, blocksize)), xa


@_impl("lora_dx_dyb")
def lora_dx_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, scaling):
    from deltakern.ops import lowrank

    dyb = lowrank.xat(dy, lora_B.t())
    dx = module("lora").lora_backward_dx(dy, weight, dyb, lora_A, scaling, None, 1.0, nf4=_nf4(absmax, code, blocksize))
    return dx, dyb


# ---- frozen linear (BitFit) ---------------------------------------------------------------------

@_impl("linear_fwd")
def linear_fwd(x, weight, absmax, code, N, K, blocksize, bias):
    """NF4 with at most 16 rows and rows starting on a block (K % blocksize == 0): the decode GEMV
    (triton_kernels/decode.py, bound by reading W); otherwise the tiled GEMM."""
    if absmax is not None and x.shape[0] <= 16 and K % blocksize == 0:
        return module("decode").decode_forward(x, weight, bias, N, (absmax, code, blocksize))
    return module("linear").linear_forward(x, weight, bias, N, nf4=_nf4(absmax, code, blocksize))


@_impl("linear_bwd")
def linear_bwd(dy, weight, absmax, code, N, K, blocksize, compute_db):
    dx, db = module("linear").linear_backward(dy, weight, K, nf4=_nf4(absmax, code, blocksize),
                                              want_db=bool(compute_db))
    return dx, (db.to(dy.dtype) if db is not None else dy.new_empty((0,)))


# ---- DoRA ---------------------------------------------------------------------------------------

@_impl("dora_norm_parts")
def dora_norm_parts(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq):
    wa, sq = module("dora").norm_parts(weight, lora_A, N, nf4=_nf4(absmax, code, blocksize),
                                       want_sumsq=bool(compute_sumsq))
    return wa, (sq if sq is not None else wa.new_empty((0,)))


@_impl("dora_fwd")
def dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    return module("linear").frozen_forward(x, weight, N, nf4=_nf4(absmax, code, blocksize), bias=bias,
                                           lora=(xa, lora_B, scaling), g=g, keep=keep, mask_scale=mask_scale)


@_impl("dora_bwd")
def dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
             compute_dx, compute_db):
    run_dx = bool(compute_dx)  # the dx-only inputs are not even looked at without dx
    dx, db, c = module("linear").frozen_backward(
        dy, weight, K, nf4=_nf4(absmax, code, blocksize), compute_dx=run_dx, g=g if run_dx else None,
        lora=(dyb, lora_A, scaling) if run_dx else None, keep=keep if run_dx else None, mask_scale=mask_scale,
        want_db=bool(compute_db), y=y, bias=bias if y is not None else None)

    def empty(t, dt):
        return t if t is not None else dy.new_empty((0,), dtype=dt)

    return empty(dx, dy.dtype), empty(db, torch.float32), empty(c, torch.float32)


@_impl("dora_colsum")
def dora_colsum(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    return module("linear").frozen_forward(x, weight, N, nf4=_nf4(absmax, code, blocksize),
                                           lora=(xa, lora_B, scaling), keep=keep, mask_scale=mask_scale,
                                           colsum=dy, cols=cols)


@_impl("dora_ctw")
def dora_ctw(c, weight, absmax, code, N, K, blocksize):
    return module("dora").ctw(c, weight, K, nf4=_nf4(absmax, code, blocksize))


@_impl("dora_fwd_xa")
def dora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g, scaling):
    """xa by the rank-r op, then the fused forward (the CPU backend computes xa in its GEMM)."""
    from deltakern.ops import lowrank

    xa = lowrank.xat(x, lora_A)
    return dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, None, scaling, 1.0), xa


@_impl("dora_bwd_dyb")
def dora_bwd_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, g, y, bias, scaling, compute_db):
    from deltakern.ops import lowrank

    dyb = lowrank.xat(dy, (lora_B.float() * g[:, None]).to(dy.dtype).t())
    dx, db, c = dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, None, y, bias, scaling, 1.0, 1,
                         compute_db)
    return dx, db, c, dyb
