"""References of the fused LoRA ops (`deltakern::lora_fwd`, `lora_fwd_nf4`, `lora_dx`, `lora_dx_nf4`,
`lora_fwd_xa`, `lora_dx_dyb`).

    lora_fwd     out[M, N] = x[M, K] . W[N, K]^T + s * xa[M, r] . B[N, r]^T (+ bias[N])
    lora_dx      dx[M, K]  = dy[M, N] . W[N, K]  + s * (dyb[M, r] . A[r, K]) [* mask * mask_scale]

fp32 accumulation, one rounding to the input dtype. The `_nf4` variants decode W first.
"""

import torch

from deltakern._autocast import autocast_off
from deltakern.backends.reference._util import dense_weight_ref
from deltakern.backends.reference.lowrank import lowrank_xat_ref
from deltakern.backends.registry import register


def lora_fwd_ref(x, weight, bias, xa, lora_B, scaling: float) -> torch.Tensor:
    """Reference of `lora_fwd`: fp32 accumulation, one rounding to x.dtype."""
    with autocast_off(x.device.type):
        acc = torch.mm(x.float(), weight.float().t())
        acc.addmm_(xa.float(), lora_B.float().t(), alpha=scaling)
        if bias is not None:
            acc += bias.float()
        return acc.to(x.dtype)


def lora_dx_ref(dy, weight, dyb, lora_A, scaling: float, mask=None, mask_scale: float = 1.0) -> torch.Tensor:
    """Reference of `lora_dx`: fp32 accumulation, one rounding to dy.dtype."""
    with autocast_off(dy.device.type):
        lora = torch.mm(dyb.float(), lora_A.float())
        if mask is not None:
            lora = torch.where(mask.bool(), lora * mask_scale, 0.0)
        acc = torch.mm(dy.float(), weight.float())
        acc.add_(lora, alpha=scaling)
        return acc.to(dy.dtype)


@register("lora_fwd", "torch")
def lora_fwd(x, weight, bias, xa, lora_B, scaling):
    return lora_fwd_ref(x, weight, bias, xa, lora_B, scaling)


@register("lora_fwd_nf4", "torch")
def lora_fwd_nf4(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    weight = dense_weight_ref(packed, absmax, code, N, K, blocksize, x.dtype)
    return lora_fwd_ref(x, weight, bias, xa, lora_B, scaling)


@register("lora_dx", "torch")
def lora_dx(dy, weight, dyb, lora_A, scaling, mask, mask_scale):
    return lora_dx_ref(dy, weight, dyb, lora_A, scaling, mask, mask_scale)


@register("lora_dx_nf4", "torch")
def lora_dx_nf4(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    weight = dense_weight_ref(packed, absmax, code, N, K, blocksize, dy.dtype)
    return lora_dx_ref(dy, weight, dyb, lora_A, scaling, mask, mask_scale)


def _dense(weight, absmax, code, N, K, blocksize, dtype):
    return weight if absmax is None else dense_weight_ref(weight, absmax, code, N, K, blocksize, dtype)


@register("lora_fwd_xa", "torch")
def lora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, scaling):
    xa = lowrank_xat_ref(x, lora_A)
    return lora_fwd_ref(x, _dense(weight, absmax, code, N, K, blocksize, x.dtype), bias, xa, lora_B, scaling), xa


@register("lora_dx_dyb", "torch")
def lora_dx_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, scaling):
    dyb = lowrank_xat_ref(dy, lora_B.t())
    return lora_dx_ref(dy, _dense(weight, absmax, code, N, K, blocksize, dy.dtype), dyb, lora_A, scaling), dyb
