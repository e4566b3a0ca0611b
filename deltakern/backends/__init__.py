"""Backends of the deltakern ops, and the registry that chooses between them (see `registry`).

Importing this package registers every backend; none imports Triton, the extensions or touches
`torch.cuda` at import time.
"""

from deltakern.backends import cpu, cpu_blas, cuda, reference, registry, triton  # noqa: F401  (registers them)
from deltakern.backends.registry import backend, fused_path, implementations, register, resolve

__all__ = ["backend", "fused_path", "implementations", "register", "registry", "resolve"]
