"""Interop with the libraries a fine-tuning stack already uses. Each submodule imports its peer
library only when one of its functions runs, so importing them never needs the peer installed, and
the submodules themselves are imported on first attribute access (`deltakern.integrations.peft`
works after a plain `import deltakern`).

* `deltakern.integrations.bnb`:  bitsandbytes `Linear4bit` <-> `NF4Linear` (no requantization),
  `nf4_weight(param)` for a zero-copy NF4Weight view of a `Params4bit`.
* `deltakern.integrations.peft`: `patch(peft_model)` runs a PEFT LoRA / DoRA model (dense or
  bitsandbytes 4-bit base) on deltakern's fused functions with its state dict unchanged;
  `unpatch(peft_model)` restores PEFT's own forwards.
* `deltakern.integrations.transformers`: what `deltakern.apply` installs on a transformers model so that
  `save_pretrained` / `from_pretrained` / `Trainer` checkpoints keep the base under its original keys and
  the delta beside it, and `resume_from_checkpoint` restores the delta exactly.
"""

import importlib

__all__ = ["bnb", "peft"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
