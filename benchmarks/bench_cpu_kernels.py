"""Native CPU kernels (deltakern._cpu) vs copy, dense torch and bitsandbytes' CPU backend.

Rows (fp32 unless said; times are medians of round-robin rounds, so every provider of a row sees
the same machine load):
  dequantize 4096x4096 NF4 (nested absmax, blocksize 64), fp32 and bf16 out:
      clone() of the dense weight (a fresh allocation, as a dequantize that allocates pays),
      bitsandbytes.functional.dequantize_4bit, deltakern (fresh output), deltakern out= (reused)
  decode y = x W^T, M = 1, 4, 16 at (K=2048, N=8192) and (K=4096, N=4096):
      dense fp32 / bf16 F.linear, bitsandbytes' matmul_4bit (what Linear4bit.forward calls),
      deltakern.nf4_matmul (W read as 4-bit, never built)
  torch.ops.deltakern.linear_fwd, NF4, M=64: dense fp32, the torch reference, the cpu backend
Ratios are to the row's first provider. Targets (issue 14): dequantize <= 0.5x bitsandbytes;
decode M=1 <= 0.3x dense fp32 and <= 0.5x dense bf16, M=4 <= 0.5x, M=16 <= 0.8x dense fp32.

Run:  python benchmarks/bench_cpu_kernels.py [--rounds 15] [--threads N] [--json out.json] [--quick]
Also: pytest benchmarks/bench_cpu_kernels.py --benchmark-only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import warnings

import pytest
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import round_robin  # noqa: E402  (round-robin timing, medians in ms)
import torch.nn.functional as F

BLOCKSIZE = 64
DEQUANT_SHAPE = (4096, 4096)
DECODE_SHAPES = ((8192, 2048), (4096, 4096))  # (N, K)
DECODE_MS = (1, 4, 16)


def machine() -> dict:
    from deltakern import _cpu_ext

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if f" {x}" in flags]
    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "isa_flags": isa, "deltakern_isa": _cpu_ext.isa() if _cpu_ext.available() else None, "torch": torch.__version__,
    }


def _bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
            import bitsandbytes.functional as bf
        return bnb, bf
    except Exception:  # not installed / broken
        return None, None


# ---- cases ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # pytest-benchmark: quantize once per case
def dequant_providers(out_dtype: torch.dtype, shape=DEQUANT_SHAPE) -> dict:
    from deltakern import _cpu_ext, nf4

    N, K = shape
    W = torch.randn(N, K, dtype=out_dtype)
    q = nf4.quantize(W, BLOCKSIZE, double_quant=True)
    flat = q.packed_bytes()
    args = (flat, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.numel, q.blocksize, out_dtype)
    ws = torch.empty(q.numel, dtype=out_dtype)
    prov = {"clone": lambda: W.clone()}
    bnb, bf = _bnb()
    if bf is not None:
        packed, state = bf.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        prov["bitsandbytes"] = lambda: bf.dequantize_4bit(packed, state)
    prov["deltakern"] = lambda: _cpu_ext.dequantize_nf4(*args)
    prov["deltakern out="] = lambda: _cpu_ext.dequantize_nf4(*args, out=ws)
    return prov


@functools.lru_cache(maxsize=1)
def decode_providers(M: int, N: int, K: int, dtype: torch.dtype = torch.float32) -> dict:
    from deltakern import _cpu_ext, nf4

    W = torch.randn(N, K)
    x = torch.randn(M, K)
    q = nf4.quantize(W, BLOCKSIZE, double_quant=True)
    flat, absmax = q.packed_bytes(), q.absmax_fp32()
    Wd = nf4.dequantize(q, torch.float32)
    Wb, xb = Wd.bfloat16(), x.bfloat16()
    xd = x.to(dtype)
    prov = {"dense fp32": lambda: F.linear(x, Wd), "dense bf16": lambda: F.linear(xb, Wb)}
    bnb, bf = _bnb()
    if bnb is not None:
        packed, state = bf.quantize_4bit(W.to(dtype), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        prov["bitsandbytes"] = lambda: bnb.matmul_4bit(xd, packed.t(), state)
    prov["deltakern"] = lambda: _cpu_ext.nf4_matmul(xd, flat, absmax, q.code, N, K, BLOCKSIZE)
    return prov


def _with_backend(name, fn):
    def call():
        old = os.environ.get("DELTAKERN_BACKEND")
        os.environ["DELTAKERN_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["DELTAKERN_BACKEND"]
            else:
                os.environ["DELTAKERN_BACKEND"] = old
    return call


def op_providers(M: int, N: int, K: int) -> dict:
    """torch.ops.deltakern.linear_fwd with an NF4 weight: the torch reference vs the cpu backend
    (decode kernel for M <= 16, else the dequantize workspace + torch's fp32 matmul)."""
    from deltakern import nf4

    W, x = torch.randn(N, K), torch.randn(M, K)
    q = nf4.quantize(W, BLOCKSIZE, double_quant=True)
    Wd = nf4.dequantize(q, torch.float32)
    args = (x, q.packed_bytes(), q.absmax_fp32(), q.code, N, K, BLOCKSIZE, None)
    op = torch.ops.deltakern.linear_fwd
    return {"dense fp32": lambda: F.linear(x, Wd), "torch reference": _with_backend("torch", lambda: op(*args)),
            "deltakern cpu": _with_backend("cpu", lambda: op(*args))}


def run(rounds: int, quick: bool = False) -> list[dict]:
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        shape = (1024, 1024) if quick else DEQUANT_SHAPE
        t = round_robin(dequant_providers(dt, shape), rounds)
        rows.append({"case": f"dequantize {shape[0]}x{shape[1]} nested, {str(dt)[6:]} out", "times": t})
    for N, K in DECODE_SHAPES[:1] if quick else DECODE_SHAPES:
        for M in DECODE_MS:
            for dt in (torch.float32, torch.bfloat16) if M == 1 else (torch.float32,):
                t = round_robin(decode_providers(M, N, K, dt), rounds)
                rows.append({"case": f"decode M={M} K={K} N={N}, x {str(dt)[6:]}", "times": t})
    N, K = (1024, 1024) if quick else (4096, 4096)
    t = round_robin(op_providers(64, N, K), max(3, rounds // 3))
    rows.append({"case": f"linear_fwd op, NF4, M=64 K={K} N={N} (workspace + BLAS)", "times": t})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | " + " | ".join(["provider: ms (ratio to first)"]) + " |", "|---|---|"]
    for r in rows:
        items = list(r["times"].items())
        base = items[0][1]
        cells = ", ".join(f"{n} {t:.2f} ({t / base:.2f}x)" for n, t in items)
        lines.append(f"| {r['case']} | {cells} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from deltakern import _cpu_ext

    _cpu_ext.require()
    m = machine()
    print(f"# CPU kernels: {m}")
    rows = run(a.rounds, a.quick)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": m, "rows": rows}, f, indent=1)


# ---- pytest-benchmark -------------------------------------------------------------------------------

def _need_ext():
    from deltakern import _cpu_ext

    if not _cpu_ext.available():
        pytest.skip(f"deltakern._cpu not built: {_cpu_ext.load_error()}")


@pytest.mark.parametrize("provider", ["clone", "bitsandbytes", "deltakern", "deltakern out="])  # varies fastest
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize(benchmark, provider, out_dtype):
    _need_ext()
    prov = dequant_providers(out_dtype)
    if provider not in prov:
        pytest.skip(f"{provider} not installed")
    benchmark(prov[provider])


@pytest.mark.parametrize("provider", ["dense fp32", "dense bf16", "bitsandbytes", "deltakern"])
@pytest.mark.parametrize("M", DECODE_MS)
@pytest.mark.parametrize("NK", DECODE_SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}")
def test_decode(benchmark, provider, NK, M):
    _need_ext()
    prov = decode_providers(M, *NK)
    if provider not in prov:
        pytest.skip(f"{provider} not installed")
    benchmark(prov[provider])


if __name__ == "__main__":
    main()
