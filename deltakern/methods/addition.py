"""Addition methods: new modules and tensors next to the frozen model.

Adapter        Houlsby bottleneck after a layer: h + up(act(down(h))), up = 0 at init (no change
               at init). Default placement on transformers models: after the attention output
               projection and after the MLP output projection of every layer (nn.Linear, NF4Linear or
               GPT-2's Conv1D), found by name suffix (attention.output.dense / o_proj / out_proj /
               attn.c_proj; output.dense / down_proj / fc2 / mlp.c_proj / dense_4h_to_h). Other
               models: pass `target`.
PrefixTuning   learned key/value prefixes for every self-attention layer (optionally produced by a
               reparameterization MLP). Works on transformers models whose attention layers call
               the shared attention interface (BERT-, Llama- and GPT-2-like models in transformers 5)
               with the "eager" or "sdpa" implementation: each attention layer gets a private copy of
               its config that points to a deltakern attention function, which prepends the prefix to
               keys/values (after RoPE, like a KV cache) and extends the mask, then calls the
               original implementation. Generation with a KV cache works (the prefix is prepended at
               every step). Not supported: flash/flex attention, cross-attention layers.
PromptTuning   learned soft-prompt embeddings prepended to the input embeddings of a transformers
               model (input_ids -> inputs_embeds in a forward pre-hook; attention_mask,
               token_type_ids and 2-D labels are extended; explicit position_ids move up by the
               prompt length, the prompt taking positions 0..p-1). Outputs with a sequence dimension
               (last_hidden_state, logits, hidden_states) are cut back to the caller's tokens, so
               they line up with the inputs (attention maps are not cut). Note that a pooler reading
               position 0 now reads the first virtual token.
               Generation with a KV cache (model.generate(), use_cache=True by default) works: the call
               with an empty cache (prefill) prepends the prompt, whose keys/values then sit in the
               cache; calls with a non-empty cache (decoding) prepend nothing, and the 2-D
               attention_mask (which covers the caller's tokens only) gets p ones in front, explicit
               position_ids and cache_position move up by p; their outputs are not cut. Such a cache
               must come from this model with the prompt attached (it holds the prompt's p positions
               first); a mask of the wrong length is refused, which also refuses continuing generate()
               from a previous call's cache. Tested: DynamicCache with greedy, sampling, beam search,
               chunked prefill and prompt-lookup decoding. Not supported: static / compileable caches
               (cache_implementation="static"), 4-D attention masks.
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from deltakern.methods import base
from deltakern.methods.base import Application, Method, Plan, register

# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
ATTENTION_OUTPUTS = ("attention.output.dense", "o_proj", "out_proj", "attn.c_proj", "attention.dense", "out_lin")
MLP_OUTPUTS = ("output.dense", "down_proj", "fc2", "mlp.c_proj", "dense_4h_to_h", "lin2")


class Bottleneck(nn.Module):
    """h + scale * up(act(down(h))) with up zero-initialised."""

    _deltakern_internal = True

    def __init__(self, dim: int, bottleneck: int, nonlinearity: str, dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h if h.dtype == self.down.weight.dtype else h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)


class AdapterLayer(nn.Module):
    """A module followed by an adapter: forward = adapter(inner(...)) (first output of a tuple)."""

    _deltakern_wraps = "inner"

    def __init__(self, inner: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.adapter(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self.adapter(out[0]),) + tuple(out[1:])
        raise TypeError(f"Adapter: the wrapped module returned {type(out).__name__}; adapters need a tensor output")


def _out_features(module: nn.Module) -> Optional[int]:
    if base.is_linear(module):
        return base.linear_shape(module)[0]
    n = getattr(module, "out_features", None)
    if n is None and type(module).__name__ == "Conv1D":  # transformers' GPT-2 style linear
        n = getattr(module, "nf", None)
    return int(n) if isinstance(n, int) else None


@register
@dataclass
class Adapter(Method):
    """Houlsby bottleneck adapters: down-project, nonlinearity, up-project (zero init), residual.

    bottleneck:    adapter width
    where:         "both" | "attention" | "mlp": default placement (transformers models, see module doc)
    target:        explicit module names / suffixes / regexes instead of `where` (any model)
    nonlinearity:  "gelu" | "relu" | "silu" | "tanh"
    """

    bottleneck: int = 64
    where: str = "both"
    target: Optional[Union[str, list]] = None
    nonlinearity: str = "gelu"
    kind: ClassVar[str] = "addition"

    def __post_init__(self):
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"Adapter: bottleneck must be a positive int, got {self.bottleneck!r}")
        if self.where not in ("both", "attention", "mlp"):
            raise ValueError(f"Adapter: where must be 'both', 'attention' or 'mlp', got {self.where!r}")
        if self.nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"Adapter: nonlinearity must be one of {sorted(_ACTIVATIONS)}, got {self.nonlinearity!r}")
        self.target = base.as_patterns(self.target, "Adapter")

    def describe(self) -> str:
        return f"Adapter(bottleneck={self.bottleneck})"

    def plan(self, model, delta) -> Plan:
        names = [n for n, _ in base.named_modules(model) if n]
        if self.target is not None:
            chosen = [n for n in names if base.match(n, self.target)]
            if not chosen:
                raise base.no_match_error("Adapter", self.target, names)
        else:
            linears = [n for n, m in base.named_modules(model) if n and _out_features(m) is not None]
            attn = [n for n in linears if base.match(n, ATTENTION_OUTPUTS)]
            mlp = [n for n in linears if n not in attn and base.match(n, MLP_OUTPUTS)]
            chosen = sorted(set((attn if self.where in ("both", "attention") else []) +
                                (mlp if self.where in ("both", "mlp") else [])), key=names.index)
            if not chosen:
                raise ValueError(f"Adapter: found no attention/MLP output projection by name (suffixes "
                                 f"{ATTENTION_OUTPUTS + MLP_OUTPUTS}); pass target=[...] with the modules to follow. "
                                 f"Linear layers: {', '.join(linears[:8]) or '(none)'}")
        plan = Plan()
        for n in chosen:
            dim = _out_features(base.get_module(model, n))
            if dim is None:
                raise ValueError(f"Adapter: cannot tell the output width of {n} "
                                 f"({type(base.get_module(model, n)).__name__}); target linear layers")
            plan.targets[n] = {"type": type(base.get_module(model, n)).__name__, "shape": [dim]}
            b = self.bottleneck
            plan.tensors.update({f"{n}.adapter.down.weight": (b, dim), f"{n}.adapter.down.bias": (b,),
                                 f"{n}.adapter.up.weight": (dim, b), f"{n}.adapter.up.bias": (dim,)})
        return plan

    def build(self, model, plan) -> Application:
        layers, params = {}, {}
        for n in plan.targets:
            outer = base.slot_chain(model, n)[0][2]
            dtype, device = base.base_dtype_device(base.unwrap(outer))
            layer = AdapterLayer(outer, Bottleneck(plan.targets[n]["shape"][0], self.bottleneck, self.nonlinearity,
                                                   dtype, device))
            layer.train(outer.training)
            layers[n] = layer
            for pname, p in layer.adapter.named_parameters():
                params[f"{n}.adapter.{pname}"] = p
        return _AdapterApplication(self, plan, params, layers)


class _AdapterApplication(Application):
    def __init__(self, method, plan, params, layers):
        super().__init__(method, plan, params)
        self.layers = layers

    def attach(self, model):
        done = []
        try:
            for n, layer in self.layers.items():
                parent, attr, outer = base.slot_chain(model, n)[0]
                if outer is not layer.inner:
                    raise RuntimeError(f"{n}: the module was replaced outside deltakern since this delta was made")
                dtype, device = base.base_dtype_device(base.unwrap(outer))
                base.follow(layer.adapter.parameters(), dtype, device)
                layer.train(outer.training)
                setattr(parent, attr, layer)
                done.append((n, layer))
        except Exception:
            for n, layer in reversed(done):
                base.replace_in_slot(model, n, layer, layer.inner)
            raise

    def detach(self, model):
        for n, layer in reversed(list(self.layers.items())):
            base.replace_in_slot(model, n, layer, layer.inner)

    def forget_wrappers(self, unwrapped: dict):
        for layer in self.layers.values():
            while layer.inner in unwrapped:
                layer.inner = unwrapped[layer.inner]


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
        k_out, v_out = _out_features(k), _out_features(v)
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


# ---------------------------------------------------------------------------------------------
# PromptTuning
# ---------------------------------------------------------------------------------------------

class SoftPrompt(nn.Module):
    _deltakern_internal = True

    def __init__(self, tokens, hidden, dtype=None, device=None):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(tokens, hidden, dtype=dtype, device=device))


def _input_embeddings(model):
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if emb is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError("PromptTuning needs a model with get_input_embeddings() returning an embedding layer "
                         f"(a transformers model); {type(model).__name__} has none")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "inputs_embeds" not in params:
        raise ValueError(f"PromptTuning: {type(model).__name__}.forward takes no inputs_embeds argument")
    return emb


def _positional_names(model):
    sig = inspect.signature(model.forward)
    return [p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _check_mask(mask):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("PromptTuning supports 2-D attention masks [batch, tokens] only (generate() passes a 4-D "
                         "mask with a static cache, which PromptTuning does not support)")


def _past_length(past) -> int:
    """Tokens held by a KV cache (a transformers Cache, or the legacy tuple of per-layer (key, value))."""
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(past, (tuple, list)):
        if not past:
            return 0
        first = past[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor) and first[0].dim() >= 2:
            return int(first[0].shape[-2])
    raise TypeError(f"PromptTuning: cannot tell the length of past_key_values of type {type(past).__name__}")


@register
@dataclass
class PromptTuning(Method):
    """Prompt-tuning: `num_virtual_tokens` learned input embeddings prepended to every sequence.

    init:            "vocab" (copies of randomly chosen token embeddings) or "random" (normal with the
                     embedding table's std)
    init_token_ids:  start from these tokens' embeddings instead (repeated to the prompt length), e.g. the
                     tokenized task description
    See the module docstring for how inputs and outputs are handled.
    """

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_token_ids: Optional[list] = None
    kind: ClassVar[str] = "addition"

    def __post_init__(self):
        v = self.num_virtual_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"PromptTuning: num_virtual_tokens must be a positive int, got {v!r}")
        if self.init not in ("vocab", "random"):
            raise ValueError(f"PromptTuning: init must be 'vocab' or 'random', got {self.init!r}")
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if isinstance(ids, torch.Tensor):
                ids = ids.flatten().tolist()
            if (not isinstance(ids, (list, tuple)) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise ValueError(f"PromptTuning: init_token_ids must be a non-empty list of token ids, got {ids!r}")
            self.init_token_ids = list(ids)

    def describe(self) -> str:
        return f"PromptTuning({self.num_virtual_tokens} tokens)"

    def plan(self, model, delta) -> Plan:
        if any(isinstance(a.method, PromptTuning) for a in delta):
            raise ValueError("PromptTuning: this delta already has a PromptTuning")
        emb = _input_embeddings(model)
        cname = next((n for n, m in base.named_modules(model) if m is emb), "input_embeddings")
        vocab, hidden = emb.weight.shape
        if self.init_token_ids is not None and max(self.init_token_ids) >= vocab:
            raise ValueError(f"PromptTuning: init_token_ids has id {max(self.init_token_ids)}, the vocabulary has {vocab}")
        plan = Plan()
        plan.targets[cname] = {"type": type(emb).__name__, "shape": [int(vocab), int(hidden)]}
        plan.tensors["prompt.embedding"] = (self.num_virtual_tokens, int(hidden))
        return plan

    def build(self, model, plan) -> Application:
        emb = _input_embeddings(model)
        w = emb.weight.detach()
        p = self.num_virtual_tokens
        prompt = SoftPrompt(p, w.shape[1], w.dtype, w.device)
        with torch.no_grad():
            if self.init_token_ids is not None:
                ids = (self.init_token_ids * (-(-p // len(self.init_token_ids))))[:p]
                prompt.embedding.copy_(w[torch.tensor(ids, device=w.device)])
            elif self.init == "vocab":
                prompt.embedding.copy_(w[torch.randint(0, w.shape[0], (p,), device=w.device)])
            else:
                prompt.embedding.normal_(0.0, float(w.float().std()))
        return _PromptApplication(self, plan, {"prompt.embedding": prompt.embedding}, prompt)


class _PromptApplication(Application):
    attr = "deltakern_prompt"

    def __init__(self, method, plan, params, prompt):
        super().__init__(method, plan, params)
        self.prompt = prompt
        self.handles = []
        self.pending = []

    def attach(self, model):
        root = model
        if self.attr in root._modules:
            raise RuntimeError("another PromptTuning is attached to this model")
        emb = _input_embeddings(model)
        base.follow([self.prompt.embedding], emb.weight.dtype, emb.weight.device)
        self.names = _positional_names(model)
        root.add_module(self.attr, self.prompt)
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post)]

    def detach(self, model):
        for h in self.handles:
            h.remove()
        self.handles = []
        if model._modules.get(self.attr) is self.prompt:
            del model._modules[self.attr]

    def _pre(self, module, args, kwargs):
        kwargs = dict(kwargs)
        for name, a in zip(self.names, args):
            if name in kwargs:
                raise TypeError(f"{type(module).__name__}.forward got {name!r} twice")
            kwargs[name] = a
        if len(args) > len(self.names):
            raise TypeError("PromptTuning: too many positional arguments")
        past_kv = kwargs.get("past_key_values")
        if getattr(past_kv, "is_compileable", False):
            raise NotImplementedError(
                f"PromptTuning does not support static / compileable KV caches ({type(past_kv).__name__}); use the "
                "default dynamic cache (generate() without cache_implementation='static')")
        past = _past_length(past_kv)
        if past > 0:
            return self._decode(module, kwargs, past)
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("PromptTuning: the model was called without input_ids or inputs_embeds")
            embeds = module.get_input_embeddings()(ids)
        b, p = embeds.shape[0], self.prompt.embedding.shape[0]
        prompt = self.prompt.embedding.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], 1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            _check_mask(mask)
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], 1)
        for key, fill in (("token_type_ids", 0), ("labels", -100)):
            t = kwargs.get(key)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                kwargs[key] = torch.cat([t.new_full((b, p), fill), t], 1)
        pos = kwargs.get("position_ids")
        if pos is not None:  # the prompt takes positions 0..p-1, the caller's tokens move up by p
            if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
                raise ValueError("PromptTuning supports 2-D position_ids [batch, tokens] only")
            first = torch.arange(p, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], p)
            kwargs["position_ids"] = torch.cat([first, pos + p], 1)
        cache_pos = kwargs.get("cache_position")
        if isinstance(cache_pos, torch.Tensor):  # older / remote-code models: the prompt fills cache slots 0..p-1
            first = torch.arange(p, dtype=cache_pos.dtype, device=cache_pos.device)
            kwargs["cache_position"] = torch.cat([first, cache_pos + p], -1)
        self.pending.append((p, embeds.shape[1] + p))
        return (), kwargs

    def _decode(self, module, kwargs, past):
        """A call with a non-empty KV cache: the prompt's p positions are already in the cache. Nothing is
        prepended; the mask gets p ones in front, positions move up by p, the output is not cut."""
        p = self.prompt.embedding.shape[0]
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            raise ValueError("PromptTuning: the model was called without input_ids or inputs_embeds")
        q = x.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            _check_mask(mask)
            if past < p or mask.shape[1] != past - p + q:
                raise ValueError(
                    f"PromptTuning: with a KV cache of {past} positions and {q} new tokens the attention mask must "
                    f"cover the caller's tokens only, {past - p + q} (the cache holds the {p} prompt positions "
                    f"first), got {mask.shape[1]}. The cache must come from this model with the prompt attached, "
                    "starting from an empty cache; continuing generate() from a previous call's cache is not "
                    "supported")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], 1)
        elif past < p:
            raise ValueError(f"PromptTuning: the KV cache holds {past} positions, fewer than the {p} prompt "
                             "positions; it must come from this model with the prompt attached")
        pos = kwargs.get("position_ids")
        if pos is not None:
            if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
                raise ValueError("PromptTuning supports 2-D position_ids [batch, tokens] only")
            kwargs["position_ids"] = pos + p
        cache_pos = kwargs.get("cache_position")
        if isinstance(cache_pos, torch.Tensor):
            kwargs["cache_position"] = cache_pos + p
        self.pending.append((0, q))
        return (), kwargs

    def _post(self, module, args, output):
        if not self.pending:
            return output
        p, total = self.pending.pop()
        if p == 0:  # a decoding call with a KV cache: nothing was prepended
            return output

        def cut(t):
            return t[:, p:] if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == total else t

        if isinstance(output, torch.Tensor):
            return cut(output)
        if hasattr(output, "keys") and hasattr(output, "__setitem__"):
            for key in ("last_hidden_state", "logits", "hidden_states"):
                v = output.get(key) if hasattr(output, "get") else None
                if isinstance(v, tuple):
                    output[key] = tuple(cut(t) for t in v)
                elif v is not None:
                    output[key] = cut(v)
            return output
        if isinstance(output, tuple) and output:
            return (cut(output[0]),) + tuple(output[1:])
        return output
