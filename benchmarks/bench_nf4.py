"""NF4 dequantize: deltakern Triton and CUDA vs bitsandbytes vs torch.compile of the reference.

Effective bandwidth = (packed + absmax (+ nested) + output bytes) / time, and its ratio to the
device's copy bandwidth measured in the same run. Target (14336x4096, nested, bf16 out): >= 90%
of copy bandwidth. Run: python benchmarks/bench_nf4.py --out nf4.json
Also usable with pytest-benchmark: pytest benchmarks/bench_nf4.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192))


def _bytes(q, out_dtype) -> int:
    n = q.numel
    total = q.packed.numel() * q.packed.element_size() + q.absmax.numel() * q.absmax.element_size()
    if q.nested:
        total += q.nested_absmax.numel() * 4
    return total + n * torch.empty((), dtype=out_dtype).element_size()


def providers(q, dtype):
    """name -> zero-arg callable producing the dense bf16 weight."""
    from deltakern import _ext
    from deltakern.triton_kernels import nf4 as tk
    from deltakern.backends.reference.nf4 import dequantize_nf4_ref

    flat = q.packed_bytes()
    args = (flat, q.absmax, q.numel, q.blocksize, dtype, q.code, q.nested_absmax, q.nested_code, q.offset)
    out = {"deltakern_triton": lambda: tk.dequantize_nf4(*args)}
    if _ext.available():
        out["deltakern_cuda"] = lambda: _ext.dequantize_nf4_cuda(
            flat, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.numel, q.blocksize, dtype)
    compiled = torch.compile(dequantize_nf4_ref)
    out["torch_compile_ref"] = lambda: compiled(*args)
    try:
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState.from_dict(
            {k[len("w."):]: v for k, v in q.to_bnb_state_dict("w").items() if k != "w"}, device="cuda")
        state.dtype = dtype
        out["bitsandbytes"] = lambda: bnbf.dequantize_4bit(q.packed, state)
    except Exception as exc:  # not installed, or no CUDA backend
        print(f"bitsandbytes unavailable: {exc}")
    return out


def run(shapes=SHAPES, dtype=torch.bfloat16):
    from benchmarks.common import bench, ceilings, environment
    from deltakern import nf4

    ceil = ceilings()
    rows = []
    for shape in shapes:
        w = torch.randn(shape, dtype=dtype, device="cuda")
        for nested in (True, False):
            q = nf4.quantize(w, 64, double_quant=nested)
            ref = nf4.dequantize(q.to("cpu")).cuda() if w.numel() <= 2**24 else None
            nbytes = _bytes(q, dtype)
            for name, fn in providers(q, dtype).items():
                if ref is not None and name.startswith("deltakern"):
                    assert torch.equal(fn(), ref.view(-1)), f"{name} differs from the reference"
                ms = bench(fn)
                gbps = nbytes / ms / 1e6
                rows.append({"op": "nf4_dequantize", "shape": f"{shape[0]}x{shape[1]}", "nested": nested,
                             "provider": name, "ms": ms, "gbps": gbps, "of_copy": gbps / ceil["copy_gbps"]})
            del q
    return {"env": environment(), "ceilings": ceil, "rows": rows}


def main():
    from benchmarks.common import require_cuda, table, write_json

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="nf4_dequant.json")
    args = parser.parse_args()
    require_cuda()
    result = run()
    print(result["env"], result["ceilings"])
    print(table(result["rows"], ["shape", "nested", "provider", "ms", "gbps", "of_copy"]))
    write_json(args.out, result)


# ---- pytest-benchmark entry points (GPU only) --------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_dequantize_14336x4096(benchmark, backend, monkeypatch):
    from deltakern import _ext, nf4

    if backend == "cuda" and not _ext.available():
        pytest.skip("deltakern._C not built")
    monkeypatch.setenv("DELTAKERN_BACKEND", backend)
    q = nf4.quantize(torch.randn(14336, 4096, dtype=torch.bfloat16, device="cuda"))

    def step():
        nf4.dequantize(q)
        torch.cuda.synchronize()

    benchmark(step)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
