"""The addition methods: new modules and tensors next to the frozen model (the delta-tuning taxonomy's
"addition" family). Each lives in its own file: adapter.py (Adapter), prefix.py (PrefixTuning),
prompt.py (PromptTuning); this module gathers them."""

from deltakern.methods.adapter import Adapter, AdapterLayer, Bottleneck  # noqa: F401
from deltakern.methods.prefix import PrefixEncoder, PrefixTuning  # noqa: F401
from deltakern.methods.prompt import PromptTuning, SoftPrompt  # noqa: F401

__all__ = ["Adapter", "PrefixTuning", "PromptTuning"]
