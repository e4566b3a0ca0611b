"""Moved: the NF4 references live in deltakern.backends.reference.nf4 (the torch backend). This name
stays importable for code written against it."""

from deltakern.backends.reference.nf4 import *  # noqa: F401,F403
from deltakern.backends.reference.nf4 import (  # noqa: F401  (names star-import skips)
    absmax_ref, dequantize_nf4_ref, quantize_nested_ref, quantize_nf4_ref,
)
