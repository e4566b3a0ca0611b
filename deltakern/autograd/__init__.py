"""One torch.autograd.Function per fused computation; each docstring writes out the forward, every
gradient, and what is saved for backward."""

from deltakern.autograd.lora import LoRALinearFunction, lora_linear, lora_linear_ref

__all__ = ["LoRALinearFunction", "lora_linear", "lora_linear_ref"]
