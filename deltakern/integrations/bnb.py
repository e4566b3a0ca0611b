"""bitsandbytes interop: 4-bit `Linear4bit` layers <-> deltakern `NF4Linear`, without requantizing.

A bitsandbytes `Params4bit` already holds exactly what an `NF4Weight` describes (the packed codes in
`quant_storage` dtype, per-block absmax, the 16-entry code book and, when double-quantized, the 8-bit
absmax with its fp32 scales, nested code book and offset), so converting only re-labels tensors:

* `nf4_weight(param)` is a zero-copy `NF4Weight` view of a quantized `Params4bit` (NF4 or FP4,
  nested or not, any `quant_storage`); it dequantizes bit-identically to `bitsandbytes.functional.
  dequantize_4bit` because both decode `cast(fp32(code[nibble] * absmax))` with the same scales.
* `convert(model)` swaps every `bnb.nn.Linear4bit` of a model for an `NF4Linear` sharing those
  tensors (the bias is copied); `to_bnb(model)` swaps `NF4Linear` back to `bnb.nn.Linear4bit`.
  State-dict keys and bytes are the same either way (both write bitsandbytes' checkpoint format).

Limits: bitsandbytes' CPU backend repacks a weight into its own AVX512-BF16 layout during the
first eval-mode, no-grad forward on CPUs with that instruction set (`quant_state.packing_format_for_cpu`),
and in doing so rounds the block scales to bf16 and drops the nested form. Such a weight is read by
unpacking it into a copy (non-nested, fp32 scales holding the bf16 values): bit-exact to what that
layer now computes with, no longer to the original checkpoint. `NF4Linear` computes in its input's dtype; a Linear4bit's `compute_dtype` (inputs
cast to it, outputs cast back) is not carried over: feed the converted model inputs in the dtype
you want it to compute in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deltakern._patterns import match
from deltakern.nf4 import NESTED_BLOCKSIZE, NF4Weight

__all__ = ["ConvertSummary", "convert", "from_linear4bit", "is_linear4bit", "nf4_weight", "to_bnb", "to_linear4bit"]


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - exercised only without the wheel
        raise ImportError(
            "deltakern.integrations.bnb needs bitsandbytes (pip install bitsandbytes); "
            f"importing it failed: {exc}"
        ) from exc
    return bitsandbytes


_LOOKED_UP: dict = {}  # a plain memo, not functools.lru_cache: torch.compile traces through this


def _bnb_if_loaded():
    """bitsandbytes if it is installed (None otherwise); never raises. Looked up once."""
    if "bnb" not in _LOOKED_UP:
        try:
            import bitsandbytes
        except Exception:  # noqa: BLE001 - a broken install is the same as none here
            bitsandbytes = None
        _LOOKED_UP["bnb"] = bitsandbytes
    return _LOOKED_UP["bnb"]


def is_linear4bit(module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit linear (Linear4bit, LinearNF4, LinearFP4)."""
    bnb = _bnb_if_loaded()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _from_cpu_packed(param, qs) -> NF4Weight:
    """An NF4Weight (a copy) of a weight bitsandbytes' CPU backend repacked for its AVX512-BF16 kernel.

    That layout takes, for each group of 32 rows and each column pair (2j, 2j+1), the 64 values
    ordered (row 0: 2j, 2j+1), (row 1: ...), ..., (row 31: ...) and stores value i in the low nibble
    and value 32 + i in the high nibble of byte i (32 bytes); absmax is kept as bf16
    [K/blocksize, N] (transposed, nested scales already decoded). Undo both: nibbles back to
    row-major pairs, high nibble first, and the bf16 scales (what bitsandbytes now computes with) as
    fp32 in row-major block order.
    """
    N, K = (int(s) for s in qs.shape)
    block_n = 32
    raw = param.data.reshape(-1).view(torch.uint8).reshape(-1, block_n)
    vals = torch.cat([raw & 15, raw >> 4], dim=1)  # [N/32 * K/2, 64]: 32 rows x (2j, 2j+1), interleaved
    vals = vals.reshape(N // block_n, K // 2, block_n, 2).transpose(1, 2).reshape(-1)  # row-major nibbles
    packed = ((vals[0::2] << 4) | vals[1::2]).to(torch.uint8)
    storage = getattr(qs, "original_storage_type", None) or torch.uint8
    packed = packed.view(storage).reshape(-1, 1)
    absmax = qs.absmax.t().reshape(-1).float()
    weight = NF4Weight(packed=packed, absmax=absmax, shape=torch.Size((N, K)),
                       dtype=getattr(qs, "original_dtype", qs.dtype), blocksize=int(qs.blocksize),
                       code=qs.code.float(), quant_type=qs.quant_type, quant_storage=storage)
    return weight.validate()


def nf4_weight(param, layer: nn.Module | None = None) -> NF4Weight:
    """A zero-copy NF4Weight view of a quantized bitsandbytes `Params4bit`.

    The packed codes, absmax, code books and nested scales are the very tensors bitsandbytes holds
    (a code book that is not fp32 is the only thing converted). A weight bitsandbytes' CPU backend
    repacked for its AVX512-BF16 kernel is unpacked into a copy instead (see the module notes).
    `layer` (the owning Linear4bit) is consulted only when the parameter lost its quant_state.
    Raises ValueError for a weight that is not quantized yet (bitsandbytes quantizes on `.to(device)`).
    """
    qs = getattr(param, "quant_state", None)
    if qs is None and layer is not None:
        qs = getattr(layer, "quant_state", None)
    if qs is None or not getattr(param, "bnb_quantized", True):
        raise ValueError(
            "this bitsandbytes weight is not quantized yet (it has no quant_state); bitsandbytes "
            "quantizes a Linear4bit when it is moved with .to(device) / .cuda()"
        )
    if getattr(qs, "packing_format_for_cpu", False):
        return _from_cpu_packed(param, qs)
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unsupported bitsandbytes 4-bit quant_type {qs.quant_type!r}")
    packed = param.data
    if packed.dim() == 1:
        packed = packed.unsqueeze(1)
    nested = bool(getattr(qs, "nested", False)) and qs.state2 is not None
    weight = NF4Weight(
        packed=packed,
        absmax=qs.absmax,
        shape=torch.Size(qs.shape),
        dtype=qs.dtype,
        blocksize=int(qs.blocksize),
        code=qs.code.float(),
        quant_type=qs.quant_type,
        nested_absmax=qs.state2.absmax if nested else None,
        nested_code=qs.state2.code.float() if nested else None,
        offset=float(qs.offset) if nested else 0.0,
        nested_blocksize=int(qs.state2.blocksize) if nested else NESTED_BLOCKSIZE,
        quant_storage=packed.dtype,
    )
    return weight.validate()


def from_linear4bit(layer) -> nn.Module:
    """An `NF4Linear` holding `layer`'s 4-bit weight (shared tensors) and a copy of its bias."""
    from deltakern.nn.nf4_linear import NF4Linear

    if not is_linear4bit(layer):
        raise TypeError(f"expected a bitsandbytes Linear4bit, got {type(layer).__name__}")
    weight = nf4_weight(layer.weight, layer)
    if len(weight.shape) != 2:
        raise ValueError(f"Linear4bit weight must be 2-D, got shape {tuple(weight.shape)}")
    bias = layer.bias
    out = NF4Linear(weight, None if bias is None else bias.detach())
    if bias is not None:
        out.bias.requires_grad_(bias.requires_grad)
    out.train(layer.training)
    return out


def to_linear4bit(layer, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes `Linear4bit` holding an `NF4Linear`'s weight (shared tensors) and bias."""
    from deltakern.nn.nf4_linear import NF4Linear
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Linear4bit, Params4bit

    if not isinstance(layer, NF4Linear):
        raise TypeError(f"expected a deltakern NF4Linear, got {type(layer).__name__}")
    w = layer.weight
    device = w.device
    state2 = offset = None
    if w.nested:
        state2 = QuantState(absmax=w.nested_absmax, code=w.nested_code, blocksize=w.nested_blocksize,
                            dtype=torch.float32)
        offset = torch.tensor(w.offset, dtype=torch.float32, device=device)
    qs = QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=w.code, blocksize=w.blocksize,
                    quant_type=w.quant_type, dtype=w.dtype, offset=offset, state2=state2)
    out = Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=compute_dtype,
                     compress_statistics=w.nested, quant_type=w.quant_type, quant_storage=w.quant_storage,
                     device="meta")
    out.weight = Params4bit(w.packed, requires_grad=False, quant_state=qs, blocksize=w.blocksize,
                            compress_statistics=w.nested, quant_type=w.quant_type, quant_storage=w.quant_storage,
                            module=out, bnb_quantized=True)
    out.quant_state = qs
    if layer.bias is not None:
        out.bias = layer.bias
    out.train(layer.training)
    return out


@dataclass
class ConvertSummary:
    """What `convert` / `to_bnb` did: the layers swapped, the 4-bit bytes they hold, and what was
    left alone (name -> reason)."""

    converted: list[str] = field(default_factory=list)
    nbytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    direction: str = "bitsandbytes Linear4bit -> deltakern NF4Linear"

    @property
    def layers(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        text = f"{self.direction}: {self.layers} layers ({self.nbytes / 2**20:.2f} MiB of 4-bit weights, no requantization)"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _targets(model: nn.Module, want, skip) -> list[tuple[str, nn.Module]]:
    if isinstance(skip, str):
        skip = (skip,)
    found = []
    for name, module in model.named_modules():
        if want(module) and not (skip and match(name, skip)):
            found.append((name, module))
    return found


def convert(model: nn.Module, skip=()) -> ConvertSummary:
    """Replace every bitsandbytes `Linear4bit` in `model` by a deltakern `NF4Linear`, in place.

    No requantization: each NF4Linear shares the packed codes and scales of the layer it replaces,
    so its dequantized weight equals bitsandbytes' `dequantize_4bit` bit for bit (outputs equal for
    inputs in the layer's compute dtype). `skip`: module names (exact, dotted suffix or regex) to
    leave alone. A layer whose weight is not quantized yet is skipped and reported (one warning).
    `model` may itself be a Linear4bit only if wrapped in a container (it is replaced in its parent).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _bnb()
    summary = ConvertSummary()
    for name, layer in _targets(model, is_linear4bit, skip):
        if not name:
            raise ValueError("convert() replaces layers inside a model; got a bare Linear4bit "
                             "(use deltakern.integrations.bnb.from_linear4bit for one layer)")
        try:
            new = from_linear4bit(layer)
        except ValueError as exc:
            summary.skipped[name] = str(exc)
            continue
        _swap(model, name, new)
        summary.converted.append(name)
        summary.nbytes += new.weight.nbytes
    if summary.skipped:
        warnings.warn(f"deltakern.integrations.bnb.convert left {len(summary.skipped)} layers as bitsandbytes "
                      f"Linear4bit: " + "; ".join(f"{k}: {v}" for k, v in summary.skipped.items()), stacklevel=2)
    return summary


def to_bnb(model: nn.Module, compute_dtype: torch.dtype | None = None, skip=()) -> ConvertSummary:
    """The inverse of `convert`: replace every deltakern `NF4Linear` by a bitsandbytes `Linear4bit`
    sharing its tensors (no requantization), in place. `compute_dtype` is set on the new layers."""
    from deltakern.nn.nf4_linear import NF4Linear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _bnb()
    summary = ConvertSummary(direction="deltakern NF4Linear -> bitsandbytes Linear4bit")
    for name, layer in _targets(model, lambda m: isinstance(m, NF4Linear), skip):
        if not name:
            raise ValueError("to_bnb() replaces layers inside a model; use to_linear4bit for one layer")
        _swap(model, name, to_linear4bit(layer, compute_dtype))
        summary.converted.append(name)
        summary.nbytes += layer.weight.nbytes
    return summary
