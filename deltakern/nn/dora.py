"""DoRALinear: weight-decomposed low-rank adaptation of a frozen linear (dense nn.Linear, transformers'
Conv1D, or NF4Linear).

    y = (m / ||W + s B A||_row) * (x W^T + s (dropout(x) A^T) B^T) + b,   s = alpha / r (alpha / sqrt(r) rsLoRA)

Parameters, names and initialisation follow PEFT 0.21's DoRA, so a PEFT adapter's tensors load
directly: `lora_A` [r, in] (kaiming_uniform_(a=sqrt(5))), `lora_B` [out, r] (zeros) and
`lora_magnitude_vector` [out] = ||W + s B A||_row at init (= ||W||_row since B = 0). Dropout follows
PEFT's DoRA form (see deltakern.autograd.dora). The row norm is a constant in backward unless
`exact_norm_grad=True`; ||W||^2 and the row norms are cached on the module and recomputed only when
A or B change (once per optimizer step). A base weight with an all-zero row cannot be decomposed
(its norm is 0, so m / ||.|| is undefined; PEFT has no eps and would produce NaN): construction
raises ValueError naming the rows. The forward is one call to `deltakern.autograd.dora.dora_linear`.

A transformers `Conv1D` base (GPT-2 style, weight [in, out]) is used as PEFT does with
`fan_in_fan_out=True`: W is the zero-copy view `weight.t()` [out, in], so the row norm ||W + s B A||
runs over the input dim and the magnitude has one entry per output feature; merging writes through
that view into the [in, out] weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from deltakern.autograd.dora import dora_linear
from deltakern.autograd.dora_norm import DoRANormCache, FrozenWeight, dora_weight_norm
from deltakern.nf4 import NF4Weight
from deltakern.nn.lora import check_adapter_args, check_rank, compute_in_input_dtype, dense_conv1d_weight


class DoRALinear(nn.Module):
    """DoRA over `base`: r=8, alpha=16 by default (as `deltakern.DoRA`); r above min(in, out) warns."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                 exact_norm_grad: bool = False):
        super().__init__()
        check_adapter_args(r, alpha, dropout)
        weight = getattr(base, "weight", None)
        self.fan_in_fan_out = False  # True for a Conv1D base (PEFT's name for the [in, out] layout)
        if isinstance(base, nn.Linear) and isinstance(weight, torch.Tensor):
            self.is_nf4 = False
            weight.requires_grad_(False)
        elif dense_conv1d_weight(base):
            self.is_nf4, self.fan_in_fan_out = False, True
            weight.requires_grad_(False)
            weight = weight.t()  # [out, in]
        elif isinstance(base, nn.Module) and isinstance(weight, NF4Weight):
            self.is_nf4 = True
            if len(weight.shape) != 2:
                raise ValueError(f"base's NF4 weight must be 2-D, got shape {tuple(weight.shape)}")
        else:
            raise TypeError("base must be an nn.Linear, a transformers Conv1D, or a module whose .weight is an "
                            f"NF4Weight (e.g. deltakern.nn.NF4Linear), got {type(base).__name__}")
        out_features, in_features = weight.shape
        check_rank(r, int(out_features), int(in_features))
        dtype, device = weight.dtype, weight.device
        bias = getattr(base, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.requires_grad_(False)  # PEFT's bias="none"

        self.base = base
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), bool(use_rslora)
        self.exact_norm_grad = bool(exact_norm_grad)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        self._norm_cache = DoRANormCache()
        self._merge_norm: Optional[torch.Tensor] = None
        self.merged = False
        self.reset_parameters()

    # ---- parameters -----------------------------------------------------------------------------

    def base_weight(self):
        """The base weight as the functions take it: [out, in] (a transposed view for Conv1D), or the NF4Weight."""
        w = self.base.weight
        return w.t() if self.fan_in_fan_out else w

    def _weight_parts(self, dtype=None) -> FrozenWeight:
        w = self.base_weight()
        if self.is_nf4:
            return FrozenWeight(w.packed_bytes(), w.absmax_fp32(), w.code, self.out_features, self.in_features, int(w.blocksize))
        return FrozenWeight(w.detach() if dtype is None else w.detach().to(dtype), None, None, self.out_features,
                  self.in_features, 0)

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_row in fp32 [out] (raises ValueError naming any row where it is zero)."""
        return dora_weight_norm(self._weight_parts(), self.lora_A, self.lora_B, self.scaling)[0]

    def reset_parameters(self):
        """PEFT's init: A ~ kaiming_uniform_(a=sqrt(5)), B = 0, magnitude = ||W + s B A||_row = ||W||_row."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            self.lora_magnitude_vector.copy_(self.weight_norm())
        self._norm_cache.clear()

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features={self.in_features} in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        if self.merged:
            return self.base(x)
        weight, params = self.base_weight(), (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.base.bias)
        with compute_in_input_dtype(x, weight, params):  # fp32 adapters over a half-precision input (nn.lora)
            return dora_linear(x, weight, self.base.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.scaling, self.dropout, self.training,
                               self.exact_norm_grad, self._norm_cache)

    # ---- merging (dense bases, as PEFT) ---------------------------------------------------------

    def merge(self):
        """W <- (m / ||W + s B A||_row) * (W + s B A) (fp32 maths, one rounding); the norm used is kept
        so `unmerge` can invert it (PEFT caches it the same way). Dense bases only."""
        if self.merged:
            raise RuntimeError("the adapter is already merged; call unmerge() first")
        self._require_dense("merge")
        with torch.no_grad():
            w = self.base_weight()  # [out, in]; for Conv1D a view that writes through to the [in, out] weight
            norm = self.weight_norm()
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
            factor = (self.lora_magnitude_vector.float() / norm)[:, None]
            w.copy_((factor * (w.float() + delta)).to(w.dtype))
        self._merge_norm = norm
        self._norm_cache.clear()
        self.merged = True

    def unmerge(self):
        """W <- W / (m / n) - s B A with the norm n saved by `merge` (exact up to the dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        with torch.no_grad():
            w = self.base_weight()
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
            factor = (self.lora_magnitude_vector.float() / self._merge_norm)[:, None]
            w.copy_((w.float() / factor - delta).to(w.dtype))
        self._merge_norm = None
        self._norm_cache.clear()
        self.merged = False

    def _require_dense(self, what):
        if self.is_nf4:
            raise ValueError(
                f"cannot {what} a DoRA adapter into an NF4 base: the merged weight m/||W+sBA|| * (W + sBA) "
                "would have to be requantized, which loses precision and cannot be undone. Keep the adapter "
                "unmerged, or dequantize the base to a dense nn.Linear first."
            )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, rslora={self.use_rslora}, "
                f"exact_norm_grad={self.exact_norm_grad}, nf4={self.is_nf4}, "
                + ("fan_in_fan_out=True, " if self.fan_in_fan_out else "") + f"merged={self.merged}")
