"""Drop-in modules: they hold parameters and call deltakern's functions."""

from deltakern.nn.lora import LoRALinear
from deltakern.nn.nf4_linear import NF4Linear

__all__ = ["LoRALinear", "NF4Linear"]
