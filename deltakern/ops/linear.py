"""Schemas of the frozen-linear ops for bias-only fine-tuning (BitFit): `deltakern::linear_fwd`, `deltakern::linear_bwd`.

    linear_fwd   y[M, N]  = x[M, K] . W[N, K]^T (+ b[N])
    linear_bwd   dx[M, K] = dy[M, N] . W[N, K],   db[N] = sum over rows of dy   (one pass over dy)

W is dense (`absmax`, `code` None) or NF4: `weight` then holds the packed bytes (flat uint8), `absmax`
the decoded fp32 block scales (`NF4Weight.absmax_fp32()`), `code` the 16 fp32 levels, and N, K,
blocksize describe the [N, K] weight. Everything accumulates in fp32 and rounds once to the input
dtype; db is returned in dy's dtype (shape [0] when `compute_db` is 0).

Implementations are registered per backend and device in `deltakern.backends` (the references in
`deltakern.backends.reference.linear`); `deltakern.backends.registry` picks one per call. Fake
kernels make both traceable by torch.compile.
"""

from typing import Optional

import torch

from deltakern.backends import registry


@torch.library.custom_op("deltakern::linear_fwd", mutates_args=())
def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """x [M, K] -> x W^T (+ bias) [M, N]; W dense [N, K] or NF4 (see the module docstring)."""
    return registry.call("linear_fwd", x, weight, absmax, code, N, K, blocksize, bias)


@linear_fwd.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::linear_bwd", mutates_args=())
def linear_bwd(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, compute_db: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy [M, N] -> (dx = dy W [M, K], db = sum_rows dy [N], or [0] when compute_db is 0)."""
    return registry.call("linear_bwd", dy, weight, absmax, code, N, K, blocksize, compute_db)


@linear_bwd.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, compute_db):
    return dy.new_empty((dy.shape[0], K)), dy.new_empty((N if compute_db else 0,))


# Deprecated aliases: the references moved to deltakern.backends.reference.
from deltakern.backends.reference.linear import linear_bwd_ref, linear_fwd_ref  # noqa: E402,F401
