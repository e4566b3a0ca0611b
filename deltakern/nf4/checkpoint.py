"""bitsandbytes checkpoints: the keys and tensors a Linear4bit writes for its weight, read and written
bit-exactly (NF4Weight.from_bnb_state_dict / to_bnb_state_dict call these)."""

from __future__ import annotations

import json
from typing import Mapping

import torch

from deltakern.nf4.weight import _DTYPE_NAMES, NESTED_BLOCKSIZE, QUANT_TYPES, NF4Weight, _dtype_name


def read_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
    """Read the keys a bitsandbytes Linear4bit saves for its weight named `prefix`.

    Keys: `{prefix}`, `{prefix}.absmax`, `{prefix}.quant_map`, `{prefix}.quant_state.bitsandbytes__nf4`
    (or `__fp4`), and when double-quantized `{prefix}.nested_absmax`, `{prefix}.nested_quant_map`.
    Everything is validated before the weight is built, so a bad checkpoint loads nothing.
    """
    state_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(state_keys) != 1:
        raise ValueError(
            f"expected exactly one '{prefix}.quant_state.bitsandbytes__nf4' (or __fp4) key, found "
            f"{state_keys or 'none'}"
        )
    quant_type = state_keys[0].rsplit("__", 1)[1]
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant type {quant_type!r} in key {state_keys[0]!r}")
    meta = _parse_quant_state(state_dict[state_keys[0]], state_keys[0])
    if meta.get("quant_type", quant_type) != quant_type:
        raise ValueError(f"quant state says {meta['quant_type']!r} but its key says {quant_type!r}")
    nested = "nested_offset" in meta
    needed = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"]
    if nested:
        needed += [f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"bitsandbytes state dict is missing keys: {missing}")
    try:
        dtype = _DTYPE_NAMES[meta["dtype"]]
        shape = torch.Size(int(s) for s in meta["shape"])
        blocksize = int(meta["blocksize"])
        offset = float(meta["nested_offset"]) if nested else 0.0
        nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed quant state in {state_keys[0]!r}: {exc!r}; got {meta}") from None
    packed = state_dict[prefix]
    weight = cls(
        packed=packed,
        absmax=state_dict[f"{prefix}.absmax"],
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        code=state_dict[f"{prefix}.quant_map"].float(),
        quant_type=quant_type,
        nested_absmax=state_dict[f"{prefix}.nested_absmax"] if nested else None,
        nested_code=state_dict[f"{prefix}.nested_quant_map"].float() if nested else None,
        offset=offset,
        nested_blocksize=nested_blocksize,
        quant_storage=packed.dtype,
    )
    return weight.validate()


def write_bnb_state_dict(self: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The keys and tensors bitsandbytes' Linear4bit writes, byte-identical to its own."""
    meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}
    out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
    if self.nested:
        meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset)
        out[f"{prefix}.nested_absmax"] = self.nested_absmax
        out[f"{prefix}.nested_quant_map"] = self.nested_code
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = blob
    return out



def _parse_quant_state(blob, key: str) -> dict:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise ValueError(f"{key!r} must be a uint8 tensor holding utf-8 JSON")
    try:
        meta = json.loads(bytes(blob.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key!r} does not hold valid utf-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("blocksize", "dtype", "shape") if k not in meta]
    if missing:
        raise ValueError(f"quant state {key!r} lacks fields {missing}: {meta}")
    if meta["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"quant state {key!r} has unsupported dtype {meta['dtype']!r}")
    return meta
