"""Deprecated: the backend choice lives in `deltakern.backends.registry` (see its docstring).

Kept so code written against it keeps working: `backend()` reads DELTAKERN_BACKEND ("auto" when
unset), and the Triton helpers forward to `deltakern.backends.triton`.
"""

from deltakern.backends import triton as _triton
from deltakern.backends.registry import BACKENDS, backend  # noqa: F401

triton_available = _triton.available
require_triton = _triton.require
triton_module = _triton.module
