"""Deltas as artifacts: save only the delta, load it onto a fresh base.

A saved delta is a directory with two files, no pickle anywhere:

    delta_config.json   {"format": "deltakern.delta", "version": 1, "name": ..., "methods": [
                          {"type": "LoRA", "kind": ..., "config": {...},
                           "targets": {module name: {"type", "shape", ...}},
                           "tensors": {key: shape}}, ...]}
    delta.safetensors   the tensors, keyed "<method index>.<key>"

`load_delta` re-applies the methods in order to the model and then loads the tensors. It checks
everything first (method configs, that every target module exists with the recorded shape, every
tensor's key and shape) and changes nothing when something does not match: the error names the
first mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from deltakern.methods import base
from deltakern.nf4 import check_finite

FORMAT = "deltakern.delta"
VERSION = 1
CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"

__all__ = ["save_delta", "load_delta"]


def _write_atomic(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- distributed models (FSDP2's fully_shard, DDP) ------------------------------------------------

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def live_params(model: nn.Module, app) -> dict[str, nn.Parameter]:
    """The application's parameters as the model holds them now, and `app.params` updated to them.

    `fully_shard` replaces every module parameter by a new (sharded DTensor) Parameter, so the objects
    the application captured when it was built are stale copies: reading or writing them would lose
    data silently. The live one is found where the method put it (a LoRA/DoRA wrapper's attribute, the
    slot a BitFit/Freeze parameter sits in); a parameter that cannot be found raises.
    """
    if not app.attached:  # a detached delta is not in the model: nothing can have replaced its parameters
        return dict(app.params)
    current = {id(p) for p in model.parameters()}
    out = {}
    for key, p in app.params.items():
        if id(p) in current:
            out[key] = p
            continue
        live = None
        wrappers = getattr(app, "wrappers", None) or {}
        n, _, attr = key.rpartition(".")
        if n in wrappers:
            live = wrappers[n]._parameters.get(attr)
        slots = getattr(app, "slots", None) or {}
        if live is None and key in slots:
            cname, attr, _, _ = slots[key]
            module = base.get_module(model, cname) if cname else base.unwrap(model)
            live = module._parameters.get(attr)
        if live is None or id(live) not in current:
            raise RuntimeError(f"{app.method.describe()}: the model no longer holds parameter {key} (a wrapper such "
                               f"as fully_shard replaced it); save or load this delta before wrapping the model")
        out[key] = live
    app.params.update(out)
    return out


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `t`; a sharded DTensor is all-gathered first (a collective)."""
    from deltakern.nn.nf4_linear import is_dtensor

    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def copy_full_into(p: torch.Tensor, full: torch.Tensor):
    """p.copy_(full) for a whole tensor `full`, when `p` is a sharded DTensor too (each rank its shard)."""
    from deltakern.nn.nf4_linear import is_dtensor

    with torch.no_grad():
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            local = p.to_local()
            shard = distribute_tensor(full.to(device=local.device, dtype=local.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None)
            local.copy_(shard.to_local())
        else:
            p.copy_(full.to(device=p.device, dtype=p.dtype))


def write_on_rank0(write):
    """Run `write()` on rank 0 only when torch.distributed runs several processes; the other ranks wait
    for it, and an error on rank 0 is raised on every rank."""
    if not _distributed():
        return write()
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            write()
        except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank)
            error = f"{type(exc).__name__}: {exc}"
            raised = exc
    status = [error]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0] is not None:
        if torch.distributed.get_rank() == 0:
            raise raised
        raise RuntimeError(f"rank 0 failed to write: {status[0]}")


def save_delta(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None) -> Path:
    """Save delta `name` (default: the active one) of `model` into directory `path`; returns the path.

    Only the delta's tensors are written (safetensors) with a JSON config of its methods, their target
    modules and shapes. The base model is not saved. On a distributed model (FSDP2, DDP) every rank
    must call it: the live parameters are read (sharded ones gathered), rank 0 writes, the others wait.
    """
    from safetensors.torch import save_file

    import deltakern

    base._check_model(model)
    name = base.resolve_name(model, name)
    apps = base._state(model).deltas[name]
    methods, tensors = [], {}
    for i, app in enumerate(apps):
        methods.append({
            "type": type(app.method).__name__,
            "kind": app.method.kind,
            "config": app.method.config(),
            "targets": base._jsonable(app.plan.targets),
            "tensors": {k: list(app.params[k].shape) for k in app.params},
        })
        for key, p in live_params(model, app).items():
            tensors[f"{i}.{key}"] = full_cpu(p)
    config = {"format": FORMAT, "version": VERSION, "name": name, "deltakern_version": deltakern.__version__,
              "methods": methods}
    out = Path(path)

    def write():
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt", "delta": FORMAT}))
        _write_atomic(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))

    write_on_rank0(write)
    return out


def _read(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a saved delta ({CONFIG_NAME} + {WEIGHTS_NAME})")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: not a saved deltakern delta")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: not a deltakern delta (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: delta format version {config.get('version')!r}, this deltakern reads {VERSION}")
    if not isinstance(config.get("methods"), list) or not config["methods"]:
        raise ValueError(f"{cfg_path}: no methods listed")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{w_path}: cannot read the tensors ({exc})") from None
    return config, tensors


def _parse_methods(config, where):
    methods = []
    for i, entry in enumerate(config["methods"]):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ValueError(f"{where}: method {i} has no type")
        cls = base.METHODS.get(entry["type"])
        if cls is None:
            raise ValueError(f"{where}: method {i} has unknown type {entry['type']!r}; known: {sorted(base.METHODS)}")
        try:
            methods.append(cls.from_config(entry.get("config", {})))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: method {i} ({entry['type']}): {exc}") from None
    return methods


class _Planned:
    """Stand-in for an earlier application of the delta while planning (nothing is built yet)."""

    def __init__(self, method, plan):
        self.method, self.plan = method, plan

    def wrapped_linears(self):
        return set(self.plan.targets) if self.method.kind == "reparameterization" else set()

    def owned_base_params(self):
        return set()


def _label(i, method):
    return f"method {i} ({method.describe()})"


def _compare_targets(i, method, saved: dict, plan):
    label = _label(i, method)
    for n, facts in saved.items():
        if n not in plan.targets:
            raise ValueError(f"{label}: the delta targets {n}, which this model does not have (or which the method "
                             f"does not select here)")
        have = plan.targets[n].get("shape")
        if facts.get("shape") is not None and have is not None and list(facts["shape"]) != list(have):
            raise ValueError(f"{label}: {n} has shape {tuple(have)} in this model, the delta was made for "
                             f"{tuple(facts['shape'])}")
    for n in plan.targets:
        if n not in saved:
            raise ValueError(f"{label}: on this model the method also selects {n}, which the delta does not have")


def check_tensors(i, method, expected: dict, tensors: dict, prefix: str):
    """Every expected key present with its shape, and no extra key under `prefix`."""
    label = _label(i, method)
    for key, shape in expected.items():
        t = tensors.get(prefix + key)
        if t is None:
            raise ValueError(f"{label}: tensor {prefix + key} is missing from the delta")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{label}: tensor {prefix + key} has shape {tuple(t.shape)}, this model needs {tuple(shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{label}: tensor {prefix + key} has dtype {t.dtype}, expected a floating-point tensor")
        check_finite(f"{label}: tensor {prefix + key}", t,
                     "; the delta is corrupt or was saved from a diverged run")


def copy_into(app, tensors: dict, prefix: str):
    for key, p in app.params.items():
        copy_full_into(p, tensors[prefix + key])
    for w in getattr(app, "wrappers", {}).values():
        cache = getattr(w, "_norm_cache", None)
        if cache is not None:
            cache.clear()


def load_into_new_delta(model: nn.Module, name: str, methods: list, tensors: dict, prefixes: list[str],
                        saved_targets: Optional[list] = None) -> str:
    """Validate all methods and tensors against `model`, then create delta `name` and load the tensors."""
    planned, plans = [], []
    with base.base_only(model):  # the new delta starts from the base, whatever delta is active now
        for i, m in enumerate(methods):
            try:
                plan = m.plan(model, planned)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{_label(i, m)} does not fit this model: {exc}") from None
            if saved_targets is not None:
                _compare_targets(i, m, saved_targets[i], plan)
            check_tensors(i, m, plan.tensors, tensors, prefixes[i])
            planned.append(_Planned(m, plan))
            plans.append(plan)
    expected = {prefixes[i] + k for i, p in enumerate(plans) for k in p.tensors}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"the delta has tensor {extra[0]!r}, which none of its methods uses"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    base.new_delta(model, name, list(zip(methods, plans)),
                   before_attach=lambda i, app: copy_into(app, tensors, prefixes[i]))
    _warn_if_sharded(model, name)
    return name


def _warn_if_sharded(model: nn.Module, name: str):
    from deltakern.nn.nf4_linear import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        import warnings

        warnings.warn(f"delta {name!r} was created on a model already sharded with fully_shard: its parameters are "
                      f"whole on every rank and FSDP does not reduce their gradients. That is fine for inference; to "
                      f"train, apply the delta before sharding (then load_delta / load_peft_adapter load into it)",
                      stacklevel=3)


def load_delta(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None) -> str:
    """Load a saved delta onto `model` and make it the active delta; returns its name.

    On a model without that delta: the methods are applied in order (onto a fresh base: the same base
    model the delta was trained on), then the tensors loaded. On a model that already has a delta of
    that name (e.g. to resume training): its methods and configs must equal the saved ones, and the
    tensors are loaded into it. `name` renames the delta (default: the saved name).
    Raises ValueError naming the first mismatch; nothing is changed then.
    """
    base._check_model(model)
    path = Path(path)
    config, tensors = _read(path)
    where = str(path / CONFIG_NAME)
    methods = _parse_methods(config, where)
    name = name if name is not None else config.get("name", "default")
    base._check_name(name)
    prefixes = [f"{i}." for i in range(len(methods))]
    saved_targets = []
    for i, entry in enumerate(config["methods"]):
        targets = entry.get("targets")
        if not isinstance(targets, dict) or not all(isinstance(f, dict) for f in targets.values()):
            raise ValueError(f"{where}: method {i} has no targets (a JSON object of module name -> facts)")
        saved_targets.append(targets)
        saved_tensors = entry.get("tensors", {})
        if not isinstance(saved_tensors, dict) or not all(isinstance(s, list) for s in saved_tensors.values()):
            raise ValueError(f"{where}: method {i}: tensors must be a JSON object of tensor key -> shape")
        for key, shape in saved_tensors.items():
            t = tensors.get(prefixes[i] + key)
            if t is None or list(t.shape) != list(shape):
                raise ValueError(f"{path}: the config and the tensors disagree on {prefixes[i] + key}")
    st = base._state(model)
    if st is not None and name in st.deltas:
        try:
            return _load_into_existing(model, st, name, methods, tensors, prefixes, saved_targets)
        except ValueError as exc:
            raise ValueError(f"the model already has a delta named {name!r}, so load_delta loads into it (to resume "
                             f"it), but the saved delta does not fit it: {exc}. To load the saved delta beside it, "
                             f"pass another name: load_delta(model, path, name='...')") from None
    return load_into_new_delta(model, name, methods, tensors, prefixes, saved_targets)


def _load_into_existing(model, st, name, methods, tensors, prefixes, saved_targets):
    apps = st.deltas[name]
    for app in apps:
        live_params(model, app)
    if st.merged and st.active == name:
        raise RuntimeError(f"delta {name!r} is merged; unmerge(model) before loading into it")
    if len(apps) != len(methods):
        raise ValueError(f"delta {name!r} on the model has {len(apps)} method(s), the saved one {len(methods)}")
    for i, (app, m) in enumerate(zip(apps, methods)):
        if type(app.method) is not type(m):
            raise ValueError(f"delta {name!r}: method {i} is {app.method.describe()} on the model, "
                             f"{m.describe()} in the file")
        have, want = app.method.config(), m.config()
        for key in have:
            if have[key] != want.get(key):
                raise ValueError(f"delta {name!r}: method {i} ({m.describe()}) has {key}={have[key]!r} on the model, "
                                 f"{want.get(key)!r} in the file")
        _compare_targets(i, m, saved_targets[i], app.plan)
        check_tensors(i, m, {k: tuple(p.shape) for k, p in app.params.items()}, tensors, prefixes[i])
    expected = {prefixes[i] + k for i, a in enumerate(apps) for k in a.params}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"the delta has tensor {extra[0]!r}, which none of its methods uses")
    for i, app in enumerate(apps):
        copy_into(app, tensors, prefixes[i])
    base.activate(model, name)
    return name
