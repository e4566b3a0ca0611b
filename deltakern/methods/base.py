"""The core of the delta-method layer: one way to apply any delta method to any torch model.

    apply(model, LoRA(r=16, alpha=32, target=["q_proj", "v_proj"]))   # in place; returns the model
    apply(model, BitFit())                                            # methods compose
    print(summary(model))                                             # trainable parameters per method

A *method* (LoRA, DoRA, BitFit, Freeze, Adapter, PrefixTuning, PromptTuning) is a small config
object. `apply` turns it into an *application*: the new trainable tensors plus the way they enter
the model (a wrapper module in a slot, a swapped bias, a hook). Applications are grouped into named
*deltas*; exactly one delta (or none) is attached to the model at a time:

    apply(model, LoRA(), name="taskA"); ...train...
    apply(model, LoRA(), name="taskB"); ...train...   # taskA is detached, taskB starts from the base
    activate(model, "taskA")                          # swap back (cheap: no copies of the base)
    with disable(model): base_out = model(x)          # the base alone, then taskA again

`apply` freezes every parameter that is not trainable by a method of the active delta.

Module names: methods name modules by their path in the *original* model, whatever wrappers
deltakern has put in between (`encoder.layer.0.attention.self.query` stays that name after LoRA
wraps it). `target` patterns match such a name exactly, as a dotted suffix ("query" matches
"...self.query") or as a regular expression (re.fullmatch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn

__all__ = [
    "Method", "apply", "activate", "disable", "remove", "merge", "unmerge", "summary", "Summary",
    "deltas", "active_delta", "delta_state_dict",
]

_STATE_ATTR = "_deltakern_deltas"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# ---------------------------------------------------------------------------------------------
# method registry (for configs read back from JSON)
# ---------------------------------------------------------------------------------------------

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.__name__] = cls
    return cls


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class Plan:
    """What a method will touch, computed without changing the model.

    targets: canonical module name -> facts about the base module there ({"type", "shape"})
    tensors: key -> shape of every tensor the method will own (the keys of its saved tensors)
    """

    targets: dict[str, dict] = field(default_factory=dict)
    tensors: dict[str, tuple] = field(default_factory=dict)


class Method:
    """Base class of the delta methods. Subclasses are dataclasses whose fields are the config."""

    kind: ClassVar[str] = ""  # "reparameterization" | "specification" | "addition"

    def config(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict) -> "Method":
        if not isinstance(config, dict):
            raise ValueError(f"{cls.__name__}: config must be a JSON object, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}; known: {sorted(names)}")
        return cls(**config)

    def describe(self) -> str:
        """A short label for tables, e.g. "LoRA(r=8, alpha=16)"."""
        return f"{type(self).__name__}()"

    # implemented by each method ------------------------------------------------------------
    def plan(self, model: nn.Module, delta: list["Application"]) -> Plan:  # pragma: no cover
        raise NotImplementedError

    def build(self, model: nn.Module, plan: Plan) -> "Application":  # pragma: no cover
        raise NotImplementedError


class Application:
    """A method applied to one model: the tensors it owns and how they enter the model.

    `params` maps stable keys (the keys of the saved delta) to the parameters. `attach` puts the
    method into the model, `detach` restores the model exactly as it was; both are cheap and can be
    repeated (named deltas and `disable` are built on them).
    """

    mergeable = False

    def __init__(self, method: Method, plan: Plan, params: dict[str, nn.Parameter]):
        self.method, self.plan, self.params = method, plan, dict(params)
        self.attached = False

    # base parameters (canonical names) this application replaces (BitFit, Freeze)
    def owned_base_params(self) -> set[str]:
        return set()

    # canonical names of linears this application wraps (LoRA, DoRA)
    def wrapped_linears(self) -> set[str]:
        return set()

    def attach(self, model: nn.Module):  # pragma: no cover
        raise NotImplementedError

    def detach(self, model: nn.Module):  # pragma: no cover
        raise NotImplementedError

    def merge(self, model: nn.Module):  # pragma: no cover
        raise NotImplementedError

    def forget_wrappers(self, unwrapped: dict):
        """Called when wrappers this application may hold (as its inner module) are dropped for good."""

    def unmerge(self, model: nn.Module):  # pragma: no cover
        raise NotImplementedError


class _State:
    """Per-model bookkeeping, stored in the model's __dict__ (not a module, not in the state dict)."""

    def __init__(self):
        self.deltas: dict[str, list[Application]] = {}
        self.active: Optional[str] = None
        self.merged = False
        self.grad_flags: list = []  # requires_grad of every parameter before the first delta


def _state(model: nn.Module, create: bool = False) -> Optional[_State]:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = _State()
        st.grad_flags = _grad_flags(model)
        object.__setattr__(model, _STATE_ATTR, st)
    return st


# ---------------------------------------------------------------------------------------------
# canonical module names, slots and wrappers
# ---------------------------------------------------------------------------------------------

def _lora_types():
    from deltakern.nn.dora import DoRALinear
    from deltakern.nn.lora import LoRALinear

    return LoRALinear, DoRALinear


def _nf4_weight_type():
    from deltakern.nf4 import NF4Weight

    return NF4Weight


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


def is_conv1d(module: nn.Module) -> bool:
    """A transformers Conv1D (GPT-2 style linear, weight stored [in_features, out_features]) with a dense weight."""
    from deltakern.nn.lora import dense_conv1d_weight

    return dense_conv1d_weight(module)


def is_linear(module: nn.Module) -> bool:
    """A dense nn.Linear, a transformers Conv1D, or a 4-bit layer whose .weight is an NF4Weight
    (deltakern.nn.NF4Linear)."""
    return (isinstance(module, nn.Linear) or isinstance(getattr(module, "weight", None), _nf4_weight_type())
            or is_conv1d(module))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer (a Conv1D stores its weight the other way round)."""
    shape = tuple(int(s) for s in module.weight.shape)
    return shape[::-1] if is_conv1d(module) else shape


def base_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Compute dtype and device of a module: its weight's (an NF4Weight's dense dtype), else its first
    floating parameter or buffer."""
    w = getattr(module, "weight", None)
    if isinstance(w, _nf4_weight_type()):
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


def match(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a canonical name exactly, as a dotted suffix, or as a regex (fullmatch)."""
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


def as_patterns(target, what: str) -> Optional[list[str]]:
    if target is None:
        return None
    if isinstance(target, str):
        return [target]
    if isinstance(target, (list, tuple)) and all(isinstance(t, str) for t in target) and target:
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


# ---------------------------------------------------------------------------------------------
# applying, switching, removing
# ---------------------------------------------------------------------------------------------

def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_name(name):
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"a delta name must be a non-empty string of letters, digits, '_', '-', '.', got {name!r}")


def _refreeze(model: nn.Module, st: _State):
    for p in model.parameters():
        p.requires_grad_(False)
    if st.active is not None:
        for app in st.deltas[st.active]:
            for p in app.params.values():
                p.requires_grad_(True)


def _grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def _restore_grad_flags(flags):
    """Undo _refreeze after a failed apply/load (which must leave the model as it was)."""
    for p, flag in flags:
        p.requires_grad_(flag)


def _detach_all(model, st: _State):
    if st.active is None:
        return
    apps = st.deltas[st.active]
    for app in reversed(apps):
        if app.attached:
            app.detach(model)
            app.attached = False
    st.active = None
    st.merged = False


def _attach_all(model, st: _State, name: str):
    done = []
    try:
        for app in st.deltas[name]:
            app.attach(model)
            app.attached = True
            done.append(app)
    except Exception:
        for app in reversed(done):
            app.detach(model)
            app.attached = False
        raise
    st.active = name


def _switch(model, st: _State, name: Optional[str]):
    if st.active == name:
        return
    _detach_all(model, st)
    if name is not None:
        _attach_all(model, st, name)


@contextlib.contextmanager
def base_only(model: nn.Module):
    """Inside the block the model runs without its active delta (to plan a new delta against the base,
    which is what the new delta will be attached to); the delta is attached again afterwards."""
    st = _state(model)
    active = None if st is None else st.active
    if active is not None:
        if st.merged:
            raise RuntimeError(f"delta {active!r} is merged into the base weights; call unmerge(model) first")
        _detach_all(model, st)
    try:
        yield model
    finally:
        if active is not None:
            _attach_all(model, st, active)


def new_delta(model: nn.Module, name: str, steps: list[tuple[Method, Optional[Plan]]], before_attach=None) -> list[Application]:
    """Create delta `name` from (method, plan) pairs in order: build and attach each. If anything fails,
    the model is restored (the new delta removed, the previously active delta attached again).
    `before_attach(index, application)` runs after each build (used to load tensors)."""
    st = _state(model, create=True)
    previous = st.active
    flags = _grad_flags(model)
    _switch(model, st, None)
    st.deltas[name] = []
    try:
        st.active = name
        for i, (method, plan) in enumerate(steps):
            _apply_one(model, st, name, method, plan, before_attach=(None if before_attach is None else
                                                                     (lambda app, i=i: before_attach(i, app))))
    except Exception:
        _detach_all(model, st)
        del st.deltas[name]
        if previous is not None:
            _attach_all(model, st, previous)
        _restore_grad_flags(flags)
        _drop_state_if_empty(model, st)
        raise
    _refreeze(model, st)
    return st.deltas[name]


def _apply_one(model, st: _State, name: str, method: Method, plan: Optional[Plan], before_attach=None):
    apps = st.deltas[name]
    if plan is None:
        plan = method.plan(model, apps)
    app = method.build(model, plan)
    if before_attach is not None:
        before_attach(app)
    app.attach(model)
    app.attached = True
    apps.append(app)
    _check_conflicts(name, apps)
    return app


def _check_conflicts(name, apps):
    owned, wrapped = {}, {}
    for app in apps:
        label = type(app.method).__name__
        for key in app.owned_base_params():
            if key in owned:
                raise ValueError(f"delta {name!r}: {key} is trained by both {owned[key]} and {label}")
            owned[key] = label
        for lin in app.wrapped_linears():
            wrapped[lin] = label
    for key, label in owned.items():
        module, _, pname = key.rpartition(".")
        if pname == "weight" and module in wrapped:
            raise ValueError(f"delta {name!r}: {label} trains {key}, but {wrapped[module]} keeps that weight frozen; "
                             f"leave {module} out of one of them")


def apply(model: nn.Module, method, name: Optional[str] = None) -> nn.Module:
    """Apply a delta method (or a list of them, in order) to `model` in place; returns `model`.

    `name` picks the delta it joins (default: the active delta, else "default"). A name other than
    the active delta's detaches the active delta first, so every delta is trained from the base.
    Afterwards only the active delta's parameters require grad.
    """
    _check_model(model)
    methods = list(method) if isinstance(method, (list, tuple)) else [method]
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"method must be a deltakern method (LoRA(), BitFit(), ...), got {type(m).__name__}")
    st = _state(model)
    if st is not None and st.merged:
        raise RuntimeError("the active delta is merged into the base weights; call unmerge(model) before applying more")
    name = name if name is not None else ((st and st.active) or "default")
    _check_name(name)
    st = _state(model, create=True)
    if name not in st.deltas:
        new_delta(model, name, [(m, None) for m in methods])
        return model
    previous = st.active
    flags = _grad_flags(model)
    _switch(model, st, name)
    apps = st.deltas[name]
    n0 = len(apps)
    try:
        for m in methods:
            _apply_one(model, st, name, m, None)
    except Exception:
        for app in reversed(apps[n0:]):  # undo only what this call added
            if app.attached:
                app.detach(model)
                app.attached = False
        del apps[n0:]
        _switch(model, st, previous)
        _restore_grad_flags(flags)
        raise
    _refreeze(model, st)
    return model


def activate(model: nn.Module, name: str) -> nn.Module:
    """Make delta `name` the active one (detaching the current one). Returns `model`."""
    _check_model(model)
    st = _state(model)
    if st is None or name not in st.deltas:
        have = sorted(st.deltas) if st else []
        raise KeyError(f"no delta named {name!r} on this model; it has {have or 'none'}")
    if st.merged and st.active != name:
        raise RuntimeError("the active delta is merged into the base weights; call unmerge(model) first")
    _switch(model, st, name)
    _refreeze(model, st)
    return model


class _Disabled:
    """Returned by `disable`: the model is already running without its delta; as a context manager,
    leaving the block attaches the delta that was active before."""

    def __init__(self, model, previous):
        self.model, self.previous = model, previous

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        st = _state(self.model)
        if self.previous is not None and st is not None and st.active is None and self.previous in st.deltas:
            activate(self.model, self.previous)
        return False


def disable(model: nn.Module) -> _Disabled:
    """Detach the active delta so the model computes with its base alone.

        disable(model)                  # until activate(model, name)
        with disable(model): ...        # only inside the block
    """
    _check_model(model)
    st = _state(model)
    previous = None if st is None else st.active
    if st is not None:
        _detach_all(model, st)
        _refreeze(model, st)
    return _Disabled(model, previous)


def _drop_state_if_empty(model, st):
    """When the last delta goes, the model is as it was: its requires_grad flags come back too."""
    if not st.deltas:
        _restore_grad_flags(st.grad_flags)
        model.__dict__.pop(_STATE_ATTR, None)


def remove(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Remove delta `name` (default: all deltas) from the model, restoring the base modules.

    Base changes that are not part of a delta stay: a `LoRA(quantize=True)` base stays NF4, and
    `merge(model, unload=True)` has already written into the base weights. When the last delta goes,
    the parameters' requires_grad flags are restored to what they were before the first `apply`.
    """
    _check_model(model)
    st = _state(model)
    if st is None:
        if name is None:
            return model
        raise KeyError(f"no delta named {name!r} on this model; it has none")
    names = list(st.deltas) if name is None else [name]
    for n in names:
        if n not in st.deltas:
            raise KeyError(f"no delta named {n!r} on this model; it has {sorted(st.deltas)}")
        if st.active == n:
            _detach_all(model, st)
        del st.deltas[n]
    _refreeze(model, st)
    _drop_state_if_empty(model, st)
    return model


def deltas(model: nn.Module) -> list[str]:
    """Names of the deltas held by the model (attached or not)."""
    st = _state(model)
    return [] if st is None else list(st.deltas)


def active_delta(model: nn.Module) -> Optional[str]:
    """Name of the attached delta, or None."""
    st = _state(model)
    return None if st is None else st.active


def applications(model: nn.Module, name: Optional[str] = None) -> list[Application]:
    st = _state(model)
    if st is None:
        raise ValueError("the model has no deltas: apply a method first (deltakern.methods.apply)")
    name = name if name is not None else st.active
    if name is None:
        raise ValueError(f"no delta is active; name one of {sorted(st.deltas)}")
    if name not in st.deltas:
        raise KeyError(f"no delta named {name!r} on this model; it has {sorted(st.deltas)}")
    return st.deltas[name]


def resolve_name(model: nn.Module, name: Optional[str]) -> str:
    st = _state(model)
    if st is None:
        raise ValueError("the model has no deltas: apply a method first (deltakern.methods.apply)")
    if name is None:
        if st.active is None:
            raise ValueError(f"no delta is active; name one of {sorted(st.deltas)}")
        return st.active
    if name not in st.deltas:
        raise KeyError(f"no delta named {name!r} on this model; it has {sorted(st.deltas)}")
    return name


# ---------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------

def merge(model: nn.Module, unload: bool = False) -> list[str]:
    """Fold the active delta's LoRA/DoRA updates into the dense base weights; returns what was merged.

    The forward then runs at the base's cost. `unmerge(model)` undoes it (exact up to the dtype's
    rounding). BitFit/Freeze already live in the base parameters; adapters, prefixes and prompts
    cannot be merged and keep running unmerged. NF4 bases refuse (requantizing is lossy).
    `unload=True` makes it permanent: the wrappers are dropped and the merged methods leave the delta.
    """
    _check_model(model)
    name = resolve_name(model, None)
    st = _state(model)
    apps = st.deltas[name]
    todo = [a for a in apps if a.mergeable]
    if not todo:
        raise ValueError(f"delta {name!r} has no mergeable method (LoRA/DoRA): "
                         f"{', '.join(a.method.describe() for a in apps) or 'none'}")
    if st.merged:
        raise RuntimeError(f"delta {name!r} is already merged")
    done = []
    try:
        for app in todo:
            app.merge(model)
            done.append(app)
    except Exception:
        for app in reversed(done):
            app.unmerge(model)
        raise
    merged = [a.method.describe() for a in todo]
    if unload:
        # later applications may wrap the LoRA wrappers (adapters): take them off first, then the
        # merged applications for good, then put the rest back
        for app in reversed(apps):
            if app.mergeable:
                app.detach(model, keep_merged=True)
            else:
                app.detach(model)
            app.attached = False
        unwrapped = {w: w.base for a in apps if a.mergeable for w in a.wrappers.values()}
        st.deltas[name] = [a for a in apps if not a.mergeable]
        for a in st.deltas[name]:
            a.forget_wrappers(unwrapped)
        st.active = None
        if st.deltas[name]:
            _attach_all(model, st, name)
        else:
            del st.deltas[name]
        _refreeze(model, st)
        _drop_state_if_empty(model, st)
        return merged
    st.merged = True
    return merged


def unmerge(model: nn.Module) -> list[str]:
    """Undo `merge(model)` (unload=False)."""
    _check_model(model)
    name = resolve_name(model, None)
    st = _state(model)
    if not st.merged:
        raise RuntimeError(f"delta {name!r} is not merged")
    todo = [a for a in st.deltas[name] if a.mergeable]
    for app in reversed(todo):
        app.unmerge(model)
    st.merged = False
    return [a.method.describe() for a in todo]


# ---------------------------------------------------------------------------------------------
# tensors and summary
# ---------------------------------------------------------------------------------------------

def delta_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The delta's tensors only, keyed "<method index>.<key>" (e.g. "0.encoder.layer.0.attention.self.query.lora_A")."""
    name = resolve_name(model, name)
    out = {}
    for i, app in enumerate(_state(model).deltas[name]):
        for key, p in app.params.items():
            out[f"{i}.{key}"] = p.detach()
    return out


def _model_numel(model: nn.Module) -> int:
    NF4Weight = _nf4_weight_type()
    seen, packed = set(), set()
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, NF4Weight) and id(m) not in seen:
            seen.add(id(m))
            n += w.numel
            packed.update(id(p) for p in getattr(m, "nf4_parameters", list)())
    n += sum(p.numel() for p in model.parameters() if id(p) not in packed)
    return n


@dataclass
class Summary:
    """Trainable parameters per method of the active delta. `str()` gives the table."""

    delta: Optional[str]
    rows: list[dict]
    trainable: int
    total: int
    inactive: list[str]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = []
        head = f"delta {self.delta!r} (active)" if self.delta else "no active delta"
        if self.inactive:
            head += f"; inactive: {', '.join(repr(n) for n in self.inactive)}"
        lines.append(head)
        w = max([len("method")] + [len(r["method"]) for r in self.rows] + [len("total trainable")])
        lines.append(f"  {'method':<{w}}  {'kind':<18}  {'targets':>7}  {'trainable':>12}  {'% of model':>10}")
        for r in self.rows:
            lines.append(f"  {r['method']:<{w}}  {r['kind']:<18}  {r['targets']:>7}  {r['params']:>12,}  "
                         f"{100.0 * r['params'] / max(self.total, 1):>9.3f}%")
        lines.append(f"  {'total trainable':<{w}}  {'':<18}  {'':>7}  {self.trainable:>12,}  {self.percent:>9.3f}%")
        lines.append(f"  model parameters: {self.total:,} (4-bit weights counted per element)")
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """Trainable parameters of the active delta per method, in total, and as a share of the model.

    `print(summary(model))` prints the table; the object also has .rows, .trainable, .total, .percent.
    Parameters that require grad without belonging to a method are listed as "other".
    """
    _check_model(model)
    st = _state(model)
    rows, owned = [], set()
    if st is not None and st.active is not None:
        for app in st.deltas[st.active]:
            n = sum(p.numel() for p in app.params.values())
            owned.update(id(p) for p in app.params.values())
            rows.append({"method": app.method.describe(), "kind": app.method.kind,
                         "targets": len(app.plan.targets), "params": n})
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in owned)
    if other:
        rows.append({"method": "other (requires_grad)", "kind": "-", "targets": 0, "params": other})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = [] if st is None else [n for n in st.deltas if n != st.active]
    return Summary(None if st is None else st.active, rows, trainable, _model_numel(model), inactive)
