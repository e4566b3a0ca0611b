"""One torch.autograd.Function per fused computation; each docstring writes out the forward, every
gradient, and what is saved for backward."""

from deltakern.autograd.dora import DoRALinearFunction, DoRANormCache, dora_linear, dora_linear_ref, dora_weight_norm
from deltakern.autograd.linear import FrozenLinearFunction, linear_ref  # `linear` stays the submodule's name
from deltakern.autograd.lora import LoRALinearFunction, lora_linear, lora_linear_ref

__all__ = [
    "DoRALinearFunction", "DoRANormCache", "FrozenLinearFunction", "LoRALinearFunction", "dora_linear",
    "dora_linear_ref", "dora_weight_norm", "linear_ref", "lora_linear", "lora_linear_ref",
]
