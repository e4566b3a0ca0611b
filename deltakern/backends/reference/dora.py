"""References of the DoRA / QDoRA ops (`deltakern::dora_norm_parts`, `dora_fwd`, `dora_bwd`,
`dora_colsum`, `dora_ctw`); the notation and the maths of each op are in deltakern/ops/dora.py.

NF4 is dequantized to the compute dtype first. Every op accumulates in fp32 (float64 for float64
inputs) and rounds its dtype outputs once; `dy * g` and `dy * (g - 1)` are rounded to the compute
dtype before their matmul (as the kernels do, in registers).
"""

import torch

from deltakern._autocast import autocast_off
from deltakern.backends.reference._util import dense_weight_ref, f32
from deltakern.backends.reference.lowrank import lowrank_xat_ref
from deltakern.backends.registry import register


def _mask_scale(keep, x, mask_scale):
    return x if keep is None else torch.where(keep.bool(), x * mask_scale, 0.0).to(x.dtype)


def dora_norm_parts_ref(weight, lora_A, compute_sumsq: bool = True):
    with autocast_off(weight.device.type):
        wf = f32(weight)
        wa = torch.mm(wf, f32(lora_A).t())
        return wa, (wf.square().sum(1) if compute_sumsq else wf.new_empty((0,)))


def dora_fwd_ref(x, weight, bias, xa, lora_B, g, keep, scaling: float, mask_scale: float):
    with autocast_off(x.device.type):
        wt = f32(weight).t()
        acc = torch.mm(f32(_mask_scale(keep, x, mask_scale)), wt)
        z = acc + scaling * torch.mm(f32(xa), f32(lora_B).t())
        out = z * g
        if keep is not None:
            out += torch.mm(f32(x), wt) - acc
        if bias is not None:
            out += f32(bias)
        return out.to(x.dtype)


def dora_bwd_ref(dy, weight, dyb, lora_A, g, keep, y, bias, scaling: float, mask_scale: float,
                 compute_dx: bool = True, compute_db: bool = True):
    with autocast_off(dy.device.type):
        dyf = f32(dy)
        dx = dy.new_empty((0,))
        if compute_dx:
            wf = f32(weight)
            lora = scaling * torch.mm(f32(dyb), f32(lora_A))
            if keep is None:
                dx = torch.mm(f32((dyf * g).to(dy.dtype)), wf) + lora
            else:
                inner = torch.mm(f32((dyf * (g - 1.0)).to(dy.dtype)), wf) + lora
                dx = torch.mm(dyf, wf) + torch.where(keep.bool(), inner * mask_scale, 0.0)
            dx = dx.to(dy.dtype)
        db = dyf.sum(0) if compute_db else dyf.new_empty((0,))
        if y is None:
            c = dyf.new_empty((0,))
        else:
            yb = f32(y) if bias is None else f32(y) - f32(bias)
            c = (dyf * yb).sum(0)
        return dx, db, c


def dora_colsum_ref(dy, x, weight, keep, xa, lora_B, scaling: float, mask_scale: float, cols=None):
    with autocast_off(dy.device.type):
        z = torch.mm(f32(_mask_scale(keep, x, mask_scale)), f32(weight).t())
        z += scaling * torch.mm(f32(xa), f32(lora_B).t())
        c = (f32(dy) * z).sum(0)
        return c if cols is None else torch.where(cols.bool(), c, 0.0)


def dora_ctw_ref(c, weight):
    with autocast_off(c.device.type):
        return torch.mm(f32(c).t(), f32(weight))


@register("dora_norm_parts", "torch")
def dora_norm_parts(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq):
    w = dense_weight_ref(weight, absmax, code, N, K, blocksize, lora_A.dtype)
    wa, sq = dora_norm_parts_ref(w, lora_A, bool(compute_sumsq))
    return wa.float(), sq.float()


@register("dora_fwd", "torch")
def dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    w = dense_weight_ref(weight, absmax, code, N, K, blocksize, x.dtype)
    return dora_fwd_ref(x, w, bias, xa, lora_B, g, keep, scaling, mask_scale)


@register("dora_bwd", "torch")
def dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
             compute_dx, compute_db):
    w = dense_weight_ref(weight, absmax, code, N, K, blocksize, dy.dtype) if compute_dx else weight
    dx, db, c = dora_bwd_ref(dy, w, dyb, lora_A, g, keep, y, bias, scaling, mask_scale, bool(compute_dx),
                             bool(compute_db))
    return dx, db.float(), c.float()


def dora_dyb_ref(dy, lora_B, g):
    """dyb = (dy * g) B as the layers form it: dy . (g B) with g B rounded to dy's dtype."""
    return lowrank_xat_ref(dy, (lora_B.float() * g[:, None]).to(dy.dtype).t())


@register("dora_fwd_xa", "torch")
def dora_fwd_xa(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g, scaling):
    xa = lowrank_xat_ref(x, lora_A)
    return dora_fwd(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, None, scaling, 1.0), xa


@register("dora_bwd_dyb", "torch")
def dora_bwd_dyb(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, g, y, bias, scaling, compute_db):
    dyb = dora_dyb_ref(dy, lora_B, g)
    dx, db, c = dora_bwd(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, None, y, bias, scaling, 1.0, 1,
                         compute_db)
    return dx, db, c, dyb


@register("dora_colsum", "torch")
def dora_colsum(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    w = dense_weight_ref(weight, absmax, code, N, K, blocksize, x.dtype)
    return dora_colsum_ref(dy, x, w, keep, xa, lora_B, scaling, mask_scale, cols).float()


@register("dora_ctw", "torch")
def dora_ctw(c, weight, absmax, code, N, K, blocksize):
    return dora_ctw_ref(c, dense_weight_ref(weight, absmax, code, N, K, blocksize, c.dtype)).float()


@register("dora_weight_norm", "torch")
def dora_weight_norm(w, absmax, code, N, K, blocksize, lora_A, lora_B, scaling):
    """A composite of the other ops (dora_norm_parts, then the expansion and its repair) for every
    device: deltakern.autograd.dora_norm.dora_weight_norm_op."""
    from deltakern.autograd.dora_norm import dora_weight_norm_op

    return dora_weight_norm_op(w, absmax, code, N, K, blocksize, lora_A, lora_B, scaling)
