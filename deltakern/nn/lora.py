"""LoRALinear: a frozen linear (dense nn.Linear, transformers' Conv1D, or 4-bit NF4Linear) plus a trainable
low-rank update.

    y = base(x) + scaling * lora_B(lora_A(dropout(x))),   scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

Initialisation, scaling and dropout follow PEFT's LoRA (lora_A: kaiming_uniform_(a=sqrt(5)),
lora_B: zeros; dropout on the LoRA branch only), so a PEFT adapter's tensors load directly into
`lora_A` [r, in_features] and `lora_B` [out_features, r]. The forward is one call to
`deltakern.autograd.lora.lora_linear`.

A transformers `Conv1D` base (GPT-2 style: weight stored [in_features, out_features], y = x W + b) is
handled as PEFT does with `fan_in_fan_out=True`: the functions get the zero-copy view `weight.t()`
[out, in], `lora_A` / `lora_B` keep PEFT's shapes, and merging writes the transposed update into the
[in, out] weight. transformers stays optional: a Conv1D is recognised only once
`transformers.pytorch_utils` is imported (which any model holding one has done).

Adapter parameters may be kept in fp32 over a bf16 / fp16 input (PEFT's `autocast_adapter_dtype`
default): the layer then computes in the input's dtype, with the parameters cast inside (their
gradients arrive in fp32), as `deltakern.integrations.peft` does.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings

import torch
from torch import nn

from deltakern.autograd._common import adapter_autocast
from deltakern.autograd.lora import lora_linear
from deltakern.nf4 import NF4Weight


def compute_in_input_dtype(x: torch.Tensor, weight, params) -> contextlib.AbstractContextManager:
    """torch.autocast to x's dtype when x is bf16 / fp16, the base `weight` is NF4 or has x's dtype, and
    some parameter does not (fp32 adapters over a half-precision base); otherwise (or already under
    autocast) nothing. The functions cast every floating input to the autocast dtype and the gradients
    flow back to the fp32 parameters. A dense base of another dtype still raises, as nn.Linear would."""
    if not (isinstance(weight, NF4Weight) or weight.dtype == x.dtype):
        return contextlib.nullcontext()
    return adapter_autocast(x.dtype, x.device.type, params)


def conv1d_type():
    """transformers' `pytorch_utils.Conv1D` class, or None while transformers.pytorch_utils is not imported
    (never imports transformers: a model that holds a Conv1D has imported it already)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(module) -> bool:
    """Whether `module` is a transformers Conv1D (GPT-2 style linear, weight [in_features, out_features])."""
    cls = conv1d_type()
    return cls is not None and isinstance(module, cls)


def dense_conv1d_weight(module) -> bool:
    """A Conv1D whose weight is a plain 2-D tensor (what LoRALinear / DoRALinear wrap)."""
    w = getattr(module, "weight", None)
    return is_conv1d(module) and isinstance(w, torch.Tensor) and w.dim() == 2


def check_rank(r: int, out_features: int, in_features: int) -> None:
    """Warn when r > min(in_features, out_features): B A then has rank min(in, out) at most, so the extra
    rank only adds parameters and compute (PEFT allows it silently)."""
    if r > min(in_features, out_features):
        warnings.warn(f"r={r} exceeds min(in_features={in_features}, out_features={out_features}) = "
                      f"{min(in_features, out_features)}: the update B A cannot have a rank above that, the extra "
                      "rank only costs parameters", UserWarning, stacklevel=3)


def check_adapter_args(r, alpha, dropout) -> None:
    """Raise ValueError unless r is a positive int, alpha a positive finite number and dropout in [0, 1)
    (the checks LoRALinear and DoRALinear share)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """`base` plus scaling * B A: r=8, alpha=16 by default (as `deltakern.LoRA`); r above min(in, out) warns."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        check_adapter_args(r, alpha, dropout)
        weight = getattr(base, "weight", None)
        self.fan_in_fan_out = False  # True for a Conv1D base (PEFT's name for the [in, out] layout)
        if isinstance(base, nn.Linear) and isinstance(weight, torch.Tensor):
            self.is_nf4 = False
            out_features, in_features = weight.shape
            dtype, device = weight.dtype, weight.device
            weight.requires_grad_(False)
        elif dense_conv1d_weight(base):
            self.is_nf4, self.fan_in_fan_out = False, True
            in_features, out_features = weight.shape
            dtype, device = weight.dtype, weight.device
            weight.requires_grad_(False)
        elif isinstance(base, nn.Module) and isinstance(weight, NF4Weight):
            self.is_nf4 = True
            if len(weight.shape) != 2:
                raise ValueError(f"base's NF4 weight must be 2-D, got shape {tuple(weight.shape)}")
            out_features, in_features = weight.shape
            dtype, device = weight.dtype, weight.device
        else:
            raise TypeError(
                f"base must be an nn.Linear, a transformers Conv1D, or a module whose .weight is an NF4Weight "
                f"(e.g. deltakern.nn.NF4Linear), got {type(base).__name__}"
            )
        bias = getattr(base, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.requires_grad_(False)  # PEFT's bias="none": the whole base layer is frozen

        check_rank(r, int(out_features), int(in_features))
        self.base = base
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """PEFT's default init: A ~ kaiming_uniform_(a=sqrt(5)), B = 0 (so the adapter starts as a no-op)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def base_weight(self):
        """The base weight as the functions take it: [out, in] (a transposed view for Conv1D), or the NF4Weight."""
        w = self.base.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} in its last dimension, got shape {tuple(x.shape)}"
            )
        if self.merged:
            return self.base(x)
        weight = self.base_weight()
        with compute_in_input_dtype(x, weight, (self.lora_A, self.lora_B, self.base.bias)):
            return lora_linear(x, weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, self.dropout,
                               self.training)

    # ---- merging ------------------------------------------------------------------------------

    def _delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self, requantize: bool = False):
        """Fold the adapter into the base weight: W <- W + scaling * B A (fp32 maths, one rounding).

        For an NF4 base this dequantizes, adds and requantizes; that is lossy (the result is not
        W + s B A exactly and `unmerge` cannot restore the original codes), so it only happens
        with `requantize=True`.
        """
        if self.merged:
            raise RuntimeError("the adapter is already merged; call unmerge() first")
        self._apply_delta(+1.0, requantize)
        self.merged = True

    def unmerge(self, requantize: bool = False):
        """Undo `merge`: W <- W - scaling * B A. Exact up to the rounding of the dense dtype for a
        dense base; for an NF4 base it requantizes again (`requantize=True` required)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        self._apply_delta(-1.0, requantize)
        self.merged = False

    def _apply_delta(self, sign: float, requantize: bool):
        if not self.is_nf4:
            with torch.no_grad():
                w = self.base_weight()  # [out, in]; for Conv1D a view that writes through to the [in, out] weight
                w.copy_((w.float() + sign * self._delta()).to(w.dtype))
            return
        if not requantize:
            raise ValueError(
                "the base weight is NF4: merging means dequantize, add scaling*B@A, and quantize again, "
                "which loses precision (the merged layer is not exactly base + adapter, and unmerge "
                "cannot restore the original 4-bit weight). Call merge(requantize=True) / "
                "unmerge(requantize=True) to do it anyway, or keep the adapter unmerged."
            )
        from deltakern import nf4

        q = self.base.weight
        dense = nf4.dequantize(q, torch.float32) + sign * self._delta().to(q.device)
        new = nf4.quantize(dense.to(q.dtype), blocksize=q.blocksize, double_quant=q.nested,
                           quant_storage=q.quant_storage)
        self.base.set_weight(new)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}, nf4={self.is_nf4}, "
                + ("fan_in_fan_out=True, " if self.fan_in_fan_out else "") + f"merged={self.merged}")
