"""Delta methods: one way to apply any delta-tuning method to any torch model.

    from deltakern.methods import apply, LoRA, BitFit, summary
    apply(model, LoRA(r=16, alpha=32, target=["q_proj", "v_proj"]))
    apply(model, BitFit())            # methods compose
    print(summary(model))

The delta-tuning taxonomy, and where each method lives:
    reparameterization  LoRA, DoRA (QLoRA / QDoRA over NF4 layers)   reparam.py
    specification       BitFit, Freeze                               specification.py
    addition            Adapter, PrefixTuning, PromptTuning          adapter.py, prefix.py, prompt.py

The machinery: base.py (what a method and an application are), modules.py (module names, slots,
target patterns), deltas.py (apply / activate / disable / remove), merge.py, summary.py,
artifacts.py (save_delta / load_delta), peft_format.py (PEFT's adapter format).

Named deltas share one base: apply(..., name="taskA"), activate(model, "taskA"), disable(model)
(also a context manager), remove(model, name). merge(model) / unmerge(model) fold LoRA/DoRA into
dense weights. Deltas are artifacts: save_delta / load_delta (safetensors + JSON), and LoRA/DoRA
deltas read and write PEFT's adapter format: save_peft_adapter / load_peft_adapter. On a transformers
model, save_pretrained (and so Trainer) writes the base under its original keys with the delta beside it,
and resume_from_checkpoint restores the delta (deltakern.integrations.transformers).
"""

from deltakern.methods.base import Method
from deltakern.methods.deltas import activate, active_delta, apply, deltas, disable, remove
from deltakern.methods.merge import merge, unmerge
from deltakern.methods.summary import Summary, delta_state_dict, summary
from deltakern.methods.reparam import DoRA, LoRA
from deltakern.methods.specification import BitFit, Freeze
from deltakern.methods.adapter import Adapter
from deltakern.methods.prefix import PrefixTuning
from deltakern.methods.prompt import PromptTuning
from deltakern.methods.artifacts import load_delta, save_delta
from deltakern.methods.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "Method", "LoRA", "DoRA", "BitFit", "Freeze", "Adapter", "PrefixTuning", "PromptTuning",
    "apply", "activate", "disable", "remove", "merge", "unmerge", "summary", "Summary", "deltas", "active_delta",
    "delta_state_dict", "save_delta", "load_delta", "save_peft_adapter", "load_peft_adapter",
]
