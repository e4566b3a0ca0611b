"""The core types of the delta-method layer: what a method, a plan and an application are, the method
registry, and the per-model state. The rest of the layer, by file:

    modules.py   canonical module names, slots, wrappers, target patterns
    deltas.py    apply, activate, disable, remove: named deltas on one base
    merge.py     merge / unmerge (fold LoRA/DoRA into the base weights)
    summary.py   delta_state_dict and summary (trainable parameters per method)
    reparam.py (LoRA, DoRA), specification.py (BitFit, Freeze), adapter.py, prefix.py, prompt.py:
                 the methods themselves

The overview:

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

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

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
        from deltakern.integrations import transformers as hf

        hf.install(model)  # save_pretrained / load_state_dict of checkpoints (transformers models only)
    return st


def _grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


# The functions that lived here before the split, so `base.<name>` keeps working.
from deltakern.methods.deltas import (  # noqa: E402,F401
    _apply_one,
    _attach_all,
    _check_conflicts,
    _check_model,
    _check_name,
    _detach_all,
    _Disabled,
    _drop_state_if_empty,
    _refreeze,
    _restore_grad_flags,
    _switch,
    activate,
    active_delta,
    applications,
    apply,
    base_only,
    deltas,
    disable,
    new_delta,
    remove,
    resolve_name,
)
from deltakern.methods.merge import merge, unmerge  # noqa: E402,F401
from deltakern.methods.modules import (  # noqa: E402,F401
    _lora_types,
    as_patterns,
    base_dtype_device,
    block_list,
    follow,
    get_module,
    is_dense_conv1d,
    is_linear,
    linear_shape,
    match,
    named_modules,
    named_parameters,
    no_match_error,
    output_head_names,
    replace_in_slot,
    slot_chain,
    unwrap,
    wrapper_attr,
)
from deltakern.methods.summary import Summary, _model_numel, delta_state_dict, summary  # noqa: E402,F401
is_conv1d = is_dense_conv1d  # the old name (it always meant: with a dense weight)
