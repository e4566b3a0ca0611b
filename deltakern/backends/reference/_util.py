"""Helpers the reference modules share."""

import torch


def f32(t):
    """fp32 for the references' accumulators, float64 when the input already is (tests' oracle)."""
    return t if t.dtype == torch.float64 else t.float()


def dense_weight_ref(weight, absmax, code, N: int, K: int, blocksize: int, dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`: `weight` itself when dense (absmax None), else the reference
    decode cast(fp32(code[nibble] * absmax[block])) of the packed bytes with decoded fp32 scales."""
    if absmax is None:
        return weight
    from deltakern.backends.reference.nf4 import dequantize_nf4_ref

    packed = weight.reshape(-1).view(torch.uint8)
    return dequantize_nf4_ref(packed, absmax, N * K, blocksize, dtype, code).view(N, K)
