"""Reparameterization methods: LoRA and DoRA (QLoRA / QDoRA when the target layer is NF4).

Each target linear (nn.Linear, transformers' Conv1D as in GPT-2, or deltakern.nn.NF4Linear) is wrapped
in place by deltakern.nn.LoRALinear / DoRALinear, which keep the base frozen and own lora_A [r, in],
lora_B [out, r] (and DoRA's lora_magnitude_vector [out]), initialised as PEFT does (B = 0, so the
model is unchanged at init). A Conv1D (weight stored [in, out]) is handled as PEFT's
fan_in_fan_out=True: same parameter shapes, the base weight used through its transposed view.

Default targets: every linear layer (Conv1D included) except the output head (see base.output_head_names);
`target="all-linear"` (PEFT's name) means the same.

Adapter dtype: over a bf16 / fp16 base the adapter parameters are kept in fp32 (PEFT's
`autocast_adapter_dtype=True` default); the layer still computes in the input's dtype (the parameters
are cast inside, gradients arrive in fp32). `autocast_adapter_dtype=False` keeps them in the base's dtype.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from deltakern.methods import base
from deltakern.methods.base import Application, Method, Plan, register


def _check_number(cls, name, value, positive=True, integer=False, upper=None):
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and upper is not None:
        ok = 0 <= value < upper
    if not ok:
        kind = ("positive " if positive else "") + ("int" if integer else "number")
        raise ValueError(f"{cls}: {name} must be a {kind}{f' in [0, {upper:g})' if upper is not None else ''}, "
                         f"got {value!r}")


def _dense(module: nn.Module) -> bool:
    """A layer deltakern.quantize converts to NF4: nn.Linear or a transformers Conv1D."""
    return isinstance(module, nn.Linear) or base.is_dense_conv1d(module)


@dataclass
class _LowRankMethod(Method):
    """The fields LoRA and DoRA share (documented on LoRA)."""

    r: int = 8
    alpha: float = 16
    target: Optional[Union[str, list]] = None
    dropout: float = 0.0
    use_rslora: bool = False
    quantize: bool = False
    autocast_adapter_dtype: bool = True
    kind: ClassVar[str] = "reparameterization"
    _module_type: ClassVar[str] = ""

    def __post_init__(self):
        name = type(self).__name__
        _check_number(name, "r", self.r, integer=True)
        _check_number(name, "alpha", self.alpha)
        _check_number(name, "dropout", self.dropout, positive=False, upper=1.0)
        self.target = base.as_patterns(self.target, name)
        for flag in ("use_rslora", "quantize", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}: {flag} must be True or False, got {getattr(self, flag)!r}")

    def describe(self) -> str:
        extra = ", rslora" if self.use_rslora else ""
        return f"{type(self).__name__}(r={self.r}, alpha={self.alpha:g}{extra})"

    def plan(self, model: nn.Module, delta) -> Plan:
        name = type(self).__name__
        linears = [(n, m) for n, m in base.named_modules(model) if n and base.is_linear(m)]
        if self.target is None or self.target == ["all-linear"]:
            heads = base.output_head_names(model)
            chosen = [(n, m) for n, m in linears if n not in heads]
            if not chosen:
                raise base.no_match_error(name, "all linear layers except the output head", [n for n, _ in linears],
                                          "linear layers")
        else:
            chosen = [(n, m) for n, m in linears if base.match(n, self.target)]
            if not chosen:
                others = [n for n, m in base.named_modules(model) if n and base.match(n, self.target)]
                if others:
                    kinds = sorted({type(base.get_module(model, n)).__name__ for n in others})
                    raise ValueError(f"{name}: target {self.target!r} matches only non-linear modules "
                                     f"({', '.join(kinds)}: {', '.join(others[:5])}); LoRA/DoRA wrap nn.Linear, "
                                     f"Conv1D or NF4Linear layers")
                raise base.no_match_error(name, self.target, [n for n, _ in linears], "linear layers")
        plan = Plan()
        too_wide = []
        for n, m in chosen:
            chain = base.slot_chain(model, n)
            if any(isinstance(mod, base._lora_types()) for _, _, mod in chain):
                raise ValueError(f"{name}: {n} already has a LoRA/DoRA adapter in this delta")
            out_f, in_f = base.linear_shape(m)
            if self.r > min(out_f, in_f):
                too_wide.append(f"{n} ({in_f}->{out_f})")
            plan.targets[n] = {"type": type(m).__name__, "shape": [out_f, in_f]}
            plan.tensors[f"{n}.lora_A"] = (self.r, in_f)
            plan.tensors[f"{n}.lora_B"] = (out_f, self.r)
            if self._module_type == "dora":
                plan.tensors[f"{n}.lora_magnitude_vector"] = (out_f,)
        if too_wide:
            shown = ", ".join(too_wide[:4]) + (", ..." if len(too_wide) > 4 else "")
            warnings.warn(f"{name}: r={self.r} exceeds min(in_features, out_features) of {len(too_wide)} target(s): "
                          f"{shown}; the update B A cannot have a rank above that, the extra rank only costs "
                          "parameters", UserWarning, stacklevel=4)
        if self.quantize and any(_dense(base.get_module(model, n)) for n in plan.targets):
            st = base._state(model)
            held = [d for d, apps in (st.deltas.items() if st else []) if apps]
            if held:
                raise ValueError(f"{name}(quantize=True) would quantize base layers that deltas {held} already use; "
                                 f"quantize first: apply {name}(quantize=True) before any other method, or call "
                                 f"deltakern.quantize(model) before adding deltas")
        return plan

    def _quantize(self, model, plan):
        """Quantize the dense targets to NF4 with deltakern.quantize (a base change, kept by remove())."""
        from deltakern.quantization import quantize

        dense = [n for n in plan.targets if _dense(base.get_module(model, n))]
        if not dense:
            return None
        keep = {n for n, m in base.named_modules(model) if _dense(m)} - set(dense)
        return quantize(model, skip=["^" + re.escape(n) + "$" for n in sorted(keep)], progress=False)

    def build(self, model: nn.Module, plan: Plan) -> Application:
        from deltakern.nn.dora import DoRALinear
        from deltakern.nn.lora import LoRALinear

        qsummary = self._quantize(model, plan) if self.quantize else None
        cls = DoRALinear if self._module_type == "dora" else LoRALinear
        wrappers = {}
        for n in plan.targets:
            linear = base.get_module(model, n)
            with warnings.catch_warnings():  # plan() warned once for all layers with r > min(in, out)
                warnings.filterwarnings("ignore", message=r"r=\d+ exceeds min", category=UserWarning)
                w = cls(linear, self.r, self.alpha, dropout=self.dropout, use_rslora=self.use_rslora)
            w.train(linear.training)
            base.follow(w.parameters(recurse=False), adapter_dtype(self, linear), w.lora_A.device)
            wrappers[n] = w
        params = {}
        for n, w in wrappers.items():
            params[f"{n}.lora_A"] = w.lora_A
            params[f"{n}.lora_B"] = w.lora_B
            if self._module_type == "dora":
                params[f"{n}.lora_magnitude_vector"] = w.lora_magnitude_vector
        app = _LowRankApplication(self, plan, params, wrappers)
        app.quantize_summary = qsummary
        return app


def adapter_dtype(method, linear) -> torch.dtype:
    """The dtype of a LoRA / DoRA layer's parameters: fp32 over a bf16 / fp16 base when
    method.autocast_adapter_dtype (PEFT's default), else the base's dtype."""
    dtype, _ = base.base_dtype_device(linear)
    if getattr(method, "autocast_adapter_dtype", True) and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _is_dtensor(t) -> bool:
    from deltakern.nn.nf4_linear import is_dtensor

    return is_dtensor(t)


class _LowRankApplication(Application):
    mergeable = True

    def __init__(self, method, plan, params, wrappers):
        super().__init__(method, plan, params)
        self.wrappers = wrappers

    def wrapped_linears(self):
        return set(self.wrappers)

    def attach(self, model):
        done = []
        try:
            for n, w in self.wrappers.items():
                chain = base.slot_chain(model, n)
                parent, attr, linear = chain[-1]
                if linear is not w.base:
                    raise RuntimeError(f"{n}: the base layer was replaced outside deltakern since this delta was made")
                _, device = base.base_dtype_device(linear)
                base.follow([p for p in w.parameters(recurse=False)], adapter_dtype(self.method, linear), device)
                w.train(linear.training)
                setattr(parent, attr, w)
                done.append((n, w))
        except Exception:
            for n, w in reversed(done):
                base.replace_in_slot(model, n, w, w.base)
            raise

    def detach(self, model, keep_merged=False):
        for n, w in reversed(list(self.wrappers.items())):
            if w.merged and not keep_merged:
                w.unmerge()
            base.replace_in_slot(model, n, w, w.base)

    def merge(self, model):
        done = []
        try:
            for n, w in self.wrappers.items():
                if getattr(w, "is_nf4", False):
                    raise ValueError(f"cannot merge into {n}: its base weight is NF4 (merging would requantize, which "
                                     f"is lossy and cannot be undone); keep the delta unmerged, or load the delta onto a "
                                     f"dense base and merge there")
                if any(_is_dtensor(t) for t in w.parameters()) or any(_is_dtensor(t) for t in w.base.parameters()):
                    raise ValueError(f"cannot merge into {n}: the layer is sharded (FSDP), each rank holds only part of "
                                     f"it; merge before sharding, or load deltakern.distributed.full_state_dict(model) "
                                     f"into an unsharded model and merge there")
                w.merge()
                done.append(w)
        except Exception:
            for w in reversed(done):
                w.unmerge()
            raise

    def unmerge(self, model):
        for w in reversed(list(self.wrappers.values())):
            if w.merged:
                w.unmerge()


@register
@dataclass
class LoRA(_LowRankMethod):
    """Low-rank adaptation: y = base(x) + (alpha / r) * B A dropout(x) on each target linear.

    r, alpha:   rank and scale (alpha / sqrt(r) with use_rslora=True)
    target:     module names / dotted suffixes / regexes; None = all linear layers except the output head
    dropout:    dropout on the LoRA branch during training
    quantize:   quantize the (dense) targets to NF4 first (QLoRA); targets that are already NF4Linear
                (e.g. after deltakern.quantize(model)) make it QLoRA anyway
    autocast_adapter_dtype:  keep the adapters in fp32 over a bf16 / fp16 base (PEFT's default); False keeps
                them in the base's dtype. Compute is in the input's dtype either way.
    r above min(in_features, out_features) of a target warns (the update cannot have that rank).
    """

    _module_type: ClassVar[str] = "lora"


@register
@dataclass
class DoRA(_LowRankMethod):
    """Weight-decomposed low-rank adaptation: LoRA's direction update with a learned per-row magnitude.

    Same fields as LoRA; adds lora_magnitude_vector [out] per target (= the base's row norms at init,
    so the model is unchanged at init). QDoRA when the target is NF4 (or with quantize=True).
    """

    _module_type: ClassVar[str] = "dora"
