"""What the LoRA, DoRA and frozen-linear (BitFit) functions share: the argument checks of their
user-facing entry points, the fused-or-composition path choice, and PEFT's dropout form."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from deltakern.backends import registry
from deltakern.nf4 import NF4Weight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- path choice (owned by deltakern.backends.registry) --------------------------------------------

MAX_FUSED_R = registry.MAX_FUSED_R
forced_impl = registry.forced_impl


def dense_weight(weight, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype` for a composition: `weight` itself when dense (absmax None), else
    the packed bytes decoded by `deltakern::nf4_dequantize` (whichever backend the registry picks)."""
    if absmax is None:
        return weight
    flat = registry.run("nf4_dequantize", weight.reshape(-1).view(torch.uint8), absmax, None, None, 0.0, code,
                                              N * K, blocksize, dtype)
    return flat.view(N, K)


def adapter_autocast(compute: torch.dtype, device_type: str, params) -> contextlib.AbstractContextManager:
    """The fp32-adapter policy (PEFT's `autocast_adapter_dtype`), one home for nn and the PEFT patch:
    adapter parameters kept in fp32 over a bf16 / fp16 computation are cast to the compute dtype by
    torch.autocast around the fused function (the functions cast every floating input to the
    autocast dtype, the gradients flow back to the fp32 parameters, and the DoRA norm cache still
    keys on the parameters themselves). A null context when the compute dtype is fp32, nothing
    differs from it, the device has no autocast, or autocast is already on."""
    if (compute in (torch.float16, torch.bfloat16) and device_type in ("cuda", "cpu")
            and not torch.is_autocast_enabled(device_type)
            and any(p is not None and p.dtype != compute for p in params)):
        return torch.autocast(device_type, dtype=compute)
    return contextlib.nullcontext()


def projects_in_gemm(t: torch.Tensor, op: str) -> bool:
    """Whether a layer's fused path takes its projection (xa = x A^T, dyb) from the op that also runs its
    GEMM (`lora_fwd_xa`, `lora_dx_dyb`, `dora_fwd_xa`, `dora_bwd_dyb`): where the CPU backend runs `op`
    (its packed GEMM projects x / dY's tiles while they are in cache). The Triton path and the
    interpreter lane keep the separate rank-r op."""
    return t.device.type == "cpu" and registry.resolve(op, "cpu") == "cpu"


def dropped(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep / (1 - p), computed the same way in forward and backward."""
    return torch.where(keep, x * scale, 0.0).to(x.dtype)


# ---- argument checks ----------------------------------------------------------------------------


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")


def check_dropout_p(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def frozen_weight_kind(weight, requires_grad_msg: str) -> bool:
    """True for an NF4Weight, False for a dense tensor that does not require grad (else it raises
    ValueError(requires_grad_msg)); TypeError for anything else."""
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4 and not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
    if not is_nf4 and weight.requires_grad:
        raise ValueError(requires_grad_msg)
    return is_nf4


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts the floating inputs to, or None outside autocast."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def check_float_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {dtype}")


def weight_shape(weight) -> tuple:
    """(N, K) of a 2-D weight (dense or NF4)."""
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {shape}")
    return shape


def check_features(x: torch.Tensor, K: int) -> None:
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, the weight expects {K}")


def check_param(name: str, t, dtype: torch.dtype, device: torch.device, shape: Optional[tuple]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but x has {dtype}; cast them to one dtype (or run under "
            "torch.autocast, which casts both)"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_weight(weight, is_nf4: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    """(N, K) of a 2-D frozen weight on x's device; a dense one must also have x's dtype."""
    N, K = weight_shape(weight)
    if is_nf4:
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but x is on {device}")
    else:
        check_param("weight", weight, dtype, device, None)
    return N, K
