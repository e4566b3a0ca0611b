"""The one loader of the CUDA extension `deltakern._C`, and its Python launchers.

`import deltakern._ext` never imports `_C` and never touches `torch.cuda`: `load()` tries the import
once (on first use) and caches the module or the reason it failed. `require()` turns a missing
extension into a RuntimeError that says how to get it; the launchers validate their tensors, pass
raw device pointers and the current CUDA stream to `_C`, and raise RuntimeError with the CUDA error
string when a kernel entry point returns a nonzero cudaError_t.
"""

from __future__ import annotations

import numbers

import torch

from deltakern._native import NativeModule


_NO_DEVICE_CODES = (35, 100)  # cudaErrorInsufficientDriver, cudaErrorNoDevice
_OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_native = NativeModule("_C", "deltakern was installed without its CUDA extension: reinstall with nvcc on PATH "
                       "(pip install -e . --no-build-isolation), or set DELTAKERN_BACKEND=triton")
load = _native.load  # the `deltakern._C` module, or None if it cannot be imported (tried once, then cached)
available = _native.available  # whether `deltakern._C` imports (says nothing about a GPU being present)
load_error = _native.load_error  # why `deltakern._C` could not be imported, or None
require = _native.require  # the module; RuntimeError saying how to get it if it is missing


def check(code: int, what: str) -> None:
    """Raise RuntimeError for a nonzero cudaError_t returned by a `_C` entry point."""
    if code != 0:
        mod = load()
        msg = mod.error_string(code) if mod is not None else "unknown error"
        hint = " (no usable NVIDIA GPU/driver found)" if code in _NO_DEVICE_CODES else ""
        raise RuntimeError(f"deltakern._C.{what} failed: CUDA error {code}: {msg}{hint}")


def _check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of packed)")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")


def dequantize_nf4_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: float | torch.Tensor | None,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize n NF4 elements with the `_C` kernel; returns a contiguous [n] tensor of out_dtype.

    packed: (n+1)//2 bytes (uint8, or any dtype holding the same bytes: bitsandbytes quant_storage),
    element 2i in the high nibble of byte i. absmax: fp32 [ceil(n/blocksize)], or uint8 of that
    length when nested_absmax (fp32 [ceil(nblocks/256)]), nested_code (fp32 [256]) and offset are
    given. code: fp32 [16]. All on the same CUDA device; runs on its current stream.
    """
    C = require()
    if not isinstance(packed, torch.Tensor) or packed.device.type != "cuda":
        raise ValueError("dequantize_nf4_cuda needs CUDA tensors (packed is not one)")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype}")
    n, blocksize = int(n), int(blocksize)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    dev = packed.device
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            raise ValueError("packed must be contiguous")
        packed = packed.reshape(-1).view(torch.uint8)
    nblocks = -(-n // blocksize)
    _check_tensor("packed", packed, torch.uint8, (n + 1) // 2, dev)
    _check_tensor("code", code, torch.float32, 16, dev)
    nested = nested_absmax is not None
    if nested:
        if nested_code is None or offset is None:
            raise ValueError("nested absmax needs nested_absmax, nested_code and offset together")
        _check_tensor("absmax", absmax, torch.uint8, nblocks, dev)
        _check_tensor("nested_absmax", nested_absmax, torch.float32, -(-nblocks // 256), dev)
        _check_tensor("nested_code", nested_code, torch.float32, 256, dev)
        offset = float(offset.item() if isinstance(offset, torch.Tensor) else offset)
    else:
        _check_tensor("absmax", absmax, torch.float32, nblocks, dev)
        if offset is not None and not isinstance(offset, (numbers.Real, torch.Tensor)):
            raise TypeError(f"offset must be a float, got {type(offset).__name__}")
        offset = 0.0

    out = torch.empty(n, dtype=out_dtype, device=dev)
    if n == 0:
        return out
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = C.dequantize_nf4(
            packed.data_ptr(),
            absmax.data_ptr(),
            1 if nested else 0,
            nested_absmax.data_ptr() if nested else 0,
            nested_code.data_ptr() if nested else 0,
            offset,
            code.data_ptr(),
            out.data_ptr(),
            n,
            blocksize,
            _OUT_DTYPES[out_dtype],
            stream,
        )
    check(rc, "dequantize_nf4")
    return out
