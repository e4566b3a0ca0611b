"""Frozen linear with a trainable bias (BitFit) as one autograd Function over `deltakern::linear_*`."""

from __future__ import annotations

import os
from typing import Optional

import torch

from deltakern import _backend
from deltakern.ops import linear as _ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(M: int, N: int, K: int, weight_kind: str) -> bool:
    """Whether a CUDA call runs the fused Triton kernels (True) or the torch composition (False).

    Composition: cuBLAS for dense W (addmm forward; dX = dY.W, then db = dY.sum(0), a second read
    of dY), dequantize-to-dense + cuBLAS for NF4 (a transient dense W per call, never saved).
    Fused: one Triton GEMM per direction; the backward kernel dequantizes NF4 tiles in registers
    and its first column of programs also sums the dY tiles it reads into db, so dY is read once
    and no dense copy of W exists.

    `DELTAKERN_LINEAR_IMPL=triton|torch` forces the choice. The defaults are UNTUNED (no GPU was
    available to measure on): dense -> composition (cuBLAS is the stronger GEMM and the extra db
    read of dY is ~1/K of the GEMM's traffic); NF4 -> Triton (the fused path, and the only one
    without a transient dense W). A GPU measurement may well move NF4 at large M to the
    composition, as the LoRA path does.
    """
    forced = os.environ.get("DELTAKERN_LINEAR_IMPL", "").strip().lower()
    if forced == "triton":
        return True
    if forced == "torch":
        return False
    if forced:
        raise ValueError(f"DELTAKERN_LINEAR_IMPL={forced!r} is not one of ('triton', 'torch')")
    return weight_kind == "nf4"


def _fused(x: torch.Tensor, M: int, N: int, K: int, weight_kind: str) -> bool:
    """CPU: the op (its CPU kernel is the reference) unless the composition is forced. CUDA:
    `_use_triton`, except DELTAKERN_BACKEND=cuda (no CUDA C++ kernel here) or int32 overflow."""
    if x.device.type != "cuda":
        return os.environ.get("DELTAKERN_LINEAR_IMPL", "").strip().lower() != "torch"
    if _backend.backend() == "cuda" or M * max(N, K) >= 2**31 or N * K >= 2**31:
        return False
    return _use_triton(M, N, K, weight_kind)


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
        with torch.autocast(x.device.type, enabled=False):
            M, K = x.shape
            is_nf4 = absmax is not None
            fused = _fused(x, M, N, K, "nf4" if is_nf4 else "dense")
            if fused:
                y = torch.ops.deltakern.linear_fwd(x, weight, absmax, code, N, K, blocksize, bias)
            else:
                w = _ops.dense_weight(weight, absmax, code, N, K, blocksize, x.dtype)
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
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.contiguous() if dy.stride(-1) != 1 else dy
            if need_x and fused:
                dx, db = torch.ops.deltakern.linear_bwd(dy, weight, absmax, code, N, K, blocksize, int(need_b))
                db = db if need_b else None
            elif need_x:
                w = _ops.dense_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
                dx = torch.mm(dy, w)
            if need_b and db is None:
                db = dy.sum(0)
        return dx, None, None, None, db, None, None


def _nf4_type():
    from deltakern.nf4 import NF4Weight

    return NF4Weight


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b for a frozen W (dense tensor [N, K] or `deltakern.NF4Weight`) and a trainable bias.

    x [..., K]; bias [N] or None. x, bias and a dense weight share one dtype (fp16, bf16, fp32) and
    device; an NF4 weight is dequantized to x's dtype. Under torch.autocast the inputs are cast to
    the autocast dtype first. A dense weight that requires grad raises ValueError (use
    torch.nn.functional.linear to train W). See FrozenLinearFunction for the gradients.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    NF4Weight = _nf4_type()
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4 and not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
    if not is_nf4 and weight.requires_grad:
        raise ValueError("weight requires grad: deltakern.autograd.linear.linear computes no weight gradient; "
                         "freeze it (weight.requires_grad_(False)) or use torch.nn.functional.linear")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        cast = torch.get_autocast_dtype(x.device.type)
        x = x.to(cast)
        bias = None if bias is None else bias.to(cast)
        weight = weight if is_nf4 else weight.to(cast)
    dtype, device = x.dtype, x.device
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {dtype}")
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {shape}")
    N, K = shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, the weight expects {K}")
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
    if is_nf4:
        y = FrozenLinearFunction.apply(x2, weight.packed_bytes(), weight.absmax_fp32(), weight.code, bias, N,
                                       int(weight.blocksize))
    else:
        y = FrozenLinearFunction.apply(x2, weight, None, None, bias, N, 0)
    return y.view(*x.shape[:-1], N)


def linear_ref(x, weight, bias=None):
    """Plain-torch reference (torch autograd; any float dtype incl. float64)."""
    if isinstance(weight, _nf4_type()):
        weight = weight.dequantize(x.dtype if x.dtype in _FLOAT_DTYPES else torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
