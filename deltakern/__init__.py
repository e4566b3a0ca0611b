"""deltakern: fused GPU kernels for parameter-efficient fine-tuning (delta-tuning).

`import deltakern` needs only torch: Triton and the CUDA extension are loaded when a CUDA op first
needs them, and a missing piece raises an error that says what to install.
"""

__version__ = "0.1.0"

from deltakern import backends, nf4, nn  # noqa: E402  (nf4 registers the torch.ops.deltakern.nf4_* ops)
from deltakern.autograd import dora_linear, lora_linear  # noqa: E402  (registers the ops)
from deltakern.autograd.linear import linear  # noqa: E402
from deltakern.nf4 import NF4Weight  # noqa: E402
from deltakern.quantization import QuantizeSummary, quantize  # noqa: E402  (module renamed: the function kept the name)
from deltakern import methods  # noqa: E402
from deltakern.methods import (  # noqa: E402
    Adapter, BitFit, DoRA, Freeze, LoRA, PrefixTuning, PromptTuning, activate, active_delta, apply, delta_state_dict,
    deltas, disable, load_delta, load_peft_adapter, merge, remove, save_delta, save_peft_adapter, summary, unmerge,
)



def __getattr__(name):
    """`deltakern.integrations` (and through it .peft / .bnb) is imported on first access, so PEFT and
    bitsandbytes stay optional and `import deltakern` stays light."""
    if name == "integrations":
        import importlib

        return importlib.import_module("deltakern.integrations")
    raise AttributeError(f"module 'deltakern' has no attribute {name!r}")


__all__ = [
    "NF4Weight", "QuantizeSummary", "backends", "integrations", "dora_linear", "linear", "lora_linear", "nf4", "nn", "quantize", "methods",
    "apply", "summary", "activate", "disable", "remove", "merge", "unmerge", "save_delta", "load_delta",
    "deltas", "active_delta", "delta_state_dict",
    "save_peft_adapter", "load_peft_adapter",
    "LoRA", "DoRA", "BitFit", "Freeze", "Adapter", "PrefixTuning", "PromptTuning", "__version__",
]
