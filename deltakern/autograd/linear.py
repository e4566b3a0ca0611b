"""Frozen linear with a trainable bias (BitFit) as one autograd Function over `deltakern::linear_*`."""

from __future__ import annotations

from typing import Optional

import torch

from deltakern._autocast import autocast_off
from deltakern.autograd._common import (
    FLOAT_DTYPES, autocast_dtype, check_features, check_float_dtype, check_input, dense_weight, frozen_weight_kind,
    weight_shape,
)
from deltakern.nf4 import NF4Weight
from deltakern.backends import cpu_blas, registry
import deltakern.ops.linear  # noqa: F401,E402  (defines torch.ops.deltakern.linear_*)


def _use_triton(M: int, N: int, K: int, weight_kind: str) -> bool:
    """The registry's cost model for a CUDA BitFit call (`registry.prefer_fused`): the fused Triton
    ops (True) or the composition (False).

    Composition: cuBLAS for dense W (addmm forward; dX = dY.W, then db = dY.sum(0), a second read
    of dY), dequantize-to-dense + cuBLAS for NF4 (a transient dense W per call, never saved).
    Fused: one Triton GEMM per direction; the backward kernel dequantizes NF4 tiles in registers
    and its first column of programs also sums the dY tiles it reads into db, so dY is read once
    and no dense copy of W exists. `DELTAKERN_LINEAR_IMPL=triton|torch` forces it.
    """
    return registry.prefer_fused("linear", M, N, K, weight_kind)


def _fused(x: torch.Tensor, M: int, N: int, K: int, weight_kind: str) -> bool:
    return registry.fused_path("linear", x, M, N, K, weight_kind)


class FrozenLinearFunction(torch.autograd.Function):
    r"""y = x W^T + b with W frozen (dense or NF4) and only x and b differentiable.

    Shapes: x [M, K] (the caller flattens), W [N, K], b [N].
    Forward:   y  = x W^T + b                             [M, N]
    Backward, dY = dL/dy:
               dX = dY W                                  [M, K]   (only if x requires grad)
               db = sum over tokens of dY                 [N]      (only if b requires grad)
               dW : never computed (W is frozen).
    Fused path: dX and db come from one kernel that reads dY once (db = column sums of the dY tiles
    the first column of dX programs loads). Composition: cuBLAS dX, then dY.sum(0).
    Saved for backward: only the weight as given (dense tensor, or packed NF4 bytes with decoded
    fp32 block scales and the code book): x is not needed for any gradient and is not saved.
    """

    @staticmethod
    def forward(ctx, x, weight, absmax, code, bias, N, blocksize):
        with autocast_off(x.device.type):
            M, K = x.shape
            is_nf4 = absmax is not None
            fused = _fused(x, M, N, K, "nf4" if is_nf4 else "dense")
            if fused:
                y = registry.run("linear_fwd", x, weight, absmax, code, N, K, blocksize, bias)
            else:
                w = dense_weight(weight, absmax, code, N, K, blocksize, x.dtype)
                y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
            ctx.save_for_backward(weight, absmax, code)
            ctx.meta = (M, N, K, int(blocksize), fused)
            return y

    @staticmethod
    def backward(ctx, dy):
        weight, absmax, code = ctx.saved_tensors
        M, N, K, blocksize, fused = ctx.meta
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        dx = db = None
        with autocast_off(dy.device.type):
            dy = dy.contiguous() if dy.stride(-1) != 1 else dy
            if need_x and fused:
                dx, db = registry.run("linear_bwd", dy, weight, absmax, code, N, K, blocksize, int(need_b))
                db = db if need_b else None
            elif need_x:
                w = dense_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
                dx = torch.mm(dy, w)
            if need_b and db is None:
                db = dy.sum(0)
        return dx, None, None, None, db, None, None


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b for a frozen W (dense tensor [N, K] or `deltakern.NF4Weight`) and a trainable bias.

    x [..., K]; bias [N] or None. x, bias and a dense weight share one dtype (fp16, bf16, fp32) and
    device; an NF4 weight is dequantized to x's dtype. Under torch.autocast the inputs are cast to
    the autocast dtype first. A dense weight that requires grad raises ValueError (use
    torch.nn.functional.linear to train W). See FrozenLinearFunction for the gradients.
    """
    check_input(x)
    is_nf4 = frozen_weight_kind(weight, "weight requires grad: deltakern.autograd.linear.linear computes no weight "
                                        "gradient; freeze it (weight.requires_grad_(False)) or use "
                                        "torch.nn.functional.linear")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    cast = autocast_dtype(x)
    if cast is not None:
        x = x.to(cast)
        bias = None if bias is None else bias.to(cast)
        weight = weight if is_nf4 else weight.to(cast)
    dtype, device = x.dtype, x.device
    check_float_dtype(dtype)
    N, K = weight_shape(weight)
    check_features(x, K)
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x is on {device}")
    if not is_nf4 and weight.dtype != dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {dtype}; cast them to one dtype "
                        "(or run under torch.autocast)")
    if bias is not None:
        if bias.dtype != dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {dtype}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but x is on {device}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, K)
    if not is_nf4 and device.type == "cpu" and dtype in (torch.float32, torch.float64) \
            and registry.resolve("linear_fwd", "cpu") == "cpu" and not cpu_blas.native_linear(x2.shape[0], N, K, dtype):
        # the cpu backend's dense linear is then this very addmm (and its backward dY W, sum dY): torch's
        # own autograd runs it without the Function's Python overhead
        return torch.nn.functional.linear(x, weight, bias)
    if is_nf4:
        y = FrozenLinearFunction.apply(x2, weight.packed_bytes(), weight.absmax_fp32(), weight.code, bias, N,
                                       int(weight.blocksize))
    else:
        y = FrozenLinearFunction.apply(x2, weight, None, None, bias, N, 0)
    return y.view(*x.shape[:-1], N)


def linear_ref(x, weight, bias=None):
    """Plain-torch reference (torch autograd; any float dtype incl. float64)."""
    if isinstance(weight, NF4Weight):
        weight = weight.dequantize(x.dtype if x.dtype in FLOAT_DTYPES else torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
