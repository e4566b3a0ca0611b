"""delta_state_dict and summary: the active delta's tensors, and trainable parameters per method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from deltakern.methods.base import _state
from deltakern.methods.deltas import _check_model, resolve_name
from deltakern.nf4 import NF4Weight


def delta_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The delta's tensors only, keyed "<method index>.<key>" (e.g. "0.encoder.layer.0.attention.self.query.lora_A")."""
    name = resolve_name(model, name)
    out = {}
    for i, app in enumerate(_state(model).deltas[name]):
        for key, p in app.params.items():
            out[f"{i}.{key}"] = p.detach()
    return out



def _model_numel(model: nn.Module) -> int:
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
