"""References of the frozen-linear (BitFit) ops `deltakern::linear_fwd` / `linear_bwd`.

    linear_fwd   y[M, N]  = x[M, K] . W[N, K]^T (+ b[N])
    linear_bwd   dx[M, K] = dy[M, N] . W[N, K],   db[N] = sum over rows of dy

fp32 accumulation (float64 for float64 inputs), one rounding to the input dtype.
"""

import torch

from deltakern._autocast import autocast_off
from deltakern.backends.reference._util import dense_weight_ref, f32
from deltakern.backends.registry import register


def linear_fwd_ref(x, weight, bias) -> torch.Tensor:
    """x . W^T (+ b) with an fp32 accumulator, one rounding to x.dtype (W dense, x.dtype)."""
    with autocast_off(x.device.type):
        acc = torch.mm(f32(x), f32(weight).t())
        if bias is not None:
            acc += f32(bias)
        return acc.to(x.dtype)


def linear_bwd_ref(dy, weight, compute_db: bool = True):
    """(dy . W, sum_rows dy or an empty tensor), fp32 accumulation, rounded once to dy.dtype."""
    with autocast_off(dy.device.type):
        dyf = f32(dy)
        dx = torch.mm(dyf, f32(weight)).to(dy.dtype)
        db = dyf.sum(0).to(dy.dtype) if compute_db else dy.new_empty((0,))
        return dx, db


@register("linear_fwd", "torch")
def linear_fwd(x, weight, absmax, code, N, K, blocksize, bias):
    return linear_fwd_ref(x, dense_weight_ref(weight, absmax, code, N, K, blocksize, x.dtype), bias)


@register("linear_bwd", "torch")
def linear_bwd(dy, weight, absmax, code, N, K, blocksize, compute_db):
    return linear_bwd_ref(dy, dense_weight_ref(weight, absmax, code, N, K, blocksize, dy.dtype), bool(compute_db))
