"""transformers interop: `save_pretrained`, `from_pretrained` and `Trainer` checkpoints of a model with deltas.

`deltakern.apply` (and `load_delta`) installs this on a transformers model (anything with a
`save_pretrained` method and a `config`) when its first delta is made, and takes it off when the last
delta goes. It changes nothing in `model.state_dict()`: its keys stay those of the live modules
(`q_proj.base.weight`, `q_proj.lora_A`, ...). It adds two things:

1. `model.save_pretrained(dir)` (what `Trainer` calls for every checkpoint) writes a *checkpoint*:

       config.json, model.safetensors   the base under its ORIGINAL keys (`q_proj.weight`): a plain
                                        checkpoint for a dense base; for NF4 layers bitsandbytes'
                                        Linear4bit keys, with a bitsandbytes `quantization_config`
                                        (load_in_4bit, nf4) in config.json, so transformers with
                                        bitsandbytes loads it 4-bit
                                        + the active delta's tensors as `deltakern.delta.<i>.<key>`
                                        (what `Trainer`'s resume reads back, see 2.)
       delta_config.json, delta.safetensors   the active delta in deltakern's format (every method):
                                        `deltakern.load_delta(model, dir)`
       peft_adapter/                    for a LoRA / DoRA delta (or a lone PromptTuning), the same delta
                                        in PEFT's adapter format:
                                        `PeftModel.from_pretrained(base, dir + "/peft_adapter")`

   `AutoModel*.from_pretrained(dir)` then builds the base (its load report lists the
   `deltakern.delta.*` keys as unused: they are the delta, which it does not know) and
   `deltakern.load_delta` adds the delta. The PEFT adapter sits in a subfolder because transformers
   loads an adapter found next to config.json into the model by itself.

2. `model.load_state_dict(sd)` also accepts such a checkpoint (a load pre-hook on the model): base
   keys are mapped back to the wrapped modules and `deltakern.delta.*` tensors go into the active
   delta, which must have the same methods and shapes. That is how `Trainer(resume_from_checkpoint=...)`
   restores the delta exactly. A checkpoint that holds the base but no delta leaves the delta as it is
   and warns. Base tensors that a BitFit / Freeze delta replaces while attached are not reloaded (the
   base never changes during training).

A merged delta (`merge(model)` without unload) is refused by `save_pretrained`: unmerge first, or
`merge(model, unload=True)` to write a merged plain model.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

DELTA_PREFIX = "deltakern.delta."
PEFT_SUBFOLDER = "peft_adapter"
_HOOK_ATTR = "_deltakern_transformers"

__all__ = ["DELTA_PREFIX", "PEFT_SUBFOLDER", "is_transformers_model", "install", "uninstall", "checkpoint_state_dict",
           "bnb_quantization_config"]


def is_transformers_model(model: nn.Module) -> bool:
    return callable(getattr(type(model), "save_pretrained", None)) and getattr(model, "config", None) is not None


def install(model: nn.Module) -> None:
    """Give `model` the checkpoint-aware save_pretrained and load_state_dict pre-hook (idempotent)."""
    if not is_transformers_model(model) or _HOOK_ATTR in model.__dict__:
        return
    handle = model.register_load_state_dict_pre_hook(_load_pre_hook)
    object.__setattr__(model, _HOOK_ATTR, handle)
    model.__dict__["save_pretrained"] = _SavePretrained(model)


def uninstall(model: nn.Module) -> None:
    handle = model.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        del model.__dict__["save_pretrained"]


class _SavePretrained:
    """`model.save_pretrained` while the model has deltas (a callable object rather than a bound method,
    so deepcopy / pickle of the model carry it over to the copy)."""

    def __init__(self, model):
        self.model = model

    def __deepcopy__(self, memo):
        import copy

        return _SavePretrained(copy.deepcopy(self.model, memo))

    def __call__(self, save_directory, *args, state_dict: Optional[dict] = None, **kwargs):
        return save_pretrained(self.model, save_directory, *args, state_dict=state_dict, **kwargs)


# ---------------------------------------------------------------------------------------------
# keys: the live modules' vs the original model's
# ---------------------------------------------------------------------------------------------

def canonical_key(model: nn.Module, key: str) -> Optional[str]:
    """The key of a state-dict entry in the original model: wrapper attributes ("base" of LoRA/DoRA,
    "inner" of adapters) dropped, e.g. "layers.0.q_proj.base.weight.absmax" -> "layers.0.q_proj.weight.absmax".
    None for entries of deltakern's own modules (adapter bottlenecks, prompts, prefixes)."""
    from deltakern.methods import base

    cur, out = model, []
    parts = key.split(".")
    for i, part in enumerate(parts):
        child = cur._modules.get(part) if isinstance(cur, nn.Module) else None
        if child is None:
            out.extend(parts[i:])
            break
        if getattr(child, "_deltakern_internal", False):
            return None
        if base.wrapper_attr(cur) != part:
            out.append(part)
        cur = child
    return ".".join(out)


def _delta_keys(model: nn.Module, apps) -> dict[str, str]:
    """Live state-dict key -> checkpoint key of every tensor of the active delta."""
    owner = {id(p): f"{DELTA_PREFIX}{i}.{k}" for i, app in enumerate(apps) for k, p in app.params.items()}
    return {n: owner[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in owner}


def _active_apps(model):
    from deltakern.methods import base

    st = base._state(model)
    if st is None or st.active is None:
        return None, []
    return st, st.deltas[st.active]


def _swapped_base(apps) -> dict[str, torch.Tensor]:
    """Original base tensors that BitFit / Freeze replace while attached (canonical key -> tensor)."""
    out = {}
    for app in apps:
        for key, (_cname, _attr, orig, _new) in getattr(app, "slots", {}).items():
            if orig is not None:
                out[key] = orig
    return out


def checkpoint_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The checkpoint form of `state_dict` (default: `model.state_dict()`): the base under its original keys,
    the active delta's tensors under `deltakern.delta.<i>.<key>`."""
    st, apps = _active_apps(model)
    src = model.state_dict() if state_dict is None else state_dict
    delta = _delta_keys(model, apps)
    out = {}
    for key, t in src.items():
        if key in delta:
            out[delta[key]] = t
            continue
        c = canonical_key(model, key)
        if c is not None:
            out[c] = t
    for key, t in _swapped_base(apps).items():
        out[key] = t.detach()
    return out


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Map a checkpoint written by `save_pretrained` (original keys + deltakern.delta.*) onto the live keys."""
    st, apps = _active_apps(module)
    if st is None:
        return
    live = module.state_dict(keep_vars=True)
    names = list(live)
    delta = _delta_keys(module, apps)
    swapped = set(_swapped_base(apps))
    has_delta = any(k.startswith(prefix + DELTA_PREFIX) for k in state_dict)
    sources = {}
    for k in names:
        src = delta[k] if k in delta else canonical_key(module, k)
        if src is not None and src != k:
            sources[k] = src
    base_form = any(prefix + src in state_dict and prefix + k not in state_dict
                    for k, src in sources.items() if k not in delta)
    if not has_delta and not base_form:
        return  # the live format: nothing to do
    if st.merged:
        raise RuntimeError("cannot load a checkpoint into a model whose delta is merged; call unmerge(model) first")
    new = {}
    for k in names:
        src = sources.get(k)
        if src is None:
            continue
        if k in delta and not has_delta:
            continue
        if prefix + src in state_dict:
            new[prefix + k] = state_dict[prefix + src]
    for k, src in sources.items():
        state_dict.pop(prefix + src, None)
    for key in swapped:  # the base value of a swapped parameter: the live key now holds the delta's copy
        if prefix + key not in new:
            state_dict.pop(prefix + key, None)
    state_dict.update(new)
    tied = {}  # save_pretrained drops tied copies (an lm_head tied to the embeddings): give them their twin
    for k, t in live.items():
        tied.setdefault(id(t), []).append(k)
    for keys in tied.values():
        have = next((state_dict[prefix + k] for k in keys if prefix + k in state_dict), None)
        for k in keys:
            if have is not None and prefix + k not in state_dict:
                state_dict[prefix + k] = have
    if not has_delta:
        warnings.warn(f"this state dict holds the base model without a deltakern delta: delta {st.active!r} keeps "
                      "its current values. To load a delta saved with save_pretrained, use deltakern.load_delta("
                      "model, checkpoint_dir) or load the whole checkpoint (model.safetensors).", stacklevel=3)
    extra = sorted(k for k in state_dict if k.startswith(prefix + DELTA_PREFIX))
    if extra:
        error_msgs.append(f"deltakern: the checkpoint's delta has tensor(s) {extra[:3]} that the active delta "
                          f"{st.active!r} does not have (its methods differ from the saved ones)")
        for k in extra:
            state_dict.pop(k)


# ---------------------------------------------------------------------------------------------
# save_pretrained
# ---------------------------------------------------------------------------------------------

def bnb_quantization_config(model: nn.Module) -> Optional[dict]:
    """A bitsandbytes 4-bit `quantization_config` (as a dict) describing the model's NF4 layers, or None
    when it has none. Dense linear layers are listed in llm_int8_skip_modules."""
    from deltakern.methods import base
    from deltakern.nf4 import NF4Weight

    nf4, dense = [], []
    for name, m in base.named_modules(model):
        w = getattr(m, "weight", None)
        if isinstance(w, NF4Weight):
            nf4.append((name, w))
        elif name and (isinstance(m, nn.Linear) or base.is_conv1d(m)):
            dense.append(name)
    if not nf4:
        return None
    kinds = {(w.quant_type, w.nested, w.dtype, w.quant_storage) for _, w in nf4}
    if len(kinds) > 1:
        raise ValueError(f"the model's 4-bit layers differ in quant type / double quantization / dtype / storage "
                         f"({sorted(map(str, kinds))}): one bitsandbytes quantization_config cannot describe them")
    qt, nested, dtype, storage = kinds.pop()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=bool(nested),
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage,
                              llm_int8_skip_modules=dense or None).to_dict()


def save_pretrained(model: nn.Module, save_directory, *args, state_dict: Optional[dict] = None, **kwargs):
    """transformers' save_pretrained for a model with deltas: see the module docstring for what is written."""
    from deltakern.methods import base
    from deltakern.methods.artifacts import save_delta
    from deltakern.methods.peft_format import peft_exportable, save_peft_adapter

    cls_save = type(model).save_pretrained
    st, apps = _active_apps(model)
    if st is not None and st.merged:
        raise RuntimeError(f"delta {st.active!r} is merged into the base weights: save_pretrained would write "
                           "base + delta as the base. Call deltakern.unmerge(model) first, or "
                           "deltakern.merge(model, unload=True) to make the merge permanent and save a plain model")
    sd = checkpoint_state_dict(model, state_dict)
    qcfg = bnb_quantization_config(model)
    cfg = model.config
    had, old = hasattr(cfg, "quantization_config"), getattr(cfg, "quantization_config", None)
    if qcfg is not None:
        cfg.quantization_config = qcfg
    # a model loaded 4-bit by transformers (then converted to NF4Linear) keeps its hf_quantizer, whose state dict
    # would replace ours: the NF4 layers describe themselves (qcfg), so it stays out of this save
    quantizer = model.__dict__.get("hf_quantizer")
    if quantizer is not None:
        model.__dict__["hf_quantizer"] = None
    try:
        with base.base_only(model) if apps else contextlib.nullcontext():
            result = cls_save(model, save_directory, *args, state_dict=sd, **kwargs)
    finally:
        if quantizer is not None:
            model.__dict__["hf_quantizer"] = quantizer
        if qcfg is not None:
            if had:
                cfg.quantization_config = old
            else:
                del cfg.quantization_config
    if not kwargs.get("is_main_process", args[0] if args else True):
        return result
    out = Path(save_directory)
    peft_dir = out / PEFT_SUBFOLDER
    stale = []  # files of a previous save into this directory that would no longer match what was written
    if apps:
        save_delta(model, out)
        if peft_exportable(apps):
            try:
                save_peft_adapter(model, peft_dir)
            except ValueError as exc:  # e.g. LoRA and DoRA mixed: PEFT has one flag per adapter
                warnings.warn(f"save_pretrained: the delta is saved in deltakern's format only ({exc})", stacklevel=2)
                stale = [peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"]
        else:
            stale = [peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"]
    else:  # no active delta: the base alone
        stale = [out / "delta_config.json", out / "delta.safetensors", peft_dir / "adapter_config.json",
                 peft_dir / "adapter_model.safetensors"]
    for f in stale:
        if f.is_file():
            os.unlink(f)
    return result
