"""Named deltas on one base: apply, activate, disable, remove (see deltakern.methods.base for the
concepts). Exactly one delta (or none) is attached at a time; `apply` freezes every parameter that
is not trainable by a method of the active delta."""

from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn

from deltakern.methods.base import _NAME_RE, _STATE_ATTR, Application, Method, Plan, _grad_flags, _State, _state


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
        from deltakern.integrations import transformers as hf

        hf.uninstall(model)



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
