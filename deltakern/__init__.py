"""deltakern: fused GPU kernels for parameter-efficient fine-tuning (delta-tuning).

`import deltakern` needs only torch: Triton and the CUDA extension are loaded when a CUDA op first
needs them, and a missing piece raises an error that says what to install.
"""

__version__ = "0.1.0"

from deltakern import nf4, nn  # noqa: E402  (nf4 registers the torch.ops.deltakern.nf4_* ops)
from deltakern.autograd import dora_linear, lora_linear  # noqa: E402  (registers the ops)
from deltakern.autograd.linear import linear  # noqa: E402
from deltakern.nf4 import NF4Weight  # noqa: E402
from deltakern.quantize import QuantizeSummary, quantize  # noqa: E402
from deltakern import methods  # noqa: E402
from deltakern.methods import (  # noqa: E402
    Adapter, BitFit, DoRA, Freeze, LoRA, PrefixTuning, PromptTuning, activate, active_delta, apply, delta_state_dict,
    deltas, disable, load_delta, load_peft_adapter, merge, remove, save_delta, save_peft_adapter, summary, unmerge,
)

__all__ = [
    "NF4Weight", "QuantizeSummary", "dora_linear", "linear", "lora_linear", "nf4", "nn", "quantize", "methods",
    "apply", "summary", "activate", "disable", "remove", "merge", "unmerge", "save_delta", "load_delta",
    "deltas", "active_delta", "delta_state_dict",
    "save_peft_adapter", "load_peft_adapter",
    "LoRA", "DoRA", "BitFit", "Freeze", "Adapter", "PrefixTuning", "PromptTuning", "__version__",
]
