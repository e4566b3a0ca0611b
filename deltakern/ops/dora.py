"""Schemas of the DoRA / QDoRA ops: `deltakern::dora_norm_parts`, `dora_fwd`, `dora_bwd`, `dora_colsum`, `dora_ctw`,
`dora_fwd_xa`, `dora_bwd_dyb`.

Notation: x [M, K], W [N, K] frozen, A [r, K], B [N, r], s = scaling, g [N] fp32 = m / ||W + s B A||
(the column scale), keep [M, K] bool dropout keep-mask or None, x_d = keep * x / (1 - p) rounded
to x's dtype (x itself without a mask), xa = x_d A^T.

    dora_norm_parts  (W A^T fp32 [N, r], ||W_j||^2 fp32 [N] or [0])               one pass over W
    dora_fwd         y = g * (x W^T + s xa B^T) + b                                  (no mask)
                     y = x W^T + (g - 1) * (x_d W^T) + g * s xa B^T + b              (mask: PEFT's form)
    dora_bwd         dx = (dy * g) W + s dyb A                                       (no mask)
                     dx = dy W + keep/(1-p) * ((dy * (g - 1)) W + s dyb A)           (mask)
                     db = sum_rows dy (fp32),  c = sum_rows dy * (y - b) (fp32, when y is given)
                     with dyb = (dy * g) B; compute_dx = 0 gives only the column sums
    dora_colsum      c_j = sum_i dy_ij z_ij,  z = x_d W^T + s xa B^T  (fp32 [N]; only the columns
                     where `cols` is set, 0 elsewhere, when `cols` is given)
    dora_ctw         C^T W (fp32 [r, K]) for C [N, r]
    dora_fwd_xa      (dora_fwd's y without a mask, xa = x A^T)
    dora_bwd_dyb     (dora_bwd's dx, db, c with compute_dx and no mask, dyb = (dy * g) B): a backend may
                     compute the projection inside the GEMM that reads x (dy * g) anyway (the CPU's does)

W is dense (`absmax`, `code` None) or NF4 (`weight` = packed bytes, `absmax` = decoded fp32 block
scales, `code` = 16 fp32 levels, N/K/blocksize describe it); NF4 is dequantized to the compute
dtype. Every op accumulates in fp32 and rounds its dtype outputs once; `dy * g` and `dy * (g - 1)`
are rounded to the compute dtype before their matmul (as the kernels do, in registers).

Implementations are registered per backend and device in `deltakern.backends` (the references in
`deltakern.backends.reference.dora`); `deltakern.backends.registry` picks one per call. Every op
has a fake kernel.
"""

from typing import Optional

import torch

from deltakern.backends import registry


@torch.library.custom_op("deltakern::dora_norm_parts", mutates_args=())
def dora_norm_parts(
    weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor], N: int, K: int,
    blocksize: int, lora_A: torch.Tensor, compute_sumsq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W A^T fp32 [N, r], ||W_j||^2 fp32 [N] or [0]); W in lora_A's dtype."""
    return registry.call("dora_norm_parts", weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq)


@dora_norm_parts.register_fake
def _(weight, absmax, code, N, K, blocksize, lora_A, compute_sumsq):
    f32 = torch.float32
    return lora_A.new_empty((N, lora_A.shape[0]), dtype=f32), lora_A.new_empty((N if compute_sumsq else 0,), dtype=f32)


@torch.library.custom_op("deltakern::dora_fwd", mutates_args=())
def dora_fwd(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor], xa: torch.Tensor, lora_B: torch.Tensor,
    g: torch.Tensor, keep: Optional[torch.Tensor], scaling: float, mask_scale: float,
) -> torch.Tensor:
    """DoRA output [M, N] (see the module docstring)."""
    return registry.call("dora_fwd", x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale)


@dora_fwd.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias, xa, lora_B, g, keep, scaling, mask_scale):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::dora_bwd", mutates_args=())
def dora_bwd(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, dyb: torch.Tensor, lora_A: torch.Tensor, g: torch.Tensor,
    keep: Optional[torch.Tensor], y: Optional[torch.Tensor], bias: Optional[torch.Tensor], scaling: float,
    mask_scale: float, compute_dx: int, compute_db: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K] or [0], db fp32 [N] or [0], c fp32 [N] or [0]) (see the module docstring)."""
    return registry.call("dora_bwd", dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale, compute_dx, compute_db)


@dora_bwd.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, dyb, lora_A, g, keep, y, bias, scaling, mask_scale,
      compute_dx, compute_db):
    f32 = torch.float32
    return (dy.new_empty((dy.shape[0], K) if compute_dx else (0,)),
            dy.new_empty((N if compute_db else 0,), dtype=f32), dy.new_empty((N if y is not None else 0,), dtype=f32))


@torch.library.custom_op("deltakern::dora_fwd_xa", mutates_args=())
def dora_fwd_xa(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
    g: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(DoRA output [M, N] without a mask, xa = x A^T [M, r]), both in x's dtype."""
    return registry.call("dora_fwd_xa", x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g, scaling)


@dora_fwd_xa.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, g, scaling):
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("deltakern::dora_bwd_dyb", mutates_args=())
def dora_bwd_dyb(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, lora_B: torch.Tensor, lora_A: torch.Tensor, g: torch.Tensor,
    y: Optional[torch.Tensor], bias: Optional[torch.Tensor], scaling: float, compute_db: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K], db fp32 [N] or [0], c fp32 [N] or [0], dyb = (dy * g) B [M, r] in dy's dtype): dora_bwd
    with compute_dx and no mask, computing dyb itself."""
    return registry.call("dora_bwd_dyb", dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, g, y, bias, scaling,
                         compute_db)


@dora_bwd_dyb.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, g, y, bias, scaling, compute_db):
    f32 = torch.float32
    return (dy.new_empty((dy.shape[0], K)), dy.new_empty((N if compute_db else 0,), dtype=f32),
            dy.new_empty((N if y is not None else 0,), dtype=f32), dy.new_empty((dy.shape[0], lora_B.shape[1])))


@torch.library.custom_op("deltakern::dora_colsum", mutates_args=())
def dora_colsum(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
    code: Optional[torch.Tensor], N: int, K: int, blocksize: int, keep: Optional[torch.Tensor], xa: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, mask_scale: float, cols: Optional[torch.Tensor],
) -> torch.Tensor:
    """c = sum_rows dy * (x_d W^T + s xa B^T), fp32 [N] (masked by `cols` when given)."""
    return registry.call("dora_colsum", dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols)


@dora_colsum.register_fake
def _(dy, x, weight, absmax, code, N, K, blocksize, keep, xa, lora_B, scaling, mask_scale, cols):
    return dy.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("deltakern::dora_ctw", mutates_args=())
def dora_ctw(
    c: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int,
) -> torch.Tensor:
    """C^T W, fp32 [r, K]; c [N, r] in the compute dtype."""
    return registry.call("dora_ctw", c, weight, absmax, code, N, K, blocksize)


@dora_ctw.register_fake
def _(c, weight, absmax, code, N, K, blocksize):
    return c.new_empty((c.shape[1], K), dtype=torch.float32)



@torch.library.custom_op("deltakern::dora_weight_norm", mutates_args=())
def dora_weight_norm(
    w: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor], N: int, K: int, blocksize: int,
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||W + s B A||_row fp32 [N], W A^T fp32 [N, r], ||W_j||^2 fp32 [N]) as one opaque op, for
    torch.compile (deltakern.autograd.dora_norm has the maths and the repair of cancelled rows)."""
    return registry.call("dora_weight_norm", w, absmax, code, N, K, blocksize, lora_A, lora_B, scaling)


@dora_weight_norm.register_fake
def _(w, absmax, code, N, K, blocksize, lora_A, lora_B, scaling):
    f32 = dict(dtype=torch.float32, device=lora_A.device)
    return lora_A.new_empty(N, **f32), lora_A.new_empty(N, lora_A.shape[0], **f32), lora_A.new_empty(N, **f32)

# Deprecated aliases: the references moved to deltakern.backends.reference.
from deltakern.backends.reference.dora import (  # noqa: E402,F401
    dora_bwd_ref, dora_colsum_ref, dora_ctw_ref, dora_fwd_ref, dora_norm_parts_ref,
)
