"""The timing helpers of benchmarks/common.py: round-robin order, the untimed `before` hook, ratios."""

import time

from benchmarks import common


def test_round_robin_runs_before_untimed_and_rotates():
    calls = []

    def before():
        calls.append("before")
        time.sleep(0.02)  # would dominate the timings if it were timed

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    ms = common.round_robin(fns, reps=3, warmup=1, before=before)
    timed = calls[2:]  # after one warmup call of each
    assert timed == ["before", "a", "before", "b", "before", "b", "before", "a", "before", "a", "before", "b"]
    assert set(ms) == {"a", "b"} and all(len(ts) == 3 for ts in ms.rounds.values())
    assert max(ms.values()) < 10.0, ms  # milliseconds: the 20 ms sleeps are not in them
    assert ms.ratio("a", "a") == 1.0


def test_evict_caches_writes_its_buffer():
    common.evict_caches()
    buf = common._EVICT[0]
    before = float(buf[0])
    common.evict_caches()
    assert float(buf[0]) == before + 1.0 and buf.numel() * 4 >= 64 << 20
