"""Adapter: an addition method (new modules next to the frozen model).

Adapter        Houlsby bottleneck after a layer: h + up(act(down(h))), up = 0 at init (no change
               at init). Default placement on transformers models: after the attention output
               projection and after the MLP output projection of every layer (nn.Linear, NF4Linear or
               GPT-2's Conv1D), found by name suffix (attention.output.dense / o_proj / out_proj /
               attn.c_proj; output.dense / down_proj / fc2 / mlp.c_proj / dense_4h_to_h). Other
               models: pass `target`.
"""


from __future__ import annotations

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


def out_features_of(module: nn.Module) -> Optional[int]:
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
            linears = [n for n, m in base.named_modules(model) if n and out_features_of(m) is not None]
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
            dim = out_features_of(base.get_module(model, n))
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
