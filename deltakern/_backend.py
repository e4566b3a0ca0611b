"""Which implementation runs a deltakern op on a CUDA tensor.

`DELTAKERN_BACKEND` picks it, read at call time so tests and benchmarks can switch:
  triton (default) - the Triton kernels in deltakern.triton_kernels
  cuda             - the CUDA C++ kernels in deltakern._C (ops that have one; cuBLAS compositions
                     for the others)
  torch            - the pure-torch references, on the GPU too (for comparison)
CPU tensors always run the pure-torch references.
"""

import functools
import importlib
import os

BACKENDS = ("triton", "cuda", "torch")


def backend() -> str:
    name = os.environ.get("DELTAKERN_BACKEND", "triton").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"DELTAKERN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@functools.cache
def _triton_import_error():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def require_triton():
    err = _triton_import_error()
    if err is not None:
        raise RuntimeError(
            f"this deltakern op needs Triton on CUDA tensors, but importing it failed ({err}); "
            "install it with `pip install triton`, or set DELTAKERN_BACKEND=cuda for ops with a "
            "CUDA C++ kernel"
        )


def triton_module(name: str):
    """deltakern.triton_kernels.<name>, imported on first use (never at `import deltakern`)."""
    require_triton()
    return importlib.import_module(f"deltakern.triton_kernels.{name}")
