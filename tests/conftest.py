"""Test lanes: CPU references vs bitsandbytes/PEFT, the Triton interpreter (TRITON_INTERPRET=1, set
by the test modules that need it when no GPU is present), the extension build, and `-m gpu`
(skipped without CUDA)."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter; this must be set before any
    # kernel module is imported, i.e. before the test modules are collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _bitsandbytes_generic_cpu_paths():
    """bitsandbytes is the tests' oracle for the NF4 format. On CPUs with AVX-512, bitsandbytes 0.50.2
    sends CPU calls to native kernels that get some shapes wrong: its dequantize_4bit mis-decodes
    4-bit blocks that cross a row boundary (a 64x64 weight with blocksize 128 decodes wrongly from
    its second block on), and Linear4bit's AVX-512-BF16 inference repacking fails on layers narrower
    than a block. The tests therefore run bitsandbytes' generic pure-torch paths (its definition of
    the format, what its CUDA kernels compute) on every CPU; benchmarks keep the native kernels."""
    try:
        import bitsandbytes.functional as F
        import bitsandbytes.nn.modules as modules
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except Exception:  # not installed: the tests that need it skip
        return
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

    def dequantize_4bit_generic(A, absmax, blocksize, quant_type, shape, dtype):
        A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        return eager(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    import warnings

    global _BNB_OVERRIDE
    _BNB_OVERRIDE = torch.library.Library("bitsandbytes", "IMPL")  # kept alive: the override lives with it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        _BNB_OVERRIDE.impl("dequantize_4bit", dequantize_4bit_generic, "CPU")
    F.has_avx512bf16 = modules.has_avx512bf16 = lambda: False


_bitsandbytes_generic_cpu_paths()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with `pytest -m gpu` on a GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
