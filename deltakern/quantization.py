"""`deltakern.quantize(model)`: replace a model's linear layers (nn.Linear, and transformers' Conv1D as
in GPT-2) by NF4Linear, in place."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltakern._patterns import match
from deltakern.nn.nf4_linear import NF4Linear


@dataclass
class QuantizeSummary:
    layers: int
    bytes_before: int
    bytes_after: int
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return (f"quantized {self.layers} linear layers to NF4: {self.bytes_before / 2**20:.2f} MiB -> "
                f"{self.bytes_after / 2**20:.2f} MiB ({ratio:.2f}x smaller); skipped {len(self.skipped)}: "
                f"{', '.join(self.skipped) or '-'}")


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def quantize(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
             quant_storage: torch.dtype = torch.uint8, progress: bool = True) -> QuantizeSummary:
    """Replace every nn.Linear (and transformers Conv1D) of `model` (except names matching `skip`) by
    an NF4Linear, in place.

    One layer at a time, on the layer's own device: the extra peak memory is about one layer's
    dense weight. Returns the number of layers and the bytes of their weights before and after.
    Layers on the meta device become empty NF4 layers (`NF4Linear.empty`, no memory), ready for
    `load_state_dict(..., assign=True)`, `set_model_state_dict` or a DCP load after sharding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    from deltakern.nf4 import check_blocksize

    from deltakern.nn.lora import dense_conv1d_weight

    check_blocksize(blocksize)
    targets, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or dense_conv1d_weight(module):
            (skipped if match(name, skip) else targets).append(name)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = tqdm(targets, desc="NF4", unit="layer", disable=not progress) if tqdm else targets
    before = after = 0
    for name in it:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        before += _tensor_bytes(linear)
        q = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant, quant_storage=quant_storage)
        setattr(parent, child, q)
        del linear
        after += q.weight.nbytes + (0 if q.bias is None else q.bias.numel() * q.bias.element_size())
    return QuantizeSummary(len(targets), before, after, skipped)
