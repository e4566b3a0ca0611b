"""quantize / quantize_nested / dequantize: dense weights to NF4 and back, through the
`deltakern::nf4_*` ops (the backends run them; the rule is in deltakern.backends.reference.nf4)."""

from __future__ import annotations

from typing import Optional

import torch

import deltakern.ops.nf4  # noqa: F401  (defines torch.ops.deltakern.nf4_*)
from deltakern import _codes
from deltakern.nf4.weight import FLOAT_DTYPES, NF4Weight, check_blocksize, check_finite


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
    (deltakern.backends.reference.nf4.quantize_nested_ref): z = ftz(x * rcp(absmax)), code = the
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
