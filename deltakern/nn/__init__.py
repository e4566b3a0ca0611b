"""Drop-in modules: they hold parameters and call deltakern's functions."""

from deltakern.nn.nf4_linear import NF4Linear

__all__ = ["NF4Linear"]

try:  # the LoRA module lands with the fused LoRA kernels
    from deltakern.nn.lora import LoRALinear  # noqa: F401

    __all__.append("LoRALinear")
except ImportError:  # pragma: no cover
    pass
