"""What the LoRA, DoRA and frozen-linear (BitFit) functions share: the argument checks of their
user-facing entry points, the fused-or-composition path choice, and PEFT's dropout form."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from deltakern import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_R = 128  # the Triton kernels pad r to a power of two >= 16 held in registers


def nf4_type():
    from deltakern.nf4 import NF4Weight

    return NF4Weight


# ---- path choice --------------------------------------------------------------------------------


def _impl_env(var: str) -> str:
    return os.environ.get(var, "").strip().lower()


def forced_impl(var: str) -> Optional[bool]:
    """`var`=triton|torch (e.g. DELTAKERN_LORA_IMPL): True / False; unset: None; anything else raises."""
    forced = _impl_env(var)
    if forced == "triton":
        return True
    if forced == "torch":
        return False
    if forced:
        raise ValueError(f"{var}={forced!r} is not one of ('triton', 'torch')")
    return None


def small_m_choice(var: str, M: int, weight_kind: str, r: int) -> bool:
    """The LoRA / DoRA default, UNTUNED (made without a GPU to measure on): `var` forces the choice;
    otherwise Triton for M <= 64 with a dense W (cuBLAS is the stronger matmul at training shapes)
    and M <= 512 with NF4. r > MAX_FUSED_R always takes the composition.

    The NF4 bound is the crossover of a cost model fed by the static kernel report
    (benchmarks/kernel_report.py, sm_90 SASS; H100 figures: 132 SMs x 4 warp-instructions per
    cycle at 1.755 GHz, 708 TFLOP/s bf16, 3.02 TB/s copy), for one training step's forward + dX:
        fused(kernel) = max(ceil(M / 128) * N K * ipe / (132 * 4 * 1.755e9), 2 M N K / 708e12)
            (ipe: warp-instructions per weight element per 128-row tile: 0.41 forward, 0.53 dX;
            max() because the decoded tile is the wgmma's register operand and the loop does not
            wait on its MMA; with the wait it would be the sum)
        composition(GEMM) = (N K / 2 + N K / 16 + 2 N K) / (0.9 * 3.02e12)        dequantize
                            + max(2 M N K / 708e12, (2 N K + 2 M K + 2 M N) / 3.02e12)   cuBLAS
    For N = 14336, K = 4096, fused(fwd) + fused(dX) < 2 composition(GEMM) below M ~ 530 (it was
    M ~ 144 with the element-wise NF4 loader: ipe 0.93, MMA waited on). Predictions, to be
    replaced by measured crossovers."""
    forced = forced_impl(var)
    if forced is not None:
        return forced
    if r > MAX_FUSED_R:
        return False
    return M <= (512 if weight_kind == "nf4" else 64)


def fused_path(x: torch.Tensor, var: str, off_backends: tuple, M: int, N: int, K: int, r: int,
               use_triton: Callable[[], bool]) -> bool:
    """Whether a call runs the fused op. CPU tensors: yes (its CPU kernel is the pure-torch
    reference) unless `var`=torch forces the composition. CUDA: `use_triton()`, except under a
    DELTAKERN_BACKEND in `off_backends`, for r > MAX_FUSED_R, or where the Triton kernels' int32
    indexing would overflow."""
    if x.device.type != "cuda":
        return _impl_env(var) != "torch"
    if _backend.backend() in off_backends or r > MAX_FUSED_R or M * max(N, K) >= 2**31 or N * K >= 2**31:
        return False
    return use_triton()


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
    is_nf4 = isinstance(weight, nf4_type())
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
