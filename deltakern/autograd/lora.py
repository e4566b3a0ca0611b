"""LoRA / QLoRA linear as one autograd Function over the fused `deltakern::lora_*` ops."""

from __future__ import annotations

from typing import Optional

import torch

from deltakern._autocast import autocast_off
from deltakern.autograd._common import (
    autocast_dtype, check_dropout_p, check_features, check_float_dtype, check_input, check_param, check_weight,
    dense_weight, dropped, frozen_weight_kind, projects_in_gemm,
)
from deltakern.nf4 import NF4Weight
from deltakern.backends import compose, registry
from deltakern.ops import lowrank
import deltakern.ops.lora  # noqa: F401,E402  (defines torch.ops.deltakern.lora_*)


def _use_triton(M: int, N: int, K: int, weight_kind: str, r: int = 16) -> bool:
    """The registry's cost model for a CUDA LoRA call (`registry.prefer_fused`): the fused Triton ops
    (True) or the composition (False) - cuBLAS for a dense W (the rank-r term b + s xa B^T first, then
    the base GEMM adds into it with beta = 1; dX = s dyb A, then += dY W likewise: see
    deltakern.backends.compose) and dequantize-then-cuBLAS for NF4 (a transient dense W per call,
    never saved for backward). `DELTAKERN_LORA_IMPL=triton|torch` forces it."""
    return registry.prefer_fused("lora", M, N, K, weight_kind, r)


def _fused(x: torch.Tensor, M: int, N: int, K: int, weight_kind: str, r: int) -> bool:
    return registry.fused_path("lora", x, M, N, K, weight_kind, r)


class LoRALinearFunction(torch.autograd.Function):
    r"""y = x W^T + b + s (D(x) A^T) B^T, with W frozen (dense or NF4).

    Shapes: x [..., K] (flattened to [M, K]), W [N, K], b [N], A [r, K], B [N, r], s = scaling.
    D is inverted dropout on the LoRA branch only (PEFT's semantics): x_d = D(x) = x * m / (1 - p)
    with m ~ Bernoulli(1 - p) drawn as torch's dropout draws it (same RNG stream: seeding torch
    gives PEFT's mask); with p = 0 or outside training x_d = x and no mask exists.

    Forward:
        xa  = x_d A^T                                   [M, r]  (deltakern::lowrank_xat; on the CPU
                                                                 without dropout lora_fwd_xa returns it
                                                                 with y, from the GEMM's packed x)
        y   = x W^T + s xa B^T + b                      [M, N]  (one fused op, fp32 accumulator; the
                                                                 composition: b + s xa B^T, then += x W^T)
    Backward, with dY = dL/dy [M, N]:
        dyb = dY B                                      [M, r]  (deltakern::lowrank_xat with B^T; on
                                                                 the CPU without dropout lora_dx_dyb)
        dX  = dY W + s (dyb A) * m / (1 - p)            [M, K]  (one fused op; mask term only if p > 0)
        dA  = s dyb^T x_d                               [r, K]  (deltakern::lowrank_gtx)
        dB  = s dY^T xa                                 [N, r]  (deltakern::lowrank_gtx: one pass
        db  = sum over tokens of dY                     [N]      gives dB and db, dY read once)
        dW  : never computed; a W that requires grad is rejected (PEFT freezes the base weight).
    Saved for backward: x (only if dA is needed), the bool keep-mask (only if p > 0), xa (only if
    dB is needed), and the parameters themselves (W as given: dense, or the packed NF4 bytes with
    their decoded fp32 block scales). No dequantized copy of W is ever saved.
    NF4 weights are dequantized to x's dtype: cast(fp32(code[nibble] * absmax[block])).
    """

    @staticmethod
    def forward(ctx, x, weight, absmax, code, bias, lora_A, lora_B, scaling, dropout_p, blocksize):
        with autocast_off(x.device.type):  # lora_linear already cast the inputs
            return LoRALinearFunction._forward(ctx, x, weight, absmax, code, bias, lora_A, lora_B, scaling,
                                               dropout_p, blocksize)

    @staticmethod
    def backward(ctx, dy):
        with autocast_off(dy.device.type):
            return LoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, x, weight, absmax, code, bias, lora_A, lora_B, scaling, dropout_p, blocksize):
        K = x.shape[-1]
        N, r = lora_B.shape
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        is_nf4 = absmax is not None
        fused = _fused(x2, M, N, K, "nf4" if is_nf4 else "dense", r)

        if dropout_p > 0.0:
            xd, keep = torch.native_dropout(x2, dropout_p, True)  # xd = x * keep / (1 - p), as `dropped` gives
        else:
            keep = None
            xd = x2
        project = fused and keep is None and projects_in_gemm(x2, "lora_fwd")
        xa = None if project else lowrank.xat(xd, lora_A)

        if project:  # xa computed inside the forward GEMM
            out, xa = registry.run("lora_fwd_xa", x2, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B,
                                   scaling)
        elif is_nf4 and fused:
            out = registry.run("lora_fwd_nf4", x2, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling)
        elif fused:
            out = registry.run("lora_fwd", x2, weight, bias, xa, lora_B, scaling)
        else:
            w = dense_weight(weight, absmax, code, N, K, blocksize, x.dtype)
            out = compose.lora_out(x2, w, bias, xa, lora_B, scaling)

        need_A, need_B = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        ctx.save_for_backward(
            x2 if need_A else None, keep, xa if need_B else None, weight, absmax, code, lora_A, lora_B
        )
        ctx.meta = (tuple(x.shape), M, N, K, r, float(scaling), float(dropout_p), int(blocksize), is_nf4, fused)
        return out.view(*x.shape[:-1], N)

    @staticmethod
    def _backward(ctx, dy):
        x2, keep, xa, weight, absmax, code, lora_A, lora_B = ctx.saved_tensors
        x_shape, M, N, K, r, s, p, blocksize, is_nf4, fused = ctx.meta
        need_x, _, _, _, need_bias, need_A, need_B = ctx.needs_input_grad[:7]
        dy2 = dy.reshape(M, N)
        keep_scale = 1.0 / (1.0 - p)
        dx = db = dA = dB = None

        project = need_x and fused and keep is None and projects_in_gemm(dy2, "lora_fwd")
        dyb = lowrank.xat(dy2, lora_B.t()) if (need_x or need_A) and not project else None
        if need_x:
            if project:  # dyb computed inside the dX GEMM
                dx, dyb = registry.run("lora_dx_dyb", dy2, weight, absmax, code, N, K, blocksize, lora_B, lora_A, s)
            elif is_nf4 and fused:
                dx = registry.run("lora_dx_nf4", dy2, weight, absmax, code, N, K, blocksize, dyb, lora_A, s,
                                                     keep, keep_scale)
            elif fused:
                dx = registry.run("lora_dx", dy2, weight, dyb, lora_A, s, keep, keep_scale)
            else:
                w = dense_weight(weight, absmax, code, N, K, blocksize, dy.dtype)
                dx = compose.lora_dx(dy2, w, dyb, lora_A, s, keep, keep_scale)
            dx = dx.view(x_shape)
        if need_A:
            xd = x2 if keep is None else dropped(x2, keep, keep_scale)
            dA = lowrank.gtx(dyb, xd, s)[0]
        if need_B:
            dB, db = compose.lora_db_dB(dy2, xa, s, need_bias)
        elif need_bias:
            db = dy2.sum(0)
        return dx, None, None, None, db, dA, dB, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused (see LoRALinearFunction for the maths).

    x [..., K]; weight: a frozen dense tensor [N, K] or a `deltakern.NF4Weight` of shape [N, K];
    bias [N] or None; lora_A [r, K]; lora_B [N, r]. Dropout (probability `dropout_p`, PEFT's
    inverted dropout on the LoRA branch only) applies when `training` is true.

    x, lora_A, lora_B, bias and a dense weight must share one dtype (fp16, bf16 or fp32) and one
    device; an NF4 weight is dequantized to x's dtype. Under torch.autocast the floating inputs are
    cast to the autocast dtype first (gradients flow back through the casts). A weight that
    requires grad raises ValueError: training the base weight is not supported.
    """
    check_input(x)
    check_dropout_p(dropout_p)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    is_nf4 = frozen_weight_kind(weight, "weight requires grad: lora_linear never computes a gradient for the base "
                                        "weight; freeze it (weight.requires_grad_(False)) as PEFT does")

    cast = autocast_dtype(x)
    if cast is not None:
        x, lora_A, lora_B = x.to(cast), lora_A.to(cast), lora_B.to(cast)
        if bias is not None:
            bias = bias.to(cast)
        if not is_nf4:
            weight = weight.to(cast)

    dtype, device = x.dtype, x.device
    check_float_dtype(dtype)
    N, K = check_weight(weight, is_nf4, dtype, device)
    check_features(x, K)
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 2:
        raise ValueError("lora_A must be a 2-D tensor [r, in_features]")
    r = lora_A.shape[0]
    check_param("lora_A", lora_A, dtype, device, (r, K))
    check_param("lora_B", lora_B, dtype, device, (N, r))
    if bias is not None:
        check_param("bias", bias, dtype, device, (N,))

    p = float(dropout_p) if training else 0.0
    if is_nf4:
        return LoRALinearFunction.apply(
            x, weight.packed_bytes(), weight.absmax_fp32(), weight.code, bias, lora_A, lora_B,
            float(scaling), p, int(weight.blocksize),
        )
    return LoRALinearFunction.apply(x, weight, None, None, bias, lora_A, lora_B, float(scaling), p, 0)


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, keep=None):
    """Plain-torch reference (autograd by torch, any device, any float dtype incl. float64).

    `keep` is an optional bool keep-mask [..., K] to use instead of drawing one (so tests can
    replay a mask); otherwise dropout is torch's.
    """
    if isinstance(weight, NF4Weight):
        weight = weight.dequantize(x.dtype)
    xd = x
    if training and dropout_p > 0.0:
        if keep is None:
            xd = torch.nn.functional.dropout(x, dropout_p, True)
        else:
            xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
    out = torch.nn.functional.linear(x, weight, bias)
    return out + scaling * torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)


def lora_linear_backward_ref(dy, x, weight, lora_A, lora_B, scaling, keep=None, dropout_p=0.0):
    """The gradients written out in LoRALinearFunction, in plain torch: (dx, dA, dB, db).

    x [M, K], dy [M, N], weight dense [N, K]; keep: bool keep-mask [M, K] or None.
    """
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    dyb = dy @ lora_B
    lora_dx = scaling * (dyb @ lora_A)
    if keep is not None:
        lora_dx = lora_dx * keep.to(x.dtype) / (1.0 - dropout_p)
    dx = dy @ weight + lora_dx
    dA = scaling * dyb.t() @ xd
    dB = scaling * dy.t() @ (xd @ lora_A.t())
    db = dy.sum(0)
    return dx, dA, dB, db
