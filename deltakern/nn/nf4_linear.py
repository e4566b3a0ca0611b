"""NF4Linear: a linear layer with a frozen NF4 weight and an optional bias.

The state dict holds the weight in bitsandbytes' Linear4bit format (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`), so a checkpoint loads in either library.

Storage, chosen so that torch's own distributed tools handle the 4-bit base unchanged:

* the packed codes and the block scales (absmax) are frozen Parameters (requires_grad=False), so
  `torch.distributed.fsdp.fully_shard` shards them on dim 0 like any weight and all-gathers them
  bit-exactly for the forward. They are integer tensors (uint8 codes; absmax uint8 when
  double-quantized, else the fp32 scales' bits held as int32), so mixed precision never casts them
  and optimizers, Freeze and `.to(dtype)` leave them alone;
* the small tables (quant_map, nested_quant_map, nested_absmax) and the quant-state JSON are
  buffers, replicated on every rank; the nested offset is a Python float;
* each tensor lives in a small internal holder module under exactly the name its state-dict key has
  (`weight`, `weight.absmax`, ...), and `_fqn_modifiers` tells torch.distributed.checkpoint to skip
  the holders, so `get_model_state_dict` / `set_model_state_dict` (also with
  `broadcast_from_rank0=True`) and DCP see one parameter or buffer per bitsandbytes key.

`layer.weight` assembles an `NF4Weight` from these tensors (sharded DTensors outside the forward of
an FSDP-sharded model; `nf4.dequantize` then gathers them).

The quant-state JSON's length depends on the offset's decimal digits. A sharded layer's state dict
pads it with trailing spaces to a length fixed by shape, blocksize and dtype (valid JSON, read by
bitsandbytes and deltakern alike), so a DCP checkpoint loads into a freshly built model, whose offset
differs; an unsharded layer writes bitsandbytes' exact bytes.
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from deltakern import _codes, nf4
from deltakern.autograd.linear import linear as _linear

_HOLDERS = ("_nf4_codes", "_nf4_scales")
_META = ("shape", "dtype", "blocksize", "quant_type", "offset", "nested_blocksize", "quant_storage")
# the widest repr of a float (17 significant digits, sign, exponent): pads the JSON to a fixed length
_WIDEST_FLOAT = -2.2250738585072014e-308


class _Holder(nn.Module):
    """Holds some of an NF4Linear's tensors under their state-dict names; the NF4Linear writes and
    reads the state dict, so a holder's own state dict is empty."""

    _deltakern_internal = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the tensors; a dtype cast (`.to(dtype)`, `.half()`) leaves them as
        they are: they are the format itself."""
        keep = {k: t for k, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self


def is_dtensor(t) -> bool:
    """Whether `t` is a torch DTensor (without importing torch.distributed where nobody has)."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def quant_state_blob(weight: nf4.NF4Weight, fixed_length: bool = False) -> torch.Tensor:
    """bitsandbytes' quant-state JSON as a uint8 tensor; `fixed_length` pads it with spaces to a length
    that does not depend on the offset's value."""
    blob = weight.to_bnb_state_dict("w")[f"w.quant_state.bitsandbytes__{weight.quant_type}"]
    if not fixed_length or not weight.nested:
        return blob.to(weight.device)
    meta = json.loads(bytes(blob.tolist()).decode("utf-8"))
    meta["nested_offset"] = _WIDEST_FLOAT
    width = len(json.dumps(meta).encode("utf-8"))
    return torch.nn.functional.pad(blob, (0, width - blob.numel()), value=ord(" ")).to(weight.device)


class NF4Linear(nn.Module):
    def __init__(self, weight: nf4.NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.bias = bias
        self.set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True, quant_storage=torch.uint8):
        """Quantize an nn.Linear, or a transformers Conv1D (GPT-2 style, weight [in, out]: its
        transpose is quantized, so the NF4Linear computes the same x W + b). A layer on the meta
        device gives an empty NF4Linear on the meta device (see `empty`)."""
        from deltakern.nn.lora import dense_conv1d_weight

        if isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        elif dense_conv1d_weight(linear):
            weight = linear.weight.detach().t()
        else:
            raise TypeError(f"from_linear needs an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach()
        if weight.is_meta:
            module = cls.empty(tuple(weight.shape), weight.dtype, bias is not None, blocksize, double_quant,
                               quant_storage, device="meta")
            if bias is not None:
                module.bias.requires_grad_(linear.bias.requires_grad)
            return module
        q = nf4.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_storage=quant_storage)
        module = cls(q, bias)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    @classmethod
    def empty(cls, shape, dtype=torch.bfloat16, bias: bool = False, blocksize: int = 64, double_quant: bool = True,
              quant_storage=torch.uint8, quant_type: str = "nf4", device="meta") -> "NF4Linear":
        """An NF4Linear of the given shape whose tensors are allocated but not filled (on the meta
        device by default: no memory), ready for `load_state_dict`, `set_model_state_dict` or a DCP
        load. Its offset is 0.0 until loaded; do not compute with it before."""
        nf4.check_blocksize(blocksize)
        if quant_type not in nf4.QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {nf4.QUANT_TYPES}, got {quant_type!r}")
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be [out_features, in_features] > 0, got {tuple(shape)}")
        out_f, in_f = (int(s) for s in shape)
        n = out_f * in_f
        blocks = -(-n // blocksize)
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        if ((n + 1) // 2) % itemsize:
            raise ValueError(f"{(n + 1) // 2} packed bytes do not fill whole {quant_storage} elements")
        code = _codes.nf4_code("cpu") if quant_type == "nf4" else _codes.fp4_code("cpu")
        weight = nf4.NF4Weight(
            packed=torch.empty(((n + 1) // 2) // itemsize, 1, dtype=quant_storage, device=device),
            absmax=torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            shape=torch.Size((out_f, in_f)), dtype=dtype, blocksize=blocksize, code=code.to(device),
            quant_type=quant_type,
            nested_absmax=torch.empty(-(-blocks // nf4.NESTED_BLOCKSIZE), device=device) if double_quant else None,
            nested_code=_codes.dynamic_map("cpu").to(device) if double_quant else None,
            quant_storage=quant_storage,
        )
        b = torch.empty(out_f, dtype=dtype, device=device) if bias else None
        return cls(weight, b)

    # ---- the tensors ---------------------------------------------------------------------------
    def _fqn_modifiers(self) -> dict[str, str]:
        """For torch.distributed.checkpoint: the holders do not appear in state-dict names."""
        return {h: h for h in _HOLDERS}

    @property
    def nested(self) -> bool:
        """Whether the block scales are double-quantized."""
        return "nested_absmax" in self._nf4_scales.weight._buffers

    @property
    def is_sharded(self) -> bool:
        """Whether the packed codes are a DTensor (the layer was sharded, e.g. by fully_shard)."""
        return "_nf4_codes" in self._modules and is_dtensor(self._nf4_codes._parameters["weight"])

    def nf4_parameters(self) -> list[nn.Parameter]:
        """The frozen Parameters holding the packed codes and the block scales."""
        return [self._nf4_codes._parameters["weight"], self._nf4_scales.weight._parameters["absmax"]]

    def set_weight(self, weight: nf4.NF4Weight):
        """Replace the frozen weight (same shape), e.g. after merging a delta and requantizing.

        On a sharded layer (FSDP) the new weight must have the same format (nested, quant type,
        blocksize, storage); each rank copies its own shard of the new codes and scales in place.
        """
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if hasattr(self, "_meta") and tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this layer is "
                             f"{(self.out_features, self.in_features)}")
        meta = {k: getattr(weight, k) for k in _META}
        if hasattr(self, "_meta") and self.is_sharded:
            self._set_sharded(weight, meta)
            return
        absmax = weight.absmax if weight.nested else weight.absmax.view(torch.int32)
        codes, scales, parts, state = _Holder(), _Holder(), _Holder(), _Holder()
        codes.register_parameter("weight", nn.Parameter(weight.packed, requires_grad=False))
        parts.register_parameter("absmax", nn.Parameter(absmax, requires_grad=False))
        parts.register_buffer("quant_map", weight.code)
        if weight.nested:
            parts.register_buffer("nested_absmax", weight.nested_absmax)
            parts.register_buffer("nested_quant_map", weight.nested_code)
        state.register_buffer(f"bitsandbytes__{weight.quant_type}", quant_state_blob(weight, fixed_length=True))
        parts.quant_state = state
        scales.weight = parts
        self._nf4_codes, self._nf4_scales = codes, scales
        self._meta = meta

    def _set_sharded(self, weight: nf4.NF4Weight, meta: dict):
        old = self._meta
        for k in ("blocksize", "quant_type", "nested_blocksize", "quant_storage"):
            if old[k] != meta[k]:
                raise ValueError(f"this layer is sharded: its {k} is {old[k]!r} and cannot become {meta[k]!r} "
                                 f"(build the layer with that format before sharding it)")
        if weight.nested != self.nested:
            raise ValueError(f"this layer is sharded: double quantization is {self.nested} and cannot change")
        absmax = weight.absmax if weight.nested else weight.absmax.view(torch.int32)
        with torch.no_grad():
            for param, full in zip(self.nf4_parameters(), (weight.packed, absmax)):
                _copy_shard(param, full)
            parts = self._nf4_scales.weight
            parts.quant_map.copy_(weight.code)
            if weight.nested:
                parts.nested_absmax.copy_(weight.nested_absmax)
                parts.nested_quant_map.copy_(weight.nested_code)
        self._meta = meta
        parts.quant_state._buffers[f"bitsandbytes__{weight.quant_type}"] = quant_state_blob(weight, fixed_length=True)

    @property
    def weight(self) -> nf4.NF4Weight:
        """The NF4 weight, assembled from this module's (current-device) tensors."""
        parts = self._nf4_scales.weight
        packed, absmax = self.nf4_parameters()
        if packed.dtype != self._meta["quant_storage"]:
            raise TypeError(f"the packed codes were cast to {packed.dtype} (stored as {self._meta['quant_storage']}); "
                            f"FSDP mixed precision casts floating parameters: use quant_storage=torch.uint8")
        nested = self.nested
        if not nested:
            absmax = _view(absmax, torch.float32)
        tensors = (packed, absmax, parts.quant_map, parts.nested_absmax if nested else None,
                   parts.nested_quant_map if nested else None)
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self.__dict__.get("_nf4_weight")
        if cached is not None and all(a is b for a, b in zip(cached[0], tensors)):
            return cached[1]  # the same tensors: keep the object, and with it its decoded-scale memo
        w = nf4.NF4Weight(packed=packed, absmax=absmax, code=tensors[2], nested_absmax=tensors[3],
                          nested_code=tensors[4], **self._meta)
        if not compiling:
            self.__dict__["_nf4_weight"] = (tensors, w)
        return w

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_nf4_weight", None)  # moved or cast tensors: assemble the weight anew
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, NF4Linear expects {self.in_features}")
        # deltakern's frozen linear: NF4 weights go through the backends' kernels (decode GEMVs for a few
        # rows, else dequantize + GEMM) instead of a dense copy built here; gradients for x and the bias
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            bias = bias.to(x.dtype)
        return _linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{m['quant_type']}, blocksize={m['blocksize']}, nested={self.nested}, weight_dtype={_short(m['dtype'])}, "
                "compute_dtype=x.dtype (the weight is dequantized to the input's dtype)")

    # ---- state dict in bitsandbytes' format ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        w = self.weight
        sd = w.to_bnb_state_dict(prefix + "weight")
        if self.is_sharded:  # DCP loads in place: hand out the buffer, of a fixed length
            key = f"{prefix}weight.quant_state.bitsandbytes__{w.quant_type}"
            sd[key] = self._nf4_scales.weight.quant_state._buffers[f"bitsandbytes__{w.quant_type}"]
        for key, value in sd.items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if not own:
            missing_keys.append(prefix + "weight")
        else:
            try:
                weight = nf4.NF4Weight.from_bnb_state_dict(state_dict, prefix + "weight")
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"checkpoint weight has shape {tuple(weight.shape)}, module expects "
                                     f"{(self.out_features, self.in_features)}")
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
                return  # load nothing of this module, the bias included
            if not self.is_sharded:
                weight = weight.gathered()
                device = self._nf4_codes.weight.device
                weight = weight.to(device) if device.type != "meta" else weight
            self.set_weight(weight)
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.view(dtype) (same element size), for a DTensor too (its local shard reinterpreted)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and is_dtensor(t):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t.to_local().view(dtype), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t.view(dtype)


def _copy_shard(param: torch.Tensor, src: torch.Tensor):
    """Copy the bits of `src` (the whole tensor, or a DTensor) into this rank's shard of DTensor `param`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = param.to_local()
    if isinstance(src, DTensor):
        if src.device_mesh != param.device_mesh or tuple(src.placements) != tuple(param.placements):
            src = src.full_tensor()
        else:
            src = src.to_local()
            if src.dtype != local.dtype:
                src = src.view(local.dtype)
            if src.data_ptr() != local.data_ptr():
                local.copy_(src)
            return
    if src.dtype != local.dtype:
        src = src.view(local.dtype)
    if tuple(src.shape) != tuple(param.shape):
        raise ValueError(f"expected a tensor of shape {tuple(param.shape)}, got {tuple(src.shape)}")
    shard = distribute_tensor(src.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
    local.copy_(shard.to_local())


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
