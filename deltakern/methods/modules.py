"""Canonical module names, slots and wrappers, and target patterns, for the delta methods.

Methods name modules by their path in the *original* model, whatever wrappers deltakern has put
in between; `target` patterns match such a name exactly, as a dotted suffix or as a regular
expression (re.fullmatch)."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from deltakern import _patterns
from deltakern.nf4 import NF4Weight
from deltakern._patterns import match  # noqa: F401  (the one matching rule; base.match is this)


def _lora_types():
    from deltakern.nn.dora import DoRALinear
    from deltakern.nn.lora import LoRALinear

    return LoRALinear, DoRALinear




def wrapper_attr(module: nn.Module) -> Optional[str]:
    """Name of the child a deltakern wrapper wraps ("base" for LoRA/DoRA, "inner" for adapters)."""
    attr = getattr(type(module), "_deltakern_wraps", None)
    if attr:
        return attr
    if isinstance(module, _lora_types()):
        return "base"
    return None



def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any deltakern wrappers."""
    attr = wrapper_attr(module)
    while attr is not None:
        module = getattr(module, attr)
        attr = wrapper_attr(module)
    return module



def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(canonical name, original module) for every module of the original model, wrappers skipped.

    deltakern's own modules (adapter bottlenecks, prompt and prefix encoders) are not listed.
    """

    def walk(module, prefix):
        inner = unwrap(module)
        yield prefix, inner
        for name, child in inner._modules.items():
            if child is None or getattr(child, "_deltakern_internal", False):
                continue
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")



def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(canonical name, owning module, attribute, parameter) of every parameter of the original model."""
    for cname, module in named_modules(model):
        for pname, p in module._parameters.items():
            if p is not None:
                yield (f"{cname}.{pname}" if cname else pname), module, pname, p



def slot_chain(model: nn.Module, cname: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """[(parent, attribute, module), ...] from the outermost module at `cname` down through its wrappers."""
    if not cname:
        raise ValueError("the model itself cannot be a target; name one of its submodules")
    cur = model
    parent = attr = None
    for part in cname.split("."):
        cur = unwrap(cur)
        child = cur._modules.get(part)
        if child is None:
            raise KeyError(f"no module named {cname!r} in the model")
        parent, attr, cur = cur, part, child
    chain = [(parent, attr, cur)]
    a = wrapper_attr(cur)
    while a is not None:
        nxt = getattr(cur, a)
        chain.append((cur, a, nxt))
        cur, a = nxt, wrapper_attr(nxt)
    return chain



def get_module(model: nn.Module, cname: str) -> nn.Module:
    """The original (unwrapped) module at canonical name `cname`."""
    return slot_chain(model, cname)[-1][2]



def replace_in_slot(model: nn.Module, cname: str, old: nn.Module, new: nn.Module):
    """Put `new` where `old` sits in the chain of modules at `cname` (identity match)."""
    for parent, attr, module in slot_chain(model, cname):
        if module is old:
            setattr(parent, attr, new)
            return
    raise RuntimeError(f"{cname}: the model was changed outside deltakern (the expected module is no longer there)")



def is_dense_conv1d(module: nn.Module) -> bool:
    """A transformers Conv1D (GPT-2 style linear, weight stored [in_features, out_features]) with a dense
    weight (`deltakern.nn.lora.is_conv1d` answers for any Conv1D)."""
    from deltakern.nn.lora import dense_conv1d_weight

    return dense_conv1d_weight(module)



def is_linear(module: nn.Module) -> bool:
    """A dense nn.Linear, a transformers Conv1D, or a 4-bit layer whose .weight is an NF4Weight
    (deltakern.nn.NF4Linear)."""
    return (isinstance(module, nn.Linear) or isinstance(getattr(module, "weight", None), NF4Weight)
            or is_dense_conv1d(module))



def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer (a Conv1D stores its weight the other way round)."""
    shape = tuple(int(s) for s in module.weight.shape)
    return shape[::-1] if is_dense_conv1d(module) else shape



def base_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Compute dtype and device of a module: its weight's (an NF4Weight's dense dtype), else its first
    floating parameter or buffer."""
    w = getattr(module, "weight", None)
    if isinstance(w, NF4Weight):
        return w.dtype, w.device
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")



def follow(params: Iterable[nn.Parameter], dtype: Optional[torch.dtype], device: torch.device):
    """Move (and cast) parameters in place to the base's device/dtype (after `model.to(...)` moved
    the base while this delta was detached)."""
    for p in params:
        if p.device != device or (dtype is not None and p.is_floating_point() and p.dtype != dtype):
            p.data = p.data.to(device=device, dtype=dtype if (dtype is not None and p.is_floating_point()) else None)



def as_patterns(target, what: str) -> Optional[list[str]]:
    if target is None:
        return None
    if isinstance(target, str):
        target = [target]
    if isinstance(target, (list, tuple)) and all(isinstance(t, str) for t in target) and target:
        _patterns.check(target)
        return list(target)
    raise ValueError(f"{what}: target must be a module name, a list of names / suffixes / regexes, or None "
                     f"(the method's default), got {target!r}")



def no_match_error(method: str, patterns, available: list[str], what: str = "modules") -> ValueError:
    shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
    return ValueError(f"{method}: no module matches target {patterns!r}; available {what} ({len(available)}): "
                      f"{shown or '(none)'}")



def output_head_names(model: nn.Module) -> set[str]:
    """Canonical names of the model's output head: `get_output_embeddings()` when the model defines it,
    plus modules whose last name is one of lm_head, classifier, score, head, cls, qa_outputs."""
    names = set()
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001  (a model may not implement it)
            head = None
    for cname, module in named_modules(model):
        if head is not None and module is head:
            names.add(cname)
        if cname.rsplit(".", 1)[-1] in ("lm_head", "classifier", "score", "head", "cls", "qa_outputs"):
            names.add(cname)
    return names



def block_list(model: nn.Module) -> tuple[str, int]:
    """(canonical name, length) of the model's main stack of layers: the nn.ModuleList of >= 2 modules
    holding the most parameters (encoder.layer on BERT, model.layers on Llama)."""
    best, best_n, best_len = None, -1, 0
    for cname, module in named_modules(model):
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n, best_len = cname, n, len(module)
    if best is None:
        raise ValueError("the model has no nn.ModuleList of layers (found none with >= 2 modules)")
    return best, best_len
