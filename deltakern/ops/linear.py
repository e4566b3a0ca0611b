"""Frozen-linear ops for bias-only fine-tuning (BitFit): `deltakern::linear_fwd`, `deltakern::linear_bwd`.

    linear_fwd   y[M, N]  = x[M, K] . W[N, K]^T (+ b[N])
    linear_bwd   dx[M, K] = dy[M, N] . W[N, K],   db[N] = sum over rows of dy   (one pass over dy)

W is dense (`absmax`, `code` None) or NF4: `weight` then holds the packed bytes (flat uint8), `absmax`
the decoded fp32 block scales (`NF4Weight.absmax_fp32()`), `code` the 16 fp32 levels, and N, K,
blocksize describe the [N, K] weight. Everything accumulates in fp32 and rounds once to the input
dtype; db is returned in dy's dtype (shape [0] when `compute_db` is 0).

CPU: BLAS through deltakern.ops.compose (`linear_fwd_cpu` / `linear_bwd_cpu`); the pure-torch
references below are the oracle for every implementation. CUDA: the Triton kernels in
deltakern.triton_kernels.linear (NF4 tiles dequantized in registers; db from the column sums of
the dy tiles the dx kernel reads anyway). Fake kernels make both traceable by torch.compile.
"""

import importlib
import os
from typing import Optional

import torch

from deltakern import _backend


def _kernels():
    _backend.require_triton()
    return importlib.import_module("deltakern.triton_kernels.linear")


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernel: always on CUDA tensors; on CPU tensors only when
    DELTAKERN_CPU_KERNELS=1 and TRITON_INTERPRET=1 (tests run the whole CUDA code path, kernels
    included, in Triton's interpreter). Otherwise CPU tensors run the pure-torch references."""
    if t.device.type == "cuda":
        return True
    return os.environ.get("DELTAKERN_CPU_KERNELS") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def dense_weight(weight, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`: `weight` itself when dense, else cast(fp32(code[nibble] * absmax))."""
    if absmax is None:
        return weight
    flat = torch.ops.deltakern.nf4_dequantize(weight.reshape(-1).view(torch.uint8), absmax, None, None, 0.0, code,
                                              N * K, blocksize, dtype)
    return flat.view(N, K)


def cpu_weight(weight, absmax, code, N: int, K: int, blocksize: int, dtype):
    """(W as an fp32 (or float64) [N, K] GEMM operand, whether it is a scratch copy the caller may overwrite).

    The CPU ops compute in fp32 whatever the input dtype (fp16 / bf16 are upcast and rounded once at
    the end; CPUs without half-precision units run fp32 BLAS far faster). A dense fp32 W is used as
    is; an NF4 W is dequantized to `dtype` (the values the other backends use: cast(fp32(code *
    absmax))) by `deltakern::nf4_dequantize`, the one call to swap for a native kernel writing into a
    reused workspace.
    """
    w = dense_weight(weight, absmax, code, N, K, blocksize, dtype)
    f = f32(w)
    return f, (absmax is not None or f is not w)


def f32(t):
    """t as an fp32 GEMM operand: itself when fp32 or float64 (the tests' oracle dtype), else upcast; None stays."""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


def nf4_args(absmax, code, blocksize):
    """The `nf4=` argument of the Triton launchers (None for a dense weight)."""
    return None if absmax is None else (absmax, code, blocksize)


def _f(t):
    """fp32 for the references' accumulators, float64 when the input already is (tests' oracle)."""
    return t if t.dtype == torch.float64 else t.float()


# ---- references -----------------------------------------------------------------------------


def linear_fwd_ref(x, weight, bias) -> torch.Tensor:
    """x . W^T (+ b) with an fp32 accumulator, one rounding to x.dtype (W dense, x.dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        acc = torch.mm(_f(x), _f(weight).t())
        if bias is not None:
            acc += _f(bias)
        return acc.to(x.dtype)


def linear_bwd_ref(dy, weight, compute_db: bool = True):
    """(dy . W, sum_rows dy or an empty tensor), fp32 accumulation, rounded once to dy.dtype."""
    with torch.autocast(dy.device.type, enabled=False):
        dyf = _f(dy)
        dx = torch.mm(dyf, _f(weight)).to(dy.dtype)
        db = dyf.sum(0).to(dy.dtype) if compute_db else dy.new_empty((0,))
        return dx, db


def linear_fwd_cpu(x, weight, absmax, code, N, K, blocksize, bias) -> torch.Tensor:
    """`linear_fwd` on the CPU: b + x W^T as one BLAS GEMM (the bias broadcast into C, beta = 1), fp32."""
    w, _ = cpu_weight(weight, absmax, code, N, K, blocksize, x.dtype)
    xf, bf = f32(x), f32(bias)
    y = torch.mm(xf, w.t()) if bf is None else torch.addmm(bf, xf, w.t())
    return y.to(x.dtype)


def linear_bwd_cpu(dy, weight, absmax, code, N, K, blocksize, compute_db: bool):
    """`linear_bwd` on the CPU: (dY W, sum_rows dY), fp32, rounded once to dy.dtype."""
    w, _ = cpu_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
    dyf = f32(dy)
    dx = torch.mm(dyf, w).to(dy.dtype)
    return dx, (dyf.sum(0).to(dy.dtype) if compute_db else dy.new_empty((0,)))


# ---- ops ------------------------------------------------------------------------------------


@torch.library.custom_op("deltakern::linear_fwd", mutates_args=())
def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """x [M, K] -> x W^T (+ bias) [M, N]; W dense [N, K] or NF4 (see the module docstring)."""
    if use_kernels(x):
        return _kernels().linear_forward(x, weight, bias, N, nf4=nf4_args(absmax, code, blocksize))
    return linear_fwd_cpu(x, weight, absmax, code, N, K, blocksize, bias)


@linear_fwd.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::linear_bwd", mutates_args=())
def linear_bwd(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, compute_db: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy [M, N] -> (dx = dy W [M, K], db = sum_rows dy [N], or [0] when compute_db is 0)."""
    if use_kernels(dy):
        dx, db = _kernels().linear_backward(dy, weight, K, nf4=nf4_args(absmax, code, blocksize),
                                            want_db=bool(compute_db))
        return dx, (db.to(dy.dtype) if db is not None else dy.new_empty((0,)))
    return linear_bwd_cpu(dy, weight, absmax, code, N, K, blocksize, bool(compute_db))


@linear_bwd.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, compute_db):
    return dy.new_empty((dy.shape[0], K)), dy.new_empty((N if compute_db else 0,))
