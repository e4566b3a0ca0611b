"""NF4 4-bit weights with (optionally) double-quantized block scales: the QLoRA format.

Bit-compatible with bitsandbytes 0.50 (checked against its wheel in the tests):

* the weight [N, K] is flattened row-major and cut into blocks of `blocksize` consecutive
  elements (the last block may be partial); each block stores absmax = max|x| in fp32;
* quantize follows bitsandbytes' CUDA kernel (the rule is written out once, in
  deltakern.triton_kernels.nf4_ref): z = ftz(x * rcp(absmax)) with subnormals flushed to zero, in
  every block, the partial last one too; the NF4 code is the number of its 15 fixed fp32 thresholds
  strictly below z (a tie takes the lower code; an all-zero block has z = 0 * inf = NaN, code 0,
  and packs 0x00); byte i packs element 2i in the high nibble and element 2i+1 in the low nibble;
* double quantization stores absmax - mean(absmax) with bitsandbytes' signed 8-bit dynamic map in
  blocks of 256 by the same scaling, code = the number of fp32 midpoints of the map below z, a tie
  going to the even index, NaN -> 0; plus one fp32 scale per 256 blocks and the fp32 mean ("offset");
* dequantize: absmax = fp32(map[q] * nested_absmax) + offset (two roundings), then
  out = cast(fp32(code[nibble] * absmax)).

Documented differences. On CUDA tensors the Triton kernels use the hardware reciprocal
rcp.approx.ftz.f32, as bitsandbytes' fast-math build does, and so write its bytes. On the CPU the
reference uses the correctly rounded 1/absmax; the hardware one is that value or its neighbour 1 ulp
away, so a code can differ only where z moves across a threshold or midpoint with the reciprocal's
last bit. Counted with benchmarks/nf4_rcp_rate.py on randn * 0.02 weights [4096, 4096], blocksize 64,
as the codes a 1-ulp change either way can move (an upper bound): bf16 weights, no 4-bit code (no
pair of a bf16 absmax and a bf16 value in its block has one) and 4.4e-6 of the nested codes; fp32
weights, 6.0e-7 of the 4-bit codes and 2.6e-6 of the nested codes. The offset is torch's mean on the
weight's device, as in bitsandbytes, so where CPU and CUDA sums round differently the offset and the
nested codes differ too. bitsandbytes' own CPU backend follows another rule (the fp32 level midpoints
as thresholds, a division in the partial last block, 0x77 for an all-zero block, its own 8-bit
search: about 0.1-0.2% of the nested codes differ). Every checkpoint either side writes is read
bit-exactly by the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

import torch

from deltakern import _codes

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return blocksize


@dataclass(eq=False)
class NF4Weight:
    """A frozen 4-bit weight: packed codes plus everything needed to decode them.

    packed:        the bytes, shape [(n+1)//2, 1] in `quant_storage` dtype (uint8 by default)
    absmax:        fp32 [blocks], or uint8 [blocks] when double-quantized (`nested`)
    shape, dtype:  the dense weight's shape and dtype (the default dequantize dtype)
    code:          fp32 [16] levels (NF4 or FP4)
    nested_absmax: fp32 [ceil(blocks/256)] and nested_code fp32 [256] and offset, when nested
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str = "nf4"
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: float = 0.0
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_storage: torch.dtype = field(default=torch.uint8)

    # ---- derived facts -------------------------------------------------------------------
    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: packed codes, scales and code books."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def packed_bytes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 tensor (a view, whatever `quant_storage` is)."""
        return self.packed.reshape(-1).view(torch.uint8)

    # ---- the names bitsandbytes' state-dict keys use (torch.distributed.checkpoint walks them) ------
    @property
    def quant_map(self) -> torch.Tensor:
        """Alias of `code` (key `weight.quant_map`)."""
        return self.code

    @property
    def nested_quant_map(self) -> Optional[torch.Tensor]:
        """Alias of `nested_code` (key `weight.nested_quant_map`)."""
        return self.nested_code

    @property
    def quant_state(self) -> "_QuantStateKey":
        """`quant_state.bitsandbytes__nf4` (or `__fp4`): the packed quant-state JSON."""
        return _QuantStateKey(self)

    @property
    def is_sharded(self) -> bool:
        """Whether the codes or scales are DTensors (shards of an FSDP-sharded layer)."""
        from deltakern.nn.nf4_linear import is_dtensor

        return is_dtensor(self.packed) or is_dtensor(self.absmax)

    def gathered(self) -> "NF4Weight":
        """This weight with sharded (DTensor) parts all-gathered into whole tensors; itself when
        nothing is sharded. A collective: on a sharded model every rank must call it."""
        from deltakern.nn.nf4_linear import is_dtensor

        full = lambda t: t.full_tensor() if is_dtensor(t) else t  # noqa: E731
        if not any(is_dtensor(t) for t in (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code)):
            return self
        return replace(self, packed=full(self.packed), absmax=full(self.absmax), code=full(self.code),
                       nested_absmax=None if self.nested_absmax is None else full(self.nested_absmax),
                       nested_code=None if self.nested_code is None else full(self.nested_code))

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales (decodes the nested 8-bit form, rounding as bitsandbytes).

        A nested weight is decoded once and the result kept on this object (the weight is frozen):
        every forward of an NF4 layer asks for it, and decoding costs ~7 small launches. The memo is
        keyed on the scale tensors and their version counters, so an in-place rewrite is seen.
        Cost: the fp32 scales stay resident (4 bytes per block, e.g. 3.7 MB for a 14336 x 4096
        weight at blocksize 64, on top of its 0.9 MB of 8-bit scales). Inside torch.compile the
        decode is traced instead (a compiled graph fuses it into one kernel).
        """
        from deltakern.triton_kernels.nf4_ref import absmax_ref

        if not self.nested:
            return self.absmax
        args = (self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)
        if torch.compiler.is_compiling():
            return absmax_ref(*args)
        tensors = (self.absmax, self.nested_absmax, self.nested_code)  # compared by identity: no reads
        key = tuple(t._version for t in tensors) + (float(self.offset), int(self.nested_blocksize))
        memo = self.__dict__.get("_absmax_memo")
        if memo is None or memo[1] != key or any(a is not b for a, b in zip(memo[0], tensors)):
            memo = self.__dict__["_absmax_memo"] = (tensors, key, absmax_ref(*args))
        return memo[2]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_absmax_memo", None)  # a cache, never pickled
        return state

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def validate(self) -> "NF4Weight":
        """Raise ValueError/TypeError if the parts do not describe one consistent weight."""
        check_blocksize(self.blocksize)
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        n = self.numel
        if len(self.shape) == 0 or n == 0:
            raise ValueError(f"shape must be non-empty, got {tuple(self.shape)}")
        n_bytes = self.packed.numel() * self.packed.element_size()
        if n_bytes != (n + 1) // 2:
            raise ValueError(
                f"packed weight holds {n_bytes} bytes but shape {tuple(self.shape)} needs "
                f"{(n + 1) // 2} ((numel+1)//2)"
            )
        devices = {t.device for t in (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"all parts of an NF4Weight must be on one device, got {sorted(map(str, devices))}")
        _check_table("code", self.code, 16)
        want_absmax = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want_absmax:
            raise TypeError(f"absmax must be {want_absmax} here, got {self.absmax.dtype}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with "
                f"blocksize {self.blocksize} has {self.n_blocks} blocks"
            )
        if not self.nested:
            check_finite("absmax", self.absmax)
        if self.nested:
            if self.nested_code is None:
                raise ValueError("a nested weight needs nested_code (256 fp32 values)")
            _check_table("nested_code", self.nested_code, 256)
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
            groups = -(-self.n_blocks // self.nested_blocksize)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != groups:
                raise ValueError(
                    f"nested_absmax must be fp32 with {groups} entries, got "
                    f"{self.nested_absmax.dtype} with {self.nested_absmax.numel()}"
                )
            check_finite("nested_absmax", self.nested_absmax)
            if not math.isfinite(self.offset):
                raise ValueError(f"nested offset must be finite, got {self.offset}")
        return self

    # ---- bitsandbytes checkpoints --------------------------------------------------------
    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
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

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
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


class _QuantStateKey:
    """What `weight.quant_state` resolves to when a state-dict key is walked attribute by attribute."""

    def __init__(self, weight: NF4Weight):
        self._weight = weight

    def __getattr__(self, name):
        if name == f"bitsandbytes__{self._weight.quant_type}":
            return self._weight.to_bnb_state_dict("w")[f"w.quant_state.{name}"]
        raise AttributeError(name)


def _check_table(name: str, t: torch.Tensor, size: int):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != size:
        raise ValueError(f"{name} must be an fp32 tensor of {size} values, got {getattr(t, 'dtype', type(t))} "
                         f"with {getattr(t, 'numel', lambda: '?')()} values")
    check_finite(name, t)


def check_finite(name: str, t: torch.Tensor, consequence: str = ": corrupt weight"):
    """ValueError "{name} has {n} non-finite values (NaN/Inf) out of {numel}{consequence}" if t has any.

    One reduction without a temporary of t's size (aminmax: a NaN propagates to both ends, an inf
    shows at one); the bad values are counted only when there are some."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    n_bad = int((~torch.isfinite(t)).sum())
    if n_bad:
        raise ValueError(f"{name} has {n_bad} non-finite values (NaN/Inf) out of {t.numel()}{consequence}")


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


# ---- quantize / dequantize ------------------------------------------------------------------

def quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> NF4Weight:
    """Quantize a dense fp16/bf16/fp32 weight of any shape to NF4 (on its own device)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    check_blocksize(blocksize)
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    if not isinstance(quant_storage, torch.dtype) or quant_storage.is_complex:
        raise TypeError(f"quant_storage must be a real torch dtype, got {quant_storage!r}")
    check_finite("weight", weight, "; refusing to quantize")
    n_bytes = (weight.numel() + 1) // 2
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if n_bytes % itemsize:
        raise ValueError(f"{n_bytes} packed bytes do not fill whole {quant_storage} elements ({itemsize} bytes each)")

    packed, absmax = torch.ops.deltakern.nf4_quantize(weight.detach().contiguous().reshape(-1), blocksize)
    packed = packed.view(quant_storage).unsqueeze(1)
    code = _codes.nf4_code(weight.device)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize, code, quant_storage=quant_storage)
    offset = absmax.mean()
    q, nested_absmax, nested_code = quantize_nested(absmax - offset)
    return NF4Weight(
        packed, q, weight.shape, weight.dtype, blocksize, code,
        nested_absmax=nested_absmax, nested_code=nested_code, offset=float(offset), quant_storage=quant_storage,
    )


def quantize_nested(x: torch.Tensor):
    """8-bit blockwise quantization (blocks of 256) of fp32 `x` with the signed dynamic map.

    Returns (uint8 codes, fp32 per-block absmax, the map). The rule is bitsandbytes' CUDA kernel's
    (deltakern.triton_kernels.nf4_ref.quantize_nested_ref): z = ftz(x * rcp(absmax)), code = the
    number of fp32 midpoints of the map below z, a tie going to the even index, NaN z (a block whose
    absmax is 0) -> 0, which still decodes to exactly the offset.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be an fp32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    q, absmax = torch.ops.deltakern.nf4_quantize_nested(x.detach().contiguous().reshape(-1))
    return q, absmax, _codes.dynamic_map(x.device)


def dequantize(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight (shape `q.shape`) in `dtype` (default: the original weight dtype)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if type(q.packed) is not torch.Tensor and type(q.packed) is not torch.nn.Parameter:
        q = q.gathered()  # a sharded weight (FSDP, outside its forward): gather, never use one shard
    flat = torch.ops.deltakern.nf4_dequantize(
        q.packed_bytes(), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.numel, q.blocksize, dtype
    )
    return flat.view(q.shape)


from deltakern.ops import nf4 as _register_ops  # noqa: E402,F401  (defines torch.ops.deltakern.nf4_*)
