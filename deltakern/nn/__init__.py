"""Drop-in modules: they hold parameters and call deltakern's functions."""

from deltakern.nn.dora import DoRALinear
from deltakern.nn.lora import LoRALinear
from deltakern.nn.nf4_linear import NF4Linear

__all__ = ["DoRALinear", "LoRALinear", "NF4Linear"]
