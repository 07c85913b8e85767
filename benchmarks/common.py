"""Timing helpers shared by the benchmarks: interleaved repeats, thread count, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def set_threads(n: int | None = None) -> int:
    """Fixes torch's intra-op threads (default: $BENCH_THREADS or 2) and returns the number."""
    n = int(n or os.environ.get("BENCH_THREADS", 2))
    torch.set_num_threads(n)
    return n


def interleaved(fns: dict[str, callable], repeats: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Times each function ``repeats`` times, interleaving them (A B A B ...) so that load
    from other processes hits all of them alike. Returns min and median seconds, and every time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "runs": len(v), "times_s": v}
            for k, v in times.items()}


def paired_ratio(t: dict, num: str, den: str) -> float:
    """Median over rounds of ``num``'s time over ``den``'s in the same round of
    :func:`interleaved` (two runs made back to back), which load spikes bias less than a
    ratio of minima or of medians."""
    return statistics.median(a / b for a, b in zip(t[num]["times_s"], t[den]["times_s"]))


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=1))
    return path
