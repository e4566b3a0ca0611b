"""Specification methods: train a chosen subset of the model's own parameters.

BitFit trains biases; Freeze trains the parameters picked by name patterns or the top layers.
Both give the delta its own copies of the chosen parameters (swapped into the model while the
delta is attached), so the original values come back on `disable`/`remove` and several deltas can
share one base. The copies cost the memory of the chosen parameters once more.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from deltakern.methods import base
from deltakern.methods.base import Application, Method, Plan, register


def _set_param(module: nn.Module, name: str, value: Optional[nn.Parameter]):
    if value is None:
        if name in module._parameters:
            module._parameters[name] = None
        else:
            setattr(module, name, None)
    else:
        setattr(module, name, value)


def _current(module: nn.Module, name: str):
    if name in module._parameters:
        return module._parameters[name]
    return module.__dict__.get(name)


def _bias_only_forward(self, x):
    """Forward of a frozen linear with a trainable bias: deltakern's bias-only autograd function."""
    w, b = self.weight, self.bias
    if (b is not None and b.requires_grad and torch.is_grad_enabled() and isinstance(x, torch.Tensor)
            and (not isinstance(w, torch.Tensor) or not w.requires_grad)):
        from deltakern.autograd.linear import linear

        return linear(x, w, b)
    return type(self).forward(self, x)


class _SwapApplication(Application):
    """Owns new parameters that replace (module, attribute) of the base while attached."""

    def __init__(self, method, plan, params, slots):
        super().__init__(method, plan, params)
        # slots: key -> (canonical module name, attribute, original parameter or None, new parameter)
        self.slots = slots

    def owned_base_params(self):
        return set(self.slots)

    def _override(self, module):  # per-module forward override while attached (BitFit)
        return None

    def attach(self, model):
        done = []
        self._overridden = set()
        try:
            for key, (cname, attr, orig, new) in self.slots.items():
                module = _get_module_or_root(model, cname)
                if _current(module, attr) is not orig:
                    raise RuntimeError(f"{key}: the base parameter was replaced outside this delta since it was made")
                dtype, device = base.base_dtype_device(module)
                base.follow([new], dtype, device)
                _set_param(module, attr, new)
                done.append(key)
                fwd = self._override(module)
                if fwd is not None:
                    module.__dict__["forward"] = types.MethodType(fwd, module)
                    self._overridden.add(key)
        except Exception:
            for key in reversed(done):
                self._restore(model, key)
            raise

    def _restore(self, model, key):
        cname, attr, orig, new = self.slots[key]
        module = _get_module_or_root(model, cname)
        if key in getattr(self, "_overridden", ()):
            module.__dict__.pop("forward", None)
            self._overridden.discard(key)
        if orig is not None:  # `model.to(...)` while attached moved the copy: the original follows it
            base.follow([orig], new.dtype, new.device)
        _set_param(module, attr, orig)

    def detach(self, model):
        for key in reversed(list(self.slots)):
            self._restore(model, key)


class _BitFitApplication(_SwapApplication):
    def _override(self, module):
        if self.method.fused and (type(module) is nn.Linear or _is_nf4_linear(module)):
            return _bias_only_forward
        return None


def _is_nf4_linear(module):
    from deltakern.nn.nf4_linear import NF4Linear

    return type(module) is NF4Linear


@register
@dataclass
class BitFit(Method):
    """Train the biases only (BitFit). The rest of the model stays frozen.

    target:       module names / suffixes / regexes whose bias is trained; None = every bias
    add_missing:  give linear layers without a bias (e.g. Llama's) a zero bias to train
    fused:        route nn.Linear / NF4Linear with a trained bias through deltakern's bias-only
                  autograd function (no weight gradient, dX and db from one kernel on the GPU)
    """

    target: Optional[Union[str, list]] = None
    add_missing: bool = False
    fused: bool = True
    kind: ClassVar[str] = "specification"

    def __post_init__(self):
        self.target = base.as_patterns(self.target, "BitFit")
        for flag in ("add_missing", "fused"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"BitFit: {flag} must be True or False, got {getattr(self, flag)!r}")

    def describe(self) -> str:
        return "BitFit(add_missing)" if self.add_missing else "BitFit()"

    def plan(self, model, delta) -> Plan:
        plan = Plan()
        seen = []
        for cname, module in base.named_modules(model):
            bias = _current(module, "bias")
            has = isinstance(bias, nn.Parameter) and bias.is_floating_point()
            addable = self.add_missing and bias is None and base.is_linear(module)
            if not cname or not (has or addable):
                continue
            seen.append(cname)
            if self.target is not None and not base.match(cname, self.target):
                continue
            shape = tuple(bias.shape) if has else (base.linear_shape(module)[0],)
            plan.targets[cname] = {"type": type(module).__name__, "shape": list(shape), "had_bias": bool(has)}
            plan.tensors[f"{cname}.bias"] = shape
        if not plan.targets:
            if self.target is None:
                raise ValueError("BitFit: the model has no biases" +
                                 ("" if self.add_missing else "; BitFit(add_missing=True) adds zero biases to its "
                                  "linear layers"))
            raise base.no_match_error("BitFit", self.target, seen, "modules with a bias")
        return plan

    def build(self, model, plan) -> Application:
        slots, params = {}, {}
        for cname, facts in plan.targets.items():
            module = base.get_module(model, cname)
            orig = _current(module, "bias")
            if orig is not None:
                new = nn.Parameter(orig.detach().clone())
            else:
                dtype, device = base.base_dtype_device(module)
                new = nn.Parameter(torch.zeros(facts["shape"], dtype=dtype, device=device))
            key = f"{cname}.bias"
            slots[key] = (cname, "bias", orig, new)
            params[key] = new
        return _BitFitApplication(self, plan, params, slots)


@register
@dataclass
class Freeze(Method):
    """Partial fine-tuning: train the parameters picked by name, freeze the rest.

    train:       regexes searched in canonical parameter names, e.g. [r"layer\\.5\\.", r"^classifier\\."]
    top_layers:  also train the last k layers of the model's main layer stack (encoder.layer,
                 model.layers, ...); with neither given, top_layers=1
    4-bit (NF4) weights cannot be trained and are skipped.
    """

    train: Optional[Union[str, list]] = None
    top_layers: Optional[int] = None
    kind: ClassVar[str] = "specification"

    def __post_init__(self):
        if isinstance(self.train, str):
            self.train = [self.train]
        if self.train is not None:
            if not isinstance(self.train, (list, tuple)) or not self.train or not all(isinstance(t, str) for t in self.train):
                raise ValueError(f"Freeze: train must be a regex or a non-empty list of regexes, got {self.train!r}")
            self.train = list(self.train)
            for t in self.train:
                try:
                    re.compile(t)
                except re.error as exc:
                    raise ValueError(f"Freeze: {t!r} is not a valid regex: {exc}") from None
        if self.top_layers is not None and (isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int)
                                            or self.top_layers <= 0):
            raise ValueError(f"Freeze: top_layers must be a positive int, got {self.top_layers!r}")
        if self.train is None and self.top_layers is None:
            self.top_layers = 1

    def describe(self) -> str:
        parts = []
        if self.top_layers:
            parts.append(f"top_layers={self.top_layers}")
        if self.train:
            parts.append(f"train={self.train}")
        return f"Freeze({', '.join(parts)})"

    def plan(self, model, delta) -> Plan:
        prefixes = []
        if self.top_layers:
            stack, n = base.block_list(model)
            if self.top_layers > n:
                raise ValueError(f"Freeze: top_layers={self.top_layers} but {stack} has only {n} layers")
            prefixes = [f"{stack}.{i}." for i in range(n - self.top_layers, n)]
        wrapped = set()
        for app in delta:
            wrapped |= app.wrapped_linears()
        plan = Plan()
        names, kept = [], []
        for key, module, pname, p in base.named_parameters(model):
            if not p.is_floating_point():
                continue
            names.append(key)
            if not (any(key.startswith(pre) for pre in prefixes) or (self.train and any(re.search(t, key) for t in self.train))):
                continue
            cname = key.rpartition(".")[0]
            if pname == "weight" and cname in wrapped:
                kept.append(key)  # a LoRA/DoRA of this delta keeps that weight frozen (its bias can still train)
                continue
            plan.targets[key] = {"type": type(module).__name__, "shape": list(p.shape)}
            plan.tensors[key] = tuple(p.shape)
        if not plan.targets:
            what = self.train if not prefixes else f"{self.train or ''} top_layers={self.top_layers}"
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            if kept:
                raise ValueError(f"Freeze: {what} matches only {', '.join(kept[:4])}, which this delta's LoRA/DoRA "
                                 f"keeps frozen")
            raise ValueError(f"Freeze: no trainable parameter matches {what}; parameters ({len(names)}): {shown}")
        return plan

    def build(self, model, plan) -> Application:
        slots, params = {}, {}
        aliases = {}  # id(parameter) -> every (key, module name, attribute) holding it (tied weights)
        for key, module, pname, p in base.named_parameters(model):
            aliases.setdefault(id(p), []).append((key, key.rpartition(".")[0], pname))
        copies = {}
        for key in plan.targets:
            cname, _, pname = key.rpartition(".")
            orig = _get_module_or_root(model, cname)._parameters[pname]
            if id(orig) in copies:
                continue  # a tied parameter already copied under another name
            new = copies[id(orig)] = nn.Parameter(orig.detach().clone())
            params[key] = new
            for alias, acname, apname in aliases[id(orig)]:  # tied weights stay tied: one copy everywhere
                slots[alias] = (acname, apname, orig, new)
        return _FreezeApplication(self, plan, params, slots)


class _FreezeApplication(_SwapApplication):
    pass


def _get_module_or_root(model, cname):
    return base.get_module(model, cname) if cname else base.unwrap(model)
