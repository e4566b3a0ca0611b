"""PromptTuning: an addition method (learned soft-prompt embeddings before the input).

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

import inspect
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from deltakern.methods import base
from deltakern.methods.base import Application, Method, Plan, register

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
