"""Delta methods: one way to apply any delta-tuning method to any torch model.

    from deltakern.methods import apply, LoRA, BitFit, summary
    apply(model, LoRA(r=16, alpha=32, target=["q_proj", "v_proj"]))
    apply(model, BitFit())            # methods compose
    print(summary(model))

The delta-tuning taxonomy:
    reparameterization  LoRA, DoRA (QLoRA / QDoRA over NF4 layers)
    specification       BitFit, Freeze
    addition            Adapter, PrefixTuning, PromptTuning

Named deltas share one base: apply(..., name="taskA"), activate(model, "taskA"), disable(model)
(also a context manager), remove(model, name). merge(model) / unmerge(model) fold LoRA/DoRA into
dense weights. Deltas are artifacts: save_delta / load_delta (safetensors + JSON), and LoRA/DoRA
deltas read and write PEFT's adapter format: save_peft_adapter / load_peft_adapter. On a transformers
model, save_pretrained (and so Trainer) writes the base under its original keys with the delta beside it,
and resume_from_checkpoint restores the delta (deltakern.integrations.transformers).
"""

from deltakern.methods.base import (Method, Summary, activate, active_delta, apply, delta_state_dict, deltas,
                                    disable, merge, remove, summary, unmerge)
from deltakern.methods.reparam import DoRA, LoRA
from deltakern.methods.specification import BitFit, Freeze
from deltakern.methods.addition import Adapter, PrefixTuning, PromptTuning
from deltakern.methods.artifacts import load_delta, save_delta
from deltakern.methods.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "Method", "LoRA", "DoRA", "BitFit", "Freeze", "Adapter", "PrefixTuning", "PromptTuning",
    "apply", "activate", "disable", "remove", "merge", "unmerge", "summary", "Summary", "deltas", "active_delta",
    "delta_state_dict", "save_delta", "load_delta", "save_peft_adapter", "load_peft_adapter",
]
