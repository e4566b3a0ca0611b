"""NF4 quantize on the CPU: deltakern's native kernels vs its pure-torch reference and bitsandbytes.

Rows: a 4096x4096 weight (randn * 0.02), fp32 and bf16, blocksize 64, with double quantization of
the absmax (nested, what QLoRA stores) and without. Providers, each called as a user would:
  bitsandbytes     bitsandbytes.functional.quantize_4bit(w, 64, compress_statistics=nested, "nf4")
  torch reference  deltakern.nf4.quantize(w, 64, nested) with DELTAKERN_BACKEND=torch
  deltakern        deltakern.nf4.quantize(w, 64, nested) (the cpu backend: deltakern._cpu)
Times are medians of round-robin rounds (every provider of a row sees the same machine load);
ratios are to bitsandbytes. deltakern's bytes equal the reference's (the tests check that); they
differ from bitsandbytes' CPU backend where that follows another rule (see deltakern/nf4.py).

Run:  python benchmarks/bench_cpu_quantize.py [--rounds 9] [--threads N] [--json out.json]
Also: pytest benchmarks/bench_cpu_quantize.py --benchmark-only
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

SHAPE = (4096, 4096)
BLOCKSIZE = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine() -> dict:
    from deltakern import _cpu_ext

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa_flags": [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw") if f" {x}" in flags],
        "quantize_unit": _cpu_ext.require().quantize_isa(_cpu_ext.isa()) if _cpu_ext.available() else None,
        "torch": torch.__version__,
    }


def _bnb_functional():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bf
        return bf
    except Exception:  # not installed / broken
        return None


def _backend(name):
    """Run fn with DELTAKERN_BACKEND=name (None: unset), restoring the variable after."""
    def wrap(fn):
        def run():
            old = os.environ.get("DELTAKERN_BACKEND")
            if name is None:
                os.environ.pop("DELTAKERN_BACKEND", None)
            else:
                os.environ["DELTAKERN_BACKEND"] = name
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop("DELTAKERN_BACKEND", None)
                else:
                    os.environ["DELTAKERN_BACKEND"] = old
        return run
    return wrap


@functools.lru_cache(maxsize=4)
def weight(dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


def providers(dtype: torch.dtype, nested: bool) -> dict:
    from deltakern import nf4

    w = weight(dtype)
    out = {}
    bf = _bnb_functional()
    if bf is not None:
        out["bitsandbytes"] = lambda: bf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")
    out["torch reference"] = _backend("torch")(lambda: nf4.quantize(w, BLOCKSIZE, double_quant=nested))
    out["deltakern"] = _backend(None)(lambda: nf4.quantize(w, BLOCKSIZE, double_quant=nested))
    return out


def run(rounds: int) -> list[dict]:
    rows = []
    for nested in (True, False):
        for dname, dtype in DTYPES.items():
            t = round_robin(providers(dtype, nested), rounds)
            base = t.get("bitsandbytes")
            rows.append({"row": f"quantize {SHAPE[0]}x{SHAPE[1]} {dname}, blocksize {BLOCKSIZE}"
                                + (", nested" if nested else ""),
                         "ms": dict(t),
                         "x_bnb": {k: v / base for k, v in t.items()} if base else {}})
    return rows


def table(rows: list[dict]) -> str:
    names = list(rows[0]["ms"])
    lines = ["| row | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        cells = [f"{r['ms'][n]:.1f} ms" + (f" ({r['x_bnb'][n]:.2f}x)" if r["x_bnb"] else "") for n in names]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from deltakern import _cpu_ext

    _cpu_ext.require()
    info = machine()
    rows = run(args.rounds)
    print(json.dumps(info))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


# ---- pytest-benchmark -------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("provider", ["bitsandbytes", "torch reference", "deltakern"])
def test_quantize(benchmark, provider, dname, nested):
    from deltakern import _cpu_ext

    if not _cpu_ext.available():
        pytest.skip(f"deltakern._cpu not built: {_cpu_ext.load_error()}")
    fns = providers(DTYPES[dname], nested)
    if provider not in fns:
        pytest.skip(f"{provider} not installed")
    benchmark(fns[provider])


if __name__ == "__main__":
    main()
