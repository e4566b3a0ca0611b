"""PEFT backend: run a PEFT LoRA / DoRA model on deltakern's fused functions, state dict unchanged.

`patch(peft_model)` gives every supported PEFT LoRA layer an instance-level forward that calls
`deltakern.autograd.lora.lora_linear` (LoRA) or `deltakern.autograd.dora.dora_linear` (DoRA) on the
layer's own tensors: `lora_A[name].weight`, `lora_B[name].weight`, `scaling[name]`,
`lora_magnitude_vector[name].weight`, the base layer's weight and bias. Nothing is copied or
re-registered, so parameters, optimizer state, `state_dict()` keys and checkpoints are PEFT's.
`unpatch(peft_model)` removes the instance forwards (PEFT's class forward is visible again).

Supported layers: `peft.tuners.lora.Linear` over an `nn.Linear` or, with `fan_in_fan_out=True`, over a
transformers `Conv1D` (GPT-2 style, weight [in, out]: passed as its zero-copy transposed view
`weight.t()`), and `peft.tuners.lora.bnb.Linear4bit`
over a bitsandbytes `Linear4bit` (NF4 or FP4, nested or not; its 4-bit weight is read through a
zero-copy `NF4Weight` view, built once per layer and rebuilt only if the weight is replaced or moved).
LoRA, rsLoRA and DoRA (with or without dropout), dropout `nn.Dropout` or `nn.Identity`.

Everything else keeps PEFT's own forward, and `patch` names those layers in one warning:
other layer types (Embedding, Conv, MultiheadAttention, 8-bit, parameter targets, other tuners),
several active adapters at once, `fan_in_fan_out` over anything but a Conv1D, `lora_bias`, LoRA variants other than DoRA,
a custom dropout module, a trainable base weight. The check is repeated on every call, so a patched
layer also defers to PEFT while its adapter is merged, while adapters are disabled, for calls with
`adapter_names=` (mixed-batch inference) or other extra arguments, and for inputs PEFT itself would
reject (dtype or device mismatches); a reason that first appears at call time warns once per layer.

Numerics. The maths is PEFT's (see the function docstrings) with one deliberate difference: the
whole layer runs in the base layer's compute dtype (the input's dtype for `nn.Linear`; bitsandbytes'
`compute_dtype` for 4-bit), with fp32 accumulation. When the adapter parameters are kept in fp32
over a bf16/fp16 base (PEFT's `autocast_adapter_dtype=True` default), PEFT computes the LoRA branch
in fp32; here the parameters are cast to the compute dtype inside the layer (their gradients still
arrive in fp32). DoRA's row norms are computed in fp32 and cached until A or B change (see
`deltakern.autograd.dora.DoRANormCache`); a write to A or B that bypasses autograd's version counter
(`param.data.copy_(...)`) is not noticed: call `clear_caches(model)` after one.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["PatchSummary", "clear_caches", "is_patched", "patch", "unpatch"]

_STATE = "_deltakern_patch"
_NAME_LIMIT = 20  # layer names listed per reason in the warning (the summary keeps all)


# ---- PEFT classes ---------------------------------------------------------------------------------


def _peft():
    try:
        import peft  # noqa: F401
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - exercised only without peft
        raise ImportError(f"deltakern.integrations.peft needs peft (pip install peft); importing it failed: {exc}") from exc
    return lora_layer


_CLASSES: list = []  # a plain memo, not functools.lru_cache: torch.compile traces through this


def _classes():
    """(supported {class: kind}, DoRA variant class, BaseTunerLayer), looked up once."""
    if not _CLASSES:
        _CLASSES.append(_lookup_classes())
    return _CLASSES[0]


def _lookup_classes():
    lora_layer = _peft()
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer

    supported = {lora_layer.Linear: "dense"}
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            supported[lora_bnb.Linear4bit] = "bnb4"
    except Exception:  # noqa: BLE001 - no (working) bitsandbytes: no 4-bit layers can exist either
        pass
    return supported, DoraLinearVariant, BaseTunerLayer


# ---- per-layer state ------------------------------------------------------------------------------


class _PatchState:
    """What a patched layer remembers: where its forward was installed, what was there before, and
    caches (the NF4 view of a 4-bit base, DoRA norm caches). Caches are never copied or pickled."""

    def __init__(self, name: str, kind: str, attr: str, prev, reported: Optional[str]):
        self.name, self.kind, self.attr, self.prev = name, kind, attr, prev
        self.warned = {reported} if reported else set()
        self.clear()

    def clear(self):
        self.nf4_key = None
        self.nf4 = None
        self.norm_caches = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(nf4_key=None, nf4=None, norm_caches={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def nf4_view(self, base):
        """The zero-copy NF4Weight of a bitsandbytes Linear4bit, rebuilt only when its tensors change."""
        from deltakern.integrations.bnb import nf4_weight

        param = base.weight
        qs = getattr(param, "quant_state", None)
        key = None
        if qs is not None and not getattr(qs, "packing_format_for_cpu", False):
            key = (param.data_ptr(), param.device, id(qs), qs.absmax.data_ptr(), qs.absmax.device)
        if key is None or key != self.nf4_key:
            self.nf4 = nf4_weight(param, base)  # (restores bitsandbytes' CPU-only packing if needed)
            param, qs = base.weight, base.weight.quant_state
            self.nf4_key = (param.data_ptr(), param.device, id(qs), qs.absmax.data_ptr(), qs.absmax.device)
        return self.nf4

    def norm_cache(self, adapter: str):
        from deltakern.autograd.dora import DoRANormCache

        cache = self.norm_caches.get(adapter)
        if cache is None:
            cache = self.norm_caches[adapter] = DoRANormCache()
        return cache


# ---- what is supported ----------------------------------------------------------------------------


def _layer_reason(module: nn.Module, kind: str) -> Optional[str]:
    """Why this (supported-class) layer cannot run on deltakern in its current configuration, or None.
    Covers what does not depend on the call's arguments."""
    _, DoraLinearVariant, _ = _classes()
    fan = bool(getattr(module, "fan_in_fan_out", False))
    if fan and kind != "dense":
        return "fan_in_fan_out=True"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        return f"{len(active)} active adapters"
    if not active:
        return None  # PEFT runs the base layer alone: deferred to PEFT at call time, nothing to report
    a = active[0]
    if module.lora_bias.get(a, False):
        return "lora_bias=True"
    variant = module.lora_variant.get(a)
    if variant is not None and type(variant) is not DoraLinearVariant:
        return f"LoRA variant {type(variant).__name__}"
    if type(module.lora_dropout[a]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(module.lora_dropout[a]).__name__}"
    lora_A, lora_B = module.lora_A[a], module.lora_B[a]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None or lora_B.bias is not None:
        return "lora_A/lora_B are not bias-free nn.Linear"
    if variant is not None:
        dora = module.lora_magnitude_vector[a] if a in module.lora_magnitude_vector else None
        if (dora is None or bool(getattr(dora, "fan_in_fan_out", False)) != fan
                or not isinstance(getattr(dora, "weight", None), torch.Tensor)):
            return "DoRA magnitude layer missing or transposed"
    base = module.get_base_layer()
    from deltakern.integrations.bnb import is_linear4bit

    if kind == "bnb4":
        if not is_linear4bit(base):
            return f"4-bit LoRA layer over a {type(base).__name__}"
        if getattr(base.weight, "quant_state", None) is None:
            return "4-bit base weight not quantized yet"
    elif fan:  # PEFT sets fan_in_fan_out for (only) transformers' Conv1D
        from deltakern.nn.lora import dense_conv1d_weight

        if not dense_conv1d_weight(base) or type(base.weight) is not nn.Parameter:
            return f"fan_in_fan_out=True over a {type(base).__name__} (only a plain transformers Conv1D is supported)"
        if base.weight.requires_grad:
            return "base weight is trainable"
    else:
        if not isinstance(base, nn.Linear) or is_linear4bit(base) or type(base.weight) is not nn.Parameter:
            return f"base layer {type(base).__name__} is not a plain nn.Linear"
        if base.weight.requires_grad:
            return "base weight is trainable"
    return None


def _call_reason(module: nn.Module, kind: str, x, args, kwargs) -> Optional[str]:
    """Why this particular call goes to PEFT. '' means 'silently' (a PEFT state, not a limitation)."""
    if args or any(v is not None for v in kwargs.values()):
        return "adapter_names (mixed-batch) call" if kwargs.get("adapter_names") is not None else "extra forward arguments"
    if module.disable_adapters or module.merged:
        return ""
    if not any(a in module.lora_A for a in module.active_adapters):
        return ""
    reason = _layer_reason(module, kind)
    if reason is not None:
        return reason
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() == 0:
        return ""
    base = module.get_base_layer()
    w = base.weight
    if x.device != w.device:
        return ""
    if kind == "dense" and x.dtype != w.dtype and not _autocast(x):
        return ""  # PEFT / F.linear decides what happens (usually an error)
    return None


def _autocast(x: torch.Tensor) -> bool:
    dev = x.device.type
    return dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)


# ---- the forward ----------------------------------------------------------------------------------


def _call_original(module, state, x, args, kwargs):
    if state.prev is not None:
        return state.prev(x, *args, **kwargs)
    return type(module).forward(module, x, *args, **kwargs)


def _patched_forward(module, x, *args, **kwargs):
    state: _PatchState = module.__dict__[_STATE]
    reason = _call_reason(module, state.kind, x, args, kwargs)
    if reason is not None:
        if reason and reason not in state.warned:
            state.warned.add(reason)
            warnings.warn(f"deltakern: {state.name} runs PEFT's own forward ({reason})", stacklevel=2)
        return _call_original(module, state, x, args, kwargs)
    return _deltakern_forward(module, state, x)


def _deltakern_forward(module, state: _PatchState, x: torch.Tensor) -> torch.Tensor:
    from deltakern.autograd._common import adapter_autocast
    from deltakern.autograd.dora import dora_linear
    from deltakern.autograd.lora import lora_linear

    a = next(a for a in module.active_adapters if a in module.lora_A)
    A, B = module.lora_A[a].weight, module.lora_B[a].weight
    scaling = float(module.scaling[a])
    drop = module.lora_dropout[a]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    is_dora = a in module.lora_variant
    m = module.lora_magnitude_vector[a].weight if is_dora else None
    base = module.get_base_layer()
    bias = base.bias
    in_dtype = x.dtype

    if state.kind == "bnb4":
        weight = state.nf4_view(base)
        if not base.compute_type_is_set:  # as bitsandbytes' first forward does
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute = base.compute_dtype if base.compute_dtype is not None else x.dtype
        x = x.to(compute)
    else:
        weight = base.weight.t() if module.fan_in_fan_out else base.weight  # Conv1D: [in, out] -> view [out, in]
        compute = x.dtype

    def run(A_, B_, m_, bias_, cache):
        if is_dora:
            return dora_linear(x, weight, bias_, A_, B_, m_, scaling, dropout_p=p, training=True, norm_cache=cache)
        return lora_linear(x, weight, bias_, A_, B_, scaling, dropout_p=p, training=True)

    cache = state.norm_cache(a) if is_dora else None
    if _autocast(x):  # the functions cast every floating input to the autocast dtype themselves
        y = run(A, B, m, bias, cache)
        return y.to(torch.promote_types(in_dtype, y.dtype)) if state.kind == "bnb4" else y

    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    params = [t for t in (A, B, m) if t is not None]
    if all(t.dtype == compute for t in params) or (compute in (torch.float16, torch.bfloat16)
                                                   and x.device.type in ("cuda", "cpu")):
        with adapter_autocast(compute, x.device.type, params):  # fp32 adapters over a half-precision base
            y = run(A, B, m, bias, cache)
    else:
        y = run(A.to(compute), B.to(compute), None if m is None else m.to(compute), bias, None)
    return y.to(in_dtype) if state.kind == "bnb4" else y


# ---- public API -----------------------------------------------------------------------------------


@dataclass
class PatchSummary:
    """`patched`: layers whose forward now runs on deltakern (while supported); `fallback`: layer ->
    reason, for layers that run PEFT's own forward."""

    patched: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.patched)

    def __str__(self) -> str:
        text = f"deltakern patched {len(self.patched)} PEFT layers"
        if self.fallback:
            text += f"; {len(self.fallback)} keep PEFT's forward: " + _describe(self.fallback)
        return text


def _describe(fallback: dict[str, str], limit: Optional[int] = None) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallback.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = names if limit is None else names[:limit]
        more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
        parts.append(f"{reason}: {', '.join(shown)}{more}")
    return "; ".join(parts)


def _class_name(module) -> str:
    path = type(module).__module__.removeprefix("peft.tuners.").replace(".layer", "")
    return f"{path}.{type(module).__name__}"


def is_patched(module: nn.Module) -> bool:
    return _STATE in module.__dict__


def patch(model: nn.Module, warn: bool = True) -> PatchSummary:
    """Run the supported LoRA / DoRA layers of a PEFT model on deltakern's fused functions, in place.

    Returns a PatchSummary; layers left on PEFT's own forward are listed there and, unless
    `warn=False`, in one warning. Calling it again is harmless (already patched layers are kept).
    A model whose layers were wrapped by accelerate hooks is patched beneath the hook.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    supported, _, BaseTunerLayer = _classes()
    summary = PatchSummary()
    found = False
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        found = True
        kind = supported.get(type(module))
        if kind is None:
            summary.fallback[name] = f"{_class_name(module)} layers are not supported"
            continue
        reason = _layer_reason(module, kind)
        if reason is None and module.merged:
            reason = "adapter merged into the base weight (PEFT's forward runs while merged)"
        if reason is not None:
            summary.fallback[name] = reason
        if not is_patched(module):
            # accelerate's hooks replace `forward` and call `_old_forward`: patch underneath them
            attr = "_old_forward" if ("forward" in module.__dict__ and hasattr(module, "_old_forward")) else "forward"
            prev = module.__dict__.get(attr)
            module.__dict__[_STATE] = _PatchState(name, kind, attr, prev, reason)
            module.__dict__[attr] = functools.partial(_patched_forward, module)
        summary.patched.append(name)
    if not found:
        raise ValueError("no PEFT tuner layers found in this model (pass the model returned by peft.get_peft_model)")
    if warn and summary.fallback:
        warnings.warn(f"deltakern.integrations.peft.patch: {len(summary.fallback)} layers run PEFT's own forward: "
                      + _describe(summary.fallback, _NAME_LIMIT), stacklevel=2)
    return summary


def unpatch(model: nn.Module) -> int:
    """Restore PEFT's forward on every layer `patch` changed; returns how many were restored."""
    restored = 0
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.prev is None:
            module.__dict__.pop(state.attr, None)
        else:
            module.__dict__[state.attr] = state.prev
        restored += 1
    return restored


def clear_caches(model: nn.Module) -> None:
    """Forget the cached NF4 views and DoRA norms of every patched layer (they are rebuilt on use)."""
    for module in model.modules():
        state = module.__dict__.get(_STATE)
        if state is not None:
            state.clear()
