"""Shared by the CPU micro-benchmarks: an interleaved race of callables and the JSON record they write."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(out: Path, benchmark: str, cpu_time: bool, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` with the run's context to ``out`` (parent folders created)."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": benchmark,
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
        "threads": torch.get_num_threads(),
        "clock": "thread CPU time" if cpu_time else "wall",
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2))


def race(fns: dict[str, Callable[[], Any]], reps: int, cpu_time: bool) -> dict[str, float]:
    """Median milliseconds per callable over ``reps`` interleaved rounds, after one warm-up call each
    (primitive creation, first touch of buffers); ``cpu_time``: thread CPU time instead of wall clock."""
    clock = time.thread_time if cpu_time else time.perf_counter
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = clock()
            f()
            times[n].append(clock() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def paired(a: Callable[[int], Any], b: Callable[[int], Any], reps: int, copies: int = 1) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` and the median of their same-round ratios b/a (> 1: ``a`` is faster).

    Each callable takes a copy index: one warm-up call per copy, then ``reps`` rounds, round r calling both on
    copy ``r % copies`` (weight copies cycled so weights come from memory, as in a whole step) with the order
    flipped every round."""
    for k in range(copies):
        a(k), b(k)
    ta: list[float] = []
    tb: list[float] = []
    for r in range(reps):
        for f, t in ((a, ta), (b, tb)) if r % 2 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            f(r % copies)
            t.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb, strict=True))
