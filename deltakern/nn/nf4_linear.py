"""NF4Linear: a linear layer with a frozen NF4 weight and an optional bias.

The weight's parts are non-persistent buffers (so `.to()`/`.cuda()` move them); the state dict
holds the weight in bitsandbytes' Linear4bit format (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so a
checkpoint loads in either library.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deltakern import nf4

_PARTS = ("packed", "absmax", "code", "nested_absmax", "nested_code")


class NF4Linear(nn.Module):
    def __init__(self, weight: nf4.NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.bias = bias
        self.set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_storage=torch.uint8):
        """Quantize an nn.Linear, or a transformers Conv1D (GPT-2 style, weight [in, out]: its
        transpose is quantized, so the NF4Linear computes the same x W + b)."""
        from deltakern.nn.lora import dense_conv1d_weight

        if isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        elif dense_conv1d_weight(linear):
            weight = linear.weight.detach().t()
        else:
            raise TypeError(f"from_linear needs an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        q = nf4.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_storage=quant_storage)
        bias = None if linear.bias is None else linear.bias.detach()
        module = cls(q, bias)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    def set_weight(self, weight: nf4.NF4Weight):
        """Replace the frozen weight (same shape), e.g. after merging a delta and requantizing."""
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if hasattr(self, "_meta") and tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this layer is "
                             f"{(self.out_features, self.in_features)}")
        for name in _PARTS:
            self.register_buffer(f"_{name}", getattr(weight, name), persistent=False)
        self._meta = {k: getattr(weight, k) for k in ("shape", "dtype", "blocksize", "quant_type", "offset", "nested_blocksize", "quant_storage")}

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the weight; `.to(dtype)`/`.half()` cast only the bias: the packed codes
        and fp32 scales are the format itself, and the compute dtype follows the input."""
        keep = {name: getattr(self, f"_{name}") for name in _PARTS}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, f"_{name}")
            if new is not None and new.dtype != old.dtype:
                self._buffers[f"_{name}"] = old.to(new.device)
        return self

    @property
    def weight(self) -> nf4.NF4Weight:
        """The NF4 weight, assembled from this module's (current-device) buffers."""
        return nf4.NF4Weight(**{name: getattr(self, f"_{name}") for name in _PARTS}, **self._meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, NF4Linear expects {self.in_features}")
        return torch.nn.functional.linear(x, nf4.dequantize(self.weight, x.dtype), self.bias)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{w.quant_type}, blocksize={w.blocksize}, nested={w.nested}, weight_dtype={_short(w.dtype)}, "
                "compute_dtype=x.dtype (the weight is dequantized to the input's dtype)")

    # ---- state dict in bitsandbytes' format ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        for key, value in self.weight.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if not own:
            missing_keys.append(prefix + "weight")
        else:
            try:
                weight = nf4.NF4Weight.from_bnb_state_dict(state_dict, prefix + "weight")
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"checkpoint weight has shape {tuple(weight.shape)}, module expects "
                                     f"{(self.out_features, self.in_features)}")
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
                return  # load nothing of this module, the bias included
            self.set_weight(weight.to(self._packed.device))
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
