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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with `pytest -m gpu` on a GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
