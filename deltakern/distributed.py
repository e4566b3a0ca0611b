"""Distributed QLoRA on torch's own engine: FSDP2 (`fully_shard`), DDP, torch.distributed.checkpoint.

Nothing here is needed to shard a deltakern model: NF4Linear keeps its packed codes and block scales
as frozen integer Parameters, so the usual per-layer pattern shards them with plain torch

    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)

and `get_model_state_dict` / `set_model_state_dict` (also `full_state_dict=True,
broadcast_from_rank0=True`) and `torch.distributed.checkpoint.save` / `load` work on it. This module
holds a few conveniences around that:

    shard(model, mesh=None, mp_policy=None)   the pattern above, on the model's main stack of layers
    nf4_bytes(model)                          bytes of the 4-bit base held by this rank
    full_state_dict(model)                    the whole state dict on rank 0, byte-equal to the one a
                                              single process writes (bitsandbytes' format)

Facts that shape it: the NF4 offset is a layer-wide mean, so quantize whole layers before sharding
(`deltakern.quantize` on the full model, or layer by layer, then shard); a per-shard quantization
would not be bit-identical. Mixed precision casts floating parameters only, and the 4-bit parts are
integer tensors, so they stay bit-exact. gloo (CPU) has no ReduceOp.PREMUL_SUM, which FSDP2 uses
only with a custom gradient divide factor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["shard", "nf4_bytes", "full_state_dict"]


def shard(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
          layers: Optional[list] = None) -> nn.Module:
    """`fully_shard` each layer of the model's main stack (`layers`, default: the longest ModuleList of
    >= 2 modules holding the most parameters, e.g. `model.model.layers`), then the root; returns the
    model (sharded in place). `mesh` and `mp_policy` go to every call."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from deltakern.methods import base

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy(), "reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if layers is None:
        stack, _ = base.block_list(model)
        layers = list(model.get_submodule(stack))
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def nf4_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the NF4 base held by this process: `sharded` (this rank's shards of the packed codes
    and block scales), `replicated` (code tables, nested scales, quant-state JSON), and `total` (the
    whole base: what one process holds unsharded)."""
    from deltakern.nn.nf4_linear import NF4Linear, is_dtensor

    sharded = replicated = total = 0
    for m in model.modules():
        if not isinstance(m, NF4Linear):
            continue
        for p in m.nf4_parameters():
            local = p.to_local() if is_dtensor(p) else p
            sharded += local.numel() * local.element_size()
            total += p.numel() * p.element_size()
        for b in m._nf4_scales.buffers():
            replicated += b.numel() * b.element_size()
            total += b.numel() * b.element_size()
    return {"sharded": sharded, "replicated": replicated, "total": total}


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded (or plain) model, gathered: on rank 0 only with `cpu_offload`
    (other ranks get {}), else on every rank. A collective: every rank must call it.

    `get_model_state_dict(full_state_dict=True)` gives the same tensors, except that the quant-state
    JSON of a sharded NF4 layer carries trailing spaces (its fixed length lets a DCP checkpoint load
    into a fresh model). This strips them, so the result is byte-equal to what a single process's
    `model.state_dict()` holds: bitsandbytes' format, loadable by bitsandbytes and transformers.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    for key, value in sd.items():
        if ".quant_state.bitsandbytes__" in key and isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            raw = bytes(value.tolist()).rstrip(b" ")
            sd[key] = torch.tensor(list(raw), dtype=torch.uint8, device=value.device)
    return sd
