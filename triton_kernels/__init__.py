"""Triton kernels of deltakern, one module per op family (installed as deltakern.triton_kernels)."""
