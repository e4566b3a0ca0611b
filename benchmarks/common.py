"""Shared benchmark helpers: CUDA-event timing, the device's own ceilings, environment, JSON.

Every benchmark reports ratios against numbers measured in the same run on the same device:
the copy bandwidth (bytes read + written per second of a large device-to-device copy) and the
bf16 matmul throughput (8192^3).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from importlib import metadata

import torch
from torch import nn


def require_cuda():
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")


@contextmanager
def env_var(name, value):
    """Set (or, for None, unset) the environment variable `name` inside the block; restore it after."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def impl_suffix(impl) -> str:
    """A provider-name suffix for a forced DELTAKERN_*_IMPL value: "" for the default (None), else "[impl]"."""
    return "" if impl is None else f"[{impl}]"


def train_inputs(M, K, N, dtype, device="cuda"):
    """A training step's input x [M, K] (requires grad) and upstream gradient dy [M, N], standard normal."""
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return x, dy


class Holder(nn.Module):
    """A one-layer model whose layer is named `proj` (what the PEFT configs target)."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


class BitFit(nn.Module):
    """A frozen base (nn.Linear or NF4Linear) whose bias alone trains, through deltakern's linear."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        base.bias.requires_grad_(True)

    def forward(self, x):
        from deltakern.autograd.linear import linear

        return linear(x, self.base.weight, self.base.bias)


def bench(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events, L2 flushed before each rep."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn) -> float:
    """Peak memory allocated above the starting point while fn() runs, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings() -> dict:
    """The device's copy bandwidth (GB/s) and bf16 matmul throughput (TFLOP/s), measured now."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), reps=20)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: a @ b, reps=20)
    return {"copy_gbps": 2 * 2**31 / copy_ms / 1e6, "matmul_bf16_tflops": 2 * 8192**3 / mm_ms / 1e9}


def environment() -> dict:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "bitsandbytes", "peft", "transformers", "deltakern"):
        env[name] = version(name)
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table of `rows` restricted to `columns` (floats to 3 significant places)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---- CPU timing (round-robin: load that comes and goes hits every contender alike) ----------------


_EVICT: list = []


def evict_caches(nbytes: int = 96 << 20) -> None:
    """Write a buffer larger than the last-level cache (96 MiB), so what a previous call read is gone
    from every cache level: the state in which a model's weights stream through a decode step."""
    if not _EVICT:
        _EVICT.append(torch.zeros(nbytes // 4))
    _EVICT[0].add_(1.0)


class Timings(dict):
    """name -> median milliseconds; `rounds[name]` holds every round's time, and `ratio(a, b)` is the
    median over rounds of a's time / b's time in the same round (robust to load that drifts during a
    run, which a ratio of medians is not)."""

    def __init__(self, rounds: dict):
        super().__init__({name: statistics.median(ts) for name, ts in rounds.items()})
        self.rounds = rounds

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.rounds[a], self.rounds[b]))


def round_robin(fns: dict, reps: int, warmup: int = 2, before=None) -> Timings:
    """Each fn timed one rep of each in turn (the first one rotating every round), after a warmup.
    `before` (untimed) runs before every timed call, e.g. `evict_caches` so that no contender finds
    data the one before it left in cache."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for i in range(reps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if before is not None:
                before()
            t = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    return Timings(times)
