"""PEFT's adapter format for LoRA / DoRA deltas (and a lone PromptTuning), both ways.

    save_peft_adapter(model, "out/")          # adapter_config.json + adapter_model.safetensors
    peft.PeftModel.from_pretrained(base, "out/")      # same outputs as the deltakern model
    load_peft_adapter(model, "peft_adapter/")         # a PEFT-trained adapter as a deltakern delta

Format (peft 0.21): tensors `base_model.model.<module path>.lora_A.weight` [r, in],
`...lora_B.weight` [out, r] and, for DoRA, `...lora_magnitude_vector` [out]; the config is a
LoraConfig (peft_type "LORA"). Per-layer ranks and alphas go to rank_pattern / alpha_pattern keyed by
the escaped module path. Only LoRA/DoRA on linear layers, bias "none": anything else in a PEFT
adapter (embedding LoRA, modules_to_save, trained biases, ...) is refused with a clear error, and a
delta that holds other methods cannot be exported.

transformers' Conv1D layers (GPT-2 style, weight stored [in, out]) are what PEFT calls
`fan_in_fan_out=True`; the adapter tensors keep the same shapes ([r, in], [out, r]). The config
gets `fan_in_fan_out: true` when a target is a Conv1D (PEFT writes that for GPT-2; one flag per
adapter, and PEFT sets it per layer from the layer's type when it loads). On reading, the flag is
accepted either way: each target's layout comes from the model's own layer.

A delta that is one PromptTuning is written as PEFT's PROMPT_TUNING adapter (`prompt_embeddings`
[num_virtual_tokens, hidden], a PromptTuningConfig with num_transformer_submodules=1) and read back
the same way. PEFT prepends the same embeddings; without left padding its outputs on the caller's
tokens equal deltakern's (PEFT's positions count left padding, deltakern's follow generate's).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

from torch import nn

from deltakern.methods import base
from deltakern.methods.artifacts import (_write_atomic, copy_full_into, full_cpu, live_params, load_into_new_delta,
                                        write_on_rank0)
from deltakern.methods.prompt import PromptTuning
from deltakern.methods.reparam import DoRA, LoRA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

__all__ = ["save_peft_adapter", "load_peft_adapter"]


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write delta `name` (default: the active one) in PEFT's adapter format: LoRA / DoRA layers, or a lone
    PromptTuning (PEFT's PROMPT_TUNING adapter)."""
    from safetensors.torch import save_file

    base._check_model(model)
    name = base.resolve_name(model, name)
    apps = base._state(model).deltas[name]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if len(apps) == 1 and isinstance(apps[0].method, PromptTuning):
        return _save_prompt(model, apps[0], Path(path), base_model_name_or_path)
    others = [a.method.describe() for a in apps if not isinstance(a.method, (LoRA, DoRA))]
    if others:
        raise ValueError(f"delta {name!r} holds {', '.join(others)}: PEFT's adapter formats store LoRA/DoRA layers "
                         "or a prompt tuning alone")
    kinds = {isinstance(a.method, DoRA) for a in apps}
    rs = {a.method.use_rslora for a in apps}
    if len(kinds) > 1 or len(rs) > 1:
        raise ValueError(f"delta {name!r} mixes LoRA and DoRA, or rsLoRA and plain scaling: PEFT's config has one "
                         "use_dora / use_rslora flag per adapter")
    use_dora, use_rslora = kinds.pop(), rs.pop()
    layers = {}  # module path -> (r, alpha)
    tensors = {}
    fan_in_fan_out = False
    for a in apps:
        for n, w in a.wrappers.items():
            layers[n] = (a.method.r, a.method.alpha)
            fan_in_fan_out = fan_in_fan_out or bool(getattr(w, "fan_in_fan_out", False))
            tensors[f"{PREFIX}{n}.lora_A.weight"] = full_cpu(w.lora_A)  # the live (maybe sharded) parameters
            tensors[f"{PREFIX}{n}.lora_B.weight"] = full_cpu(w.lora_B)
            if use_dora:
                tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = full_cpu(w.lora_magnitude_vector)
    r0 = Counter(r for r, _ in layers.values()).most_common(1)[0][0]
    a0 = Counter(al for _, al in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(n): r for n, (r, _) in layers.items() if r != r0},
        "alpha_pattern": {re.escape(n): al for n, (_, al) in layers.items() if al != a0},
        "lora_dropout": max(a.method.dropout for a in apps),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    out = Path(path)

    def write():
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        _write_atomic(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))

    write_on_rank0(write)  # on a distributed model: rank 0 writes, the other ranks wait
    return out


def peft_exportable(apps) -> bool:
    """Whether a delta's methods fit one PEFT adapter: LoRA / DoRA only, or a lone PromptTuning."""
    return bool(apps) and (all(isinstance(a.method, (LoRA, DoRA)) for a in apps)
                           or (len(apps) == 1 and isinstance(apps[0].method, PromptTuning)))


def _task_type(model) -> Optional[str]:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def _save_prompt(model, app, out: Path, base_model_name_or_path) -> Path:
    """PEFT's PROMPT_TUNING adapter: `prompt_embeddings` [num_virtual_tokens, hidden] and a PromptTuningConfig.
    PEFT prepends the same embeddings; without left padding its outputs on the caller's tokens equal ours."""
    from safetensors.torch import save_file

    emb = app.params["prompt.embedding"]
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": int(emb.shape[0]),
        "token_dim": int(emb.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }
    tensors = {"prompt_embeddings": emb.detach().to("cpu", copy=True).contiguous()}
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_atomic(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _load_prompt(model, cfg, tensors, where, name) -> str:
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']}; deltakern reads "
                         "prompt tuning adapters of decoder-only or encoder-only models (1)")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save={cfg['modules_to_save']!r} is not supported by deltakern's PEFT reader")
    emb = tensors.get("prompt_embeddings")
    if emb is None or set(tensors) != {"prompt_embeddings"} or emb.dim() != 2:
        raise ValueError(f"{where}: a PROMPT_TUNING adapter holds one 2-D tensor 'prompt_embeddings', got "
                         f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    method = PromptTuning(num_virtual_tokens=int(emb.shape[0]))
    return load_into_new_delta(model, name, [method], {"0.prompt.embedding": emb}, ["0."])


# fields of a PEFT LoraConfig that change what the adapter is; anything set here is refused
_UNSUPPORTED = {
    "fan_in_fan_out": (False, True, None), "modules_to_save": (None, []), "lora_bias": (False, None),
    "layer_replication": (None, []), "target_parameters": (None, []), "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}), "alora_invocation_tokens": (None, []), "use_bdlora": (None, False),
}


def _read_tensors(w_path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{w_path}: cannot read the tensors ({exc})") from None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first key k with re.match(rf"(.*\\.)?({k})$", module) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = "default") -> str:
    """Load a PEFT LoRA/DoRA (or PROMPT_TUNING) adapter directory onto `model` (the same base model it was trained on) as
    deltakern delta `name`, made active; returns the name. Checks everything before changing the model.

    When the model already has delta `name` with the same LoRA/DoRA layers (e.g. applied before
    `fully_shard`, whose sharded parameters cannot be replaced), the tensors are loaded into it."""

    base._check_model(model)
    base._check_name(name)
    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: not a PEFT adapter directory")
    st = base._state(model)
    existing = st is not None and name in st.deltas
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if cfg.get("peft_type") not in ("LORA", "PROMPT_TUNING"):
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; deltakern reads LORA (LoRA/DoRA) and "
                         "PROMPT_TUNING adapters")
    for key, ok in (_UNSUPPORTED.items() if cfg["peft_type"] == "LORA" else ()):
        if key in cfg and cfg[key] not in ok:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by deltakern's PEFT reader")
    if cfg["peft_type"] == "LORA" and cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={cfg['bias']!r}; only adapters with bias='none' are supported")
    if cfg["peft_type"] == "PROMPT_TUNING":
        return _load_prompt(model, cfg, _read_tensors(w_path), w_path, name)
    tensors = _read_tensors(w_path)
    use_dora = bool(cfg.get("use_dora", False))
    use_rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    layer_re = re.compile(re.escape(PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
    layers: dict[str, dict] = {}
    for key, t in tensors.items():
        m = layer_re.fullmatch(key)
        if m is None:
            raise ValueError(f"{w_path}: tensor {key!r} is not a LoRA/DoRA weight of a linear layer "
                             f"(expected {PREFIX}<module>.lora_A.weight / lora_B.weight / lora_magnitude_vector)")
        layers.setdefault(m.group(1), {})[m.group(2)] = t
    if not layers:
        raise ValueError(f"{w_path}: holds no LoRA weights")
    groups: dict[tuple, list[str]] = {}
    for module, parts in layers.items():
        need = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(parts) != need:
            missing, extra = sorted(need - set(parts)), sorted(set(parts) - need)
            raise ValueError(f"{w_path}: {module} has " + (f"no {missing}" if missing else f"unexpected {extra}")
                             + (" (use_dora is set)" if use_dora else ""))
        r = int(parts["lora_A.weight"].shape[0])
        r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r))
        if r != r_cfg:
            raise ValueError(f"{w_path}: {module} has rank {r}, the config says {r_cfg}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        if isinstance(alpha, float) and alpha.is_integer():
            alpha = int(alpha)
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{cfg_path}: {module} has lora_alpha {alpha!r}")
        groups.setdefault((r, alpha), []).append(module)
    cls = DoRA if use_dora else LoRA
    if existing:
        return _load_into_existing(model, name, cls, layers, groups, use_rslora, w_path)
    methods, local, prefixes, saved_targets = [], {}, [], []
    for i, ((r, alpha), modules) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[1])[0])):
        methods.append(cls(r=r, alpha=alpha, target=["^" + re.escape(n) + "$" for n in sorted(modules)],
                           dropout=dropout, use_rslora=use_rslora))
        prefixes.append(f"{i}.")
        saved_targets.append({n: {"shape": [int(layers[n]["lora_B.weight"].shape[0]),
                                            int(layers[n]["lora_A.weight"].shape[1])]} for n in modules})
        for n in modules:
            local[f"{i}.{n}.lora_A"] = layers[n]["lora_A.weight"]
            local[f"{i}.{n}.lora_B"] = layers[n]["lora_B.weight"]
            if use_dora:
                local[f"{i}.{n}.lora_magnitude_vector"] = layers[n]["lora_magnitude_vector"]
    return load_into_new_delta(model, name, methods, local, prefixes, saved_targets)


def _load_into_existing(model, name, cls, layers, groups, use_rslora, w_path) -> str:
    """Load the adapter's tensors into delta `name`, which must hold the same LoRA/DoRA layers (module,
    rank, alpha, rsLoRA) and nothing else: e.g. to resume training of a model sharded with fully_shard,
    whose parameters cannot be replaced. Checks everything first; then copies and activates the delta."""
    st = base._state(model)
    apps = st.deltas[name]
    if st.merged and st.active == name:
        raise RuntimeError(f"delta {name!r} is merged; unmerge(model) before loading into it")
    have = {}
    for a in apps:
        if type(a.method) is not cls or a.method.use_rslora != use_rslora:
            raise ValueError(f"the model already has a delta named {name!r} holding {a.method.describe()}; the "
                             f"adapter is {cls.__name__}{' with rsLoRA' if use_rslora else ''}: remove it, or load "
                             f"the adapter beside it under another name (load_peft_adapter(model, path, name='...'))")
        for n in a.wrappers:
            have[n] = (a, a.method.r, a.method.alpha)
    want = {n: (r, alpha) for (r, alpha), modules in groups.items() for n in modules}
    if set(have) != set(want):
        extra, missing = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise ValueError(f"the model already has a delta named {name!r}, and its layers differ from the adapter's "
                         + (f"(only the adapter has {extra[:3]})" if extra else f"(only the model has {missing[:3]})")
                         + "; remove it, or load the adapter beside it under another name "
                         "(load_peft_adapter(model, path, name='...'))")
    for n, (r, alpha) in want.items():
        if have[n][1:] != (r, alpha):
            raise ValueError(f"{n}: the model's delta {name!r} has r={have[n][1]}, alpha={have[n][2]}; the adapter "
                             f"r={r}, alpha={alpha}")
    todo = []
    for a in apps:
        params = live_params(model, a)
        for n in a.wrappers:
            parts = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
            if cls is DoRA:
                parts["lora_magnitude_vector"] = "lora_magnitude_vector"
            for attr, key in parts.items():
                p, t = params[f"{n}.{attr}"], layers[n][key]
                if tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
                    raise ValueError(f"{w_path}: {n}.{key} has shape {tuple(t.shape)} ({t.dtype}), the model needs "
                                     f"{tuple(p.shape)}")
                todo.append((p, t))
    for p, t in todo:
        copy_full_into(p, t)
    for a in apps:
        for w in a.wrappers.values():
            cache = getattr(w, "_norm_cache", None)
            if cache is not None:
                cache.clear()
    base.activate(model, name)
    return name
