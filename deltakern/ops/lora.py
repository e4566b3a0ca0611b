"""Fused LoRA linear ops: `deltakern::lora_fwd`, `lora_fwd_nf4`, `lora_dx`, `lora_dx_nf4`.

    lora_fwd     out[M, N] = x[M, K] . W[N, K]^T + s * xa[M, r] . B[N, r]^T (+ bias[N])
    lora_dx      dx[M, K]  = dy[M, N] . W[N, K]  + s * (dyb[M, r] . A[r, K]) [* mask * mask_scale]

The `_nf4` variants take the weight as plain tensors: the packed bytes (flat uint8), the decoded
fp32 block scales (`NF4Weight.absmax_fp32()`), the 16-entry code book, and N, K, blocksize as ints.
All ops accumulate in fp32 and round once to the input dtype.

CPU: fp32 BLAS compositions (deltakern.ops.compose: the rank-r term first, the big GEMM adding into
it); fp16 / bf16 inputs are upcast and rounded once. The pure-torch references below are the oracle.
CUDA: the Triton kernels in deltakern.triton_kernels.lora, which dequantize NF4 tiles in registers.
Every op has a fake kernel, so `torch.compile(fullgraph=True)` traces through them.
"""

import importlib
from typing import Optional

import torch

from deltakern import _backend
from deltakern.ops import compose
from deltakern.ops.linear import cpu_weight, f32


def _kernels():
    _backend.require_triton()
    return importlib.import_module("deltakern.triton_kernels.lora")


# ---- references -----------------------------------------------------------------------------


def nf4_weight_ref(packed, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    """The dense [N, K] weight: cast(fp32(code[nibble] * absmax[block])) via deltakern::nf4_dequantize."""
    flat = torch.ops.deltakern.nf4_dequantize(packed, absmax, None, None, 0.0, code, N * K, blocksize, dtype)
    return flat.view(N, K)


def lora_fwd_ref(x, weight, bias, xa, lora_B, scaling: float) -> torch.Tensor:
    """Reference of `lora_fwd`: fp32 accumulation, one rounding to x.dtype."""
    with torch.autocast(x.device.type, enabled=False):
        acc = torch.mm(x.float(), weight.float().t())
        acc.addmm_(xa.float(), lora_B.float().t(), alpha=scaling)
        if bias is not None:
            acc += bias.float()
        return acc.to(x.dtype)


def lora_dx_ref(dy, weight, dyb, lora_A, scaling: float, mask=None, mask_scale: float = 1.0) -> torch.Tensor:
    """Reference of `lora_dx`: fp32 accumulation, one rounding to dy.dtype."""
    with torch.autocast(dy.device.type, enabled=False):
        lora = torch.mm(dyb.float(), lora_A.float())
        if mask is not None:
            lora = torch.where(mask.bool(), lora * mask_scale, 0.0)
        acc = torch.mm(dy.float(), weight.float())
        acc.add_(lora, alpha=scaling)
        return acc.to(dy.dtype)


def lora_fwd_cpu(x, w, bias, xa, lora_B, scaling: float) -> torch.Tensor:
    """`lora_fwd` on the CPU with W already an fp32 operand: b + s xa B^T, then += x W^T (one GEMM pass)."""
    return compose.lora_out(f32(x), w, f32(bias), f32(xa), f32(lora_B), scaling).to(x.dtype)


def lora_dx_cpu(dy, w, dyb, lora_A, scaling: float, mask=None, mask_scale: float = 1.0) -> torch.Tensor:
    """`lora_dx` on the CPU with W already an fp32 operand: s (dyb A) [masked], then += dY W."""
    keep = None if mask is None else mask.bool()
    return compose.lora_dx(f32(dy), w, f32(dyb), f32(lora_A), scaling, keep, mask_scale).to(dy.dtype)


# ---- ops ------------------------------------------------------------------------------------


@torch.library.custom_op("deltakern::lora_fwd", mutates_args=())
def lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], xa: torch.Tensor,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """x [M, K], dense weight [N, K], bias [N] or None, xa [M, r], lora_B [N, r] -> [M, N]."""
    if x.device.type == "cuda":
        return _kernels().lora_forward(x, weight, bias, xa, lora_B, scaling)
    return lora_fwd_cpu(x, f32(weight), bias, xa, lora_B, scaling)


@lora_fwd.register_fake
def _(x, weight, bias, xa, lora_B, scaling):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("deltakern::lora_fwd_nf4", mutates_args=())
def lora_fwd_nf4(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor], xa: torch.Tensor,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """As lora_fwd with an NF4 weight: packed uint8 [(N*K+1)//2], fp32 absmax, fp32 code [16]."""
    if x.device.type == "cuda":
        return _kernels().lora_forward(x, packed, bias, xa, lora_B, scaling, nf4=(absmax, code, blocksize))
    w, _ = cpu_weight(packed, absmax, code, N, K, blocksize, x.dtype)
    return lora_fwd_cpu(x, w, bias, xa, lora_B, scaling)


@lora_fwd_nf4.register_fake
def _(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::lora_dx", mutates_args=())
def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, dyb: torch.Tensor, lora_A: torch.Tensor, scaling: float,
    mask: Optional[torch.Tensor], mask_scale: float,
) -> torch.Tensor:
    """dy [M, N], dense weight [N, K], dyb = dy . B [M, r], lora_A [r, K], mask bool [M, K] or None."""
    if dy.device.type == "cuda":
        return _kernels().lora_backward_dx(dy, weight, dyb, lora_A, scaling, mask, mask_scale)
    return lora_dx_cpu(dy, f32(weight), dyb, lora_A, scaling, mask, mask_scale)


@lora_dx.register_fake
def _(dy, weight, dyb, lora_A, scaling, mask, mask_scale):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@torch.library.custom_op("deltakern::lora_dx_nf4", mutates_args=())
def lora_dx_nf4(
    dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
    N: int, K: int, blocksize: int, dyb: torch.Tensor, lora_A: torch.Tensor, scaling: float,
    mask: Optional[torch.Tensor], mask_scale: float,
) -> torch.Tensor:
    """As lora_dx with an NF4 weight (see lora_fwd_nf4)."""
    if dy.device.type == "cuda":
        return _kernels().lora_backward_dx(dy, packed, dyb, lora_A, scaling, mask, mask_scale,
                                           nf4=(absmax, code, blocksize))
    w, _ = cpu_weight(packed, absmax, code, N, K, blocksize, dy.dtype)
    return lora_dx_cpu(dy, w, dyb, lora_A, scaling, mask, mask_scale)


@lora_dx_nf4.register_fake
def _(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    return dy.new_empty((dy.shape[0], K))
