"""NF4Weight: the packed codes, the block scales and everything needed to decode them (the format is
described in deltakern.nf4), with validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

import torch


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
        from deltakern.backends.reference.nf4 import absmax_ref

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
        from deltakern.nf4.codec import dequantize

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

    # ---- bitsandbytes checkpoints (deltakern.nf4.checkpoint) -----------------------------
    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        """Read the keys a bitsandbytes Linear4bit saves for its weight named `prefix` (see
        deltakern.nf4.checkpoint.read_bnb_state_dict); a bad checkpoint loads nothing."""
        from deltakern.nf4.checkpoint import read_bnb_state_dict

        return read_bnb_state_dict(cls, state_dict, prefix)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The keys and tensors bitsandbytes' Linear4bit writes, byte-identical to its own."""
        from deltakern.nf4.checkpoint import write_bnb_state_dict

        return write_bnb_state_dict(self, prefix)


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


# ---- quantize / dequantize ------------------------------------------------------------------

