"""Schemas of the fused LoRA ops: `deltakern::lora_fwd`, `lora_fwd_nf4`, `lora_dx`, `lora_dx_nf4`,
`lora_fwd_xa`, `lora_dx_dyb`.

    lora_fwd     out[M, N] = x[M, K] . W[N, K]^T + s * xa[M, r] . B[N, r]^T (+ bias[N])
    lora_dx      dx[M, K]  = dy[M, N] . W[N, K]  + s * (dyb[M, r] . A[r, K]) [* mask * mask_scale]
    lora_fwd_xa  (lora_fwd's out, xa = x . A^T): the projection too (no dropout), dense or NF4 W
    lora_dx_dyb  (lora_dx's dx, dyb = dy . B): likewise (no mask)

The last two let a backend compute xa (dyb) inside the GEMM that reads x (dy) anyway: the CPU
backend's packed GEMM projects its packed tiles of x while they are in cache.

The `_nf4` variants take the weight as plain tensors: the packed bytes (flat uint8), the decoded
fp32 block scales (`NF4Weight.absmax_fp32()`), the 16-entry code book, and N, K, blocksize as ints.
All ops accumulate in fp32 and round once to the input dtype.

Implementations are registered per backend and device in `deltakern.backends` (the references in
`deltakern.backends.reference.lora`); `deltakern.backends.registry` picks one per call. Every op has
a fake kernel, so `torch.compile(fullgraph=True)` traces through them.
"""

from typing import Optional

import torch

from deltakern.backends import registry


@torch.library.custom_op("deltakern::lora_fwd", mutates_args=())
def lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], xa: torch.Tensor,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """x [M, K], dense weight [N, K], bias [N] or None, xa [M, r], lora_B [N, r] -> [M, N]."""
    return registry.call("lora_fwd", x, weight, bias, xa, lora_B, scaling)


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
    return registry.call("lora_fwd_nf4", x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling)


@lora_fwd_nf4.register_fake
def _(x, packed, absmax, code, N, K, blocksize, bias, xa, lora_B, scaling):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("deltakern::lora_dx", mutates_args=())
def lora_dx(
    dy: torch.Tensor, weight: torch.Tensor, dyb: torch.Tensor, lora_A: torch.Tensor, scaling: float,
    mask: Optional[torch.Tensor], mask_scale: float,
) -> torch.Tensor:
    """dy [M, N], dense weight [N, K], dyb = dy . B [M, r], lora_A [r, K], mask bool [M, K] or None."""
    return registry.call("lora_dx", dy, weight, dyb, lora_A, scaling, mask, mask_scale)


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
    return registry.call("lora_dx_nf4", dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale)


@lora_dx_nf4.register_fake
def _(dy, packed, absmax, code, N, K, blocksize, dyb, lora_A, scaling, mask, mask_scale):
    return dy.new_empty((dy.shape[0], K))


@torch.library.custom_op("deltakern::lora_fwd_xa", mutates_args=())
def lora_fwd_xa(
    x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_fwd's out [M, N], xa = x . A^T [M, r]) in x's dtype; weight dense [N, K] (absmax, code None)
    or NF4 as in lora_fwd_nf4."""
    return registry.call("lora_fwd_xa", x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, scaling)


@lora_fwd_xa.register_fake
def _(x, weight, absmax, code, N, K, blocksize, bias, lora_A, lora_B, scaling):
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("deltakern::lora_dx_dyb", mutates_args=())
def lora_dx_dyb(
    dy: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_dx's dx [M, K] without a mask, dyb = dy . B [M, r]) in dy's dtype; weight as in lora_fwd_xa."""
    return registry.call("lora_dx_dyb", dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, scaling)


@lora_dx_dyb.register_fake
def _(dy, weight, absmax, code, N, K, blocksize, lora_B, lora_A, scaling):
    return dy.new_empty((dy.shape[0], K)), dy.new_empty((dy.shape[0], lora_B.shape[1]))


# Deprecated aliases: the references moved to deltakern.backends.reference.
from deltakern.backends.reference._util import dense_weight_ref as _dense_weight_ref  # noqa: E402
from deltakern.backends.reference.lora import lora_dx_ref, lora_fwd_ref  # noqa: E402,F401


def nf4_weight_ref(packed, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    """Deprecated: use deltakern.backends.reference.dense_weight_ref."""
    return _dense_weight_ref(packed, absmax, code, N, K, blocksize, dtype)
