"""NF4 4-bit weights with (optionally) double-quantized block scales: the QLoRA format.

    weight.py      NF4Weight (the format's parts) and its validation
    codec.py       quantize / quantize_nested / dequantize
    checkpoint.py  bitsandbytes state dicts, read and written bit-exactly

Bit-compatible with bitsandbytes 0.50 (checked against its wheel in the tests):

* the weight [N, K] is flattened row-major and cut into blocks of `blocksize` consecutive
  elements (the last block may be partial); each block stores absmax = max|x| in fp32;
* quantize follows bitsandbytes' CUDA kernel (the rule is written out once, in
  deltakern.backends.reference.nf4): z = ftz(x * rcp(absmax)) with subnormals flushed to zero, in
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

from deltakern.nf4.weight import (  # noqa: F401
    _DTYPE_NAMES, BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES, NF4Weight, _check_table, _dtype_name,
    _QuantStateKey, check_blocksize, check_finite,
)
from deltakern.nf4.checkpoint import _parse_quant_state, read_bnb_state_dict, write_bnb_state_dict  # noqa: F401
from deltakern.nf4.codec import dequantize, quantize, quantize_nested  # noqa: F401

__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "NF4Weight", "check_blocksize", "check_finite", "dequantize", "quantize",
           "quantize_nested"]
