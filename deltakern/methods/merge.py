"""merge / unmerge: fold the active delta's LoRA/DoRA into the base weights and back."""

from __future__ import annotations

from torch import nn

from deltakern.methods.base import _state
from deltakern.methods.deltas import _attach_all, _check_model, _drop_state_if_empty, _refreeze, resolve_name


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
