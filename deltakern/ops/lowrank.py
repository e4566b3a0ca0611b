"""Schemas of the rank-r products of the LoRA / DoRA layers: `deltakern::lowrank_xat`, `lowrank_gtx`,
`lowrank_gb`. R is the adapter rank (small); M, K, N are the layer's tokens and widths.

    lowrank_xat   y[M, R]    = x[M, K] . a[R, K]^T                    xa = x A^T;  dyb = dY B (a = B^T)
    lowrank_gtx   out        = scale * g[M, R]^T . x[M, K]  as [R, K]  dA = s dyb^T x
                               (as [K, R] when `transpose`)            dB = s (xa^T dY)^T
                  colsum[K]  = sum of x's rows (empty when not asked)  db = sum over tokens of dY
    lowrank_gb    out[M, N]  = bias[N] + scale * g[M, R] . bt[R, N]    the rank-r term of y and of dX

Results are in the operands' dtype (the references: torch's matmul). On the CPU, fp32 operands with
R <= 64 run the native kernels of deltakern._cpu (csrc/cpu/cpu_lowrank.h): one streaming pass over the
large operand instead of a BLAS call shaped for square products (2-3x faster at these shapes).

The layer functions call them through `xat`, `gtx` and `gb` below (`registry.run`: in eager mode
straight through the registry, under torch.compile through `torch.ops.deltakern.*`).
"""

from typing import Optional

import torch

from deltakern.backends import registry


@torch.library.custom_op("deltakern::lowrank_xat", mutates_args=())
def lowrank_xat(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [M, K], a [R, K] -> x a^T [M, R]."""
    return registry.call("lowrank_xat", x, a)


@lowrank_xat.register_fake
def _(x, a):
    return x.new_empty((x.shape[0], a.shape[0]))


@torch.library.custom_op("deltakern::lowrank_gtx", mutates_args=())
def lowrank_gtx(g: torch.Tensor, x: torch.Tensor, scale: float, colsum: bool,
                transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """g [M, R], x [M, K] -> (scale g^T x: [R, K], or [K, R] when transpose; sum of x's rows [K] or [0])."""
    return registry.call("lowrank_gtx", g, x, scale, colsum, transpose)


@lowrank_gtx.register_fake
def _(g, x, scale, colsum, transpose):
    R, K = g.shape[1], x.shape[1]
    return x.new_empty((K, R) if transpose else (R, K)), x.new_empty((K if colsum else 0,))


@torch.library.custom_op("deltakern::lowrank_gb", mutates_args=())
def lowrank_gb(g: torch.Tensor, bt: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """g [M, R], bt [R, N], bias [N] or None -> bias + scale g bt [M, N]."""
    return registry.call("lowrank_gb", g, bt, scale, bias)


@lowrank_gb.register_fake
def _(g, bt, scale, bias):
    return g.new_empty((g.shape[0], bt.shape[1]))


def xat(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x a^T (see the module docstring)."""
    return registry.run("lowrank_xat", x, a)


def gtx(g: torch.Tensor, x: torch.Tensor, scale: float = 1.0, colsum: bool = False, transpose: bool = False):
    """(scale g^T x [R, K] or [K, R], sum of x's rows or None)."""
    out, cs = registry.run("lowrank_gtx", g, x, scale, colsum, transpose)
    return out, (cs if colsum else None)


def gb(g: torch.Tensor, bt: torch.Tensor, scale: float = 1.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bias + scale g bt."""
    return registry.run("lowrank_gb", g, bt, scale, bias)
