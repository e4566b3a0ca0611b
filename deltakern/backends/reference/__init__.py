"""The `torch` backend: pure-torch references of every deltakern op, registered for every device.

They are the CPU kernels when no native CPU kernel is built, what `DELTAKERN_BACKEND=torch` runs,
and the oracle every other backend is tested against. One module per op family; each reference
accumulates in fp32 (float64 when its inputs are float64, for tests) and rounds once to the
output dtype, as the kernels do.
"""

from deltakern.backends.reference import dora, linear, lora, lowrank, nf4  # noqa: F401  (registers them)
from deltakern.backends.reference._util import dense_weight_ref
from deltakern.backends.reference.dora import (
    dora_bwd_ref, dora_colsum_ref, dora_ctw_ref, dora_fwd_ref, dora_norm_parts_ref,
)
from deltakern.backends.reference.linear import linear_bwd_ref, linear_fwd_ref
from deltakern.backends.reference.lora import lora_dx_ref, lora_fwd_ref
from deltakern.backends.reference.nf4 import absmax_ref, dequantize_nf4_ref, quantize_nf4_ref

__all__ = [
    "absmax_ref", "dense_weight_ref", "dequantize_nf4_ref", "dora_bwd_ref", "dora_colsum_ref", "dora_ctw_ref",
    "dora_fwd_ref", "dora_norm_parts_ref", "linear_bwd_ref", "linear_fwd_ref", "lora_dx_ref", "lora_fwd_ref",
    "quantize_nf4_ref",
]
