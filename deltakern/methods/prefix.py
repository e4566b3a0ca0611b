"""PrefixTuning: an addition method (learned key/value prefixes in every self-attention layer).

PrefixTuning   learned key/value prefixes for every self-attention layer (optionally produced by a
               reparameterization MLP). Works on transformers models whose attention layers call
               the shared attention interface (BERT-, Llama- and GPT-2-like models in transformers 5)
               with the "eager" or "sdpa" implementation: each attention layer gets a private copy of
               its config that points to a deltakern attention function, which prepends the prefix to
               keys/values (after RoPE, like a KV cache) and extends the mask, then calls the
               original implementation. Generation with a KV cache works (the prefix is prepended at
               every step). Not supported: flash/flex attention, cross-attention layers.
"""


from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from deltakern.methods import base
from deltakern.methods.adapter import out_features_of
from deltakern.methods.base import Application, Method, Plan, register

# ---------------------------------------------------------------------------------------------
# PrefixTuning
# ---------------------------------------------------------------------------------------------

_ATTN_IMPL = "deltakern_prefix"
_K_NAMES = ("k_proj", "key", "k_lin", "k")
_V_NAMES = ("v_proj", "value", "v_lin", "v")
_QKV_NAMES = ("c_attn",)  # fused query/key/value projection (GPT-2)
_registered = False


def _register_attention():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_IMPL, _prefix_attention)
    _registered = True


def _child(module, names):
    for n in names:
        m = module._modules.get(n)
        if m is not None:
            return base.unwrap(m)
    return None


def _is_self_attention(module) -> bool:
    cfg = getattr(module, "config", None)
    return (cfg is not None and hasattr(cfg, "_attn_implementation") and "cross" not in type(module).__name__.lower()
            and not getattr(module, "is_cross_attention", False)
            and ((_child(module, _K_NAMES) is not None and _child(module, _V_NAMES) is not None)
                 or _child(module, _QKV_NAMES) is not None))


def _geometry(cname, module) -> tuple[int, int, int]:
    """(key/value heads, head dim, hidden size) of an attention layer."""
    k, v = _child(module, _K_NAMES), _child(module, _V_NAMES)
    cfg = module.config
    d = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) or getattr(cfg, "head_dim", None)
    if not d and getattr(cfg, "num_attention_heads", None) and getattr(cfg, "hidden_size", None):
        d = cfg.hidden_size // cfg.num_attention_heads
    if k is None or v is None:  # fused q/k/v projection: as many key/value heads as query heads
        heads = getattr(module, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
        k_out = v_out = heads * d if heads and d else None
        hidden = getattr(cfg, "hidden_size", None)
    else:
        k_out, v_out = out_features_of(k), out_features_of(v)
        hidden = base.linear_shape(k)[1] if base.is_linear(k) else getattr(k, "in_features", None)
    if not (k_out and v_out and hidden and d) or k_out != v_out or k_out % d:
        raise ValueError(f"PrefixTuning: cannot read the key/value geometry of {cname} ({type(module).__name__})")
    return k_out // d, int(d), int(hidden)


def _kv_dtype_device(module):
    k = _child(module, _K_NAMES)
    return base.base_dtype_device(k if k is not None else _child(module, _QKV_NAMES))


def _original_attention(module, impl):
    if impl in (None, "eager"):
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"PrefixTuning: cannot find the eager attention function of {type(module).__name__}")
        return fn, True
    if impl == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"], False
    raise ValueError(f"PrefixTuning supports the 'eager' and 'sdpa' attention implementations, the model uses "
                     f"{impl!r}; load it with attn_implementation='sdpa'")


class PrefixEncoder(nn.Module):
    """Key/value prefixes [layers, 2, kv heads, tokens, head dim], direct or from an MLP."""

    _deltakern_internal = True

    def __init__(self, layers, heads, tokens, head_dim, hidden, projection, projection_hidden, dtype=None, device=None):
        super().__init__()
        self.layers, self.heads, self.tokens, self.head_dim = layers, heads, tokens, head_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(tokens, hidden, dtype=dtype, device=device))
            self.mlp = nn.Sequential(nn.Linear(hidden, projection_hidden, dtype=dtype, device=device), nn.Tanh(),
                                     nn.Linear(projection_hidden, layers * 2 * heads * head_dim, dtype=dtype,
                                               device=device))
        else:
            self.kv = nn.Parameter(0.02 * torch.randn(layers, 2, heads, tokens, head_dim, dtype=dtype, device=device))

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.projection:
            return self.kv[i, 0], self.kv[i, 1]
        h = self.mlp[1](self.mlp[0](self.embedding))
        rows = 2 * self.heads * self.head_dim
        out = nn.functional.linear(h, self.mlp[2].weight[i * rows:(i + 1) * rows], self.mlp[2].bias[i * rows:(i + 1) * rows])
        out = out.view(self.tokens, 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return out[0], out[1]


def _extend_mask(mask, module, query, s_len, p_len, kwargs, eager):
    t_len = query.shape[2]
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if not causal or t_len == 1:
            return None
        dev = query.device
        allowed = torch.arange(s_len, device=dev)[None, :] <= torch.arange(t_len, device=dev)[:, None] + (s_len - t_len)
        allowed = torch.cat([torch.ones(t_len, p_len, dtype=torch.bool, device=dev), allowed], 1)[None, None]
        if eager:
            return torch.zeros(allowed.shape, dtype=query.dtype, device=dev).masked_fill(~allowed,
                                                                                         torch.finfo(query.dtype).min)
        return allowed
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], p_len, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], p_len, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], -1)


def _prefix_attention(module, query, key, value, attention_mask, *args, **kwargs):
    slot = module.__dict__.get("_deltakern_prefix")
    if slot is None:  # a config copy outlived its prefix: behave like sdpa
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    encoder, index, fn, eager = slot
    k_p, v_p = encoder.layer_kv(index)
    b, s_len = key.shape[0], key.shape[2]
    p_len = k_p.shape[1]
    key = torch.cat([k_p.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1), key], 2)
    value = torch.cat([v_p.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1), value], 2)
    attention_mask = _extend_mask(attention_mask, module, query, s_len, p_len, kwargs, eager)
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


def _attention_layers(model):
    return [(n, m) for n, m in base.named_modules(model) if n and _is_self_attention(m)]


@register
@dataclass
class PrefixTuning(Method):
    """Prefix-tuning: `num_virtual_tokens` learned key/value vectors per self-attention layer.

    projection:         produce the prefixes with an MLP (embedding -> Linear -> tanh -> Linear), which
                        trains more stably; the MLP is part of the delta
    projection_hidden:  MLP width (default: the model's hidden size)
    target:             attention modules to give a prefix (default: every self-attention layer)
    See the module docstring for what it supports.
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: Optional[int] = None
    target: Optional[Union[str, list]] = None
    kind: ClassVar[str] = "addition"

    def __post_init__(self):
        for f in ("num_virtual_tokens",) + (("projection_hidden",) if self.projection_hidden is not None else ()):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"PrefixTuning: {f} must be a positive int, got {v!r}")
        if not isinstance(self.projection, bool):
            raise ValueError(f"PrefixTuning: projection must be True or False, got {self.projection!r}")
        self.target = base.as_patterns(self.target, "PrefixTuning")

    def describe(self) -> str:
        return f"PrefixTuning({self.num_virtual_tokens} tokens{', MLP' if self.projection else ''})"

    def plan(self, model, delta) -> Plan:
        if any(isinstance(a.method, PrefixTuning) for a in delta):
            raise ValueError("PrefixTuning: this delta already has a PrefixTuning")
        layers = _attention_layers(model)
        if not layers:
            raise ValueError("PrefixTuning needs a transformers model whose self-attention layers call the attention "
                             f"interface (BERT-, Llama-, GPT-2-like); found none in {type(model).__name__}")
        if self.target is not None:
            chosen = [(n, m) for n, m in layers if base.match(n, self.target)]
            if not chosen:
                raise base.no_match_error("PrefixTuning", self.target, [n for n, _ in layers], "attention layers")
            layers = chosen
        geo = {n: _geometry(n, m) for n, m in layers}
        first = next(iter(geo.values()))
        for n, g in geo.items():
            if g != first:
                raise ValueError(f"PrefixTuning: attention layers differ in shape ({n}: {g} vs {first}); target one kind")
        heads, d, hidden = first
        for n, m in layers:
            _original_attention(m, m.config._attn_implementation)  # refuse unsupported implementations now
        plan = Plan()
        for n, m in layers:
            plan.targets[n] = {"type": type(m).__name__, "shape": [heads, d]}
        p, n_layers = self.num_virtual_tokens, len(layers)
        if self.projection:
            ph = self.projection_hidden or hidden
            plan.tensors.update({"prefix.embedding": (p, hidden), "prefix.mlp.0.weight": (ph, hidden),
                                 "prefix.mlp.0.bias": (ph,), "prefix.mlp.2.weight": (n_layers * 2 * heads * d, ph),
                                 "prefix.mlp.2.bias": (n_layers * 2 * heads * d,)})
        else:
            plan.tensors["prefix.kv"] = (n_layers, 2, heads, p, d)
        plan.hidden = hidden
        return plan

    def build(self, model, plan) -> Application:
        _register_attention()
        names = list(plan.targets)
        heads, d = plan.targets[names[0]]["shape"]
        dtype, device = _kv_dtype_device(base.get_module(model, names[0]))
        hidden = getattr(plan, "hidden", None) or plan.tensors.get("prefix.embedding", (0, 0))[1]
        enc = PrefixEncoder(len(names), heads, self.num_virtual_tokens, d, hidden, self.projection,
                            self.projection_hidden or hidden, dtype, device)
        params = {f"prefix.{n}": p for n, p in enc.named_parameters()}
        return _PrefixApplication(self, plan, params, enc)


class _PrefixApplication(Application):
    attr = "deltakern_prefix"

    def __init__(self, method, plan, params, encoder):
        super().__init__(method, plan, params)
        self.encoder = encoder
        self.configs = {}

    def attach(self, model):
        root = base.unwrap(model)
        if self.attr in root._modules:
            raise RuntimeError("another PrefixTuning is attached to this model")
        layers = [(n, base.get_module(model, n)) for n in self.plan.targets]
        fns = [_original_attention(m, m.config._attn_implementation) for _, m in layers]
        dtype, device = _kv_dtype_device(layers[0][1])
        base.follow(self.encoder.parameters(), dtype, device)
        self.encoder.train(root.training)
        root.add_module(self.attr, self.encoder)
        for i, ((n, m), (fn, eager)) in enumerate(zip(layers, fns)):
            self.configs[n] = m.config
            cfg = copy.copy(m.config)
            cfg.__dict__["_attn_implementation_internal"] = _ATTN_IMPL
            m.__dict__["_deltakern_prefix"] = (self.encoder, i, fn, eager)
            m.config = cfg

    def detach(self, model):
        root = base.unwrap(model)
        for n in self.plan.targets:
            m = base.get_module(model, n)
            m.__dict__.pop("_deltakern_prefix", None)
            if n in self.configs:
                m.config = self.configs.pop(n)
        if root._modules.get(self.attr) is self.encoder:
            del root._modules[self.attr]
