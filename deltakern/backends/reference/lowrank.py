"""References of the rank-r products (`deltakern::lowrank_xat`, `lowrank_gtx`, `lowrank_gb`): torch's
matmul in the operands' dtype, in the layouts its BLAS runs fastest on the CPU (r as the row
dimension of the result), and the plain products elsewhere."""

import torch

from deltakern.backends.registry import register


@register("lowrank_xat", "torch")
def lowrank_xat_ref(x, a):
    """x a^T; on the CPU computed as (a x^T)^T (BLAS's fast layout), then made contiguous ([M, R]: small)."""
    if x.device.type == "cpu":
        return torch.mm(a, x.t()).t().contiguous()
    return torch.mm(x, a.t())


@register("lowrank_gtx", "torch")
def lowrank_gtx_ref(g, x, scale, colsum, transpose):
    """scale g^T x ([R, K], or [K, R]) and the column sums of x, from one matmul over x: [g | 1]^T x."""
    R = g.shape[1]
    cols = g.t() if not colsum else torch.cat([g.t(), g.new_ones(1, g.shape[0])], 0)  # [R (+1), M]
    both = torch.mm(cols, x) if x.device.type == "cpu" else torch.mm(x.t(), cols.t()).t()  # [R (+1), K]
    out = both[:R] * scale
    out = out.t().contiguous() if transpose else out
    return out, (both[R].clone() if colsum else x.new_empty((0,)))


@register("lowrank_gb", "torch")
def lowrank_gb_ref(g, bt, scale, bias):
    """bias + scale g bt: one matmul, the bias broadcast into its output."""
    if bias is not None:
        return torch.addmm(bias, g, bt, alpha=scale)
    out = torch.empty((g.shape[0], bt.shape[1]), dtype=g.dtype, device=g.device)
    return torch.addmm(out, g, bt, beta=0, alpha=scale, out=out)
