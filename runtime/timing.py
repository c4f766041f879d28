"""Latency measurement shared by the exporter and `distiller bench`."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def timed(fn: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        t[i] = (time.perf_counter() - t0) * 1e3
    return t


def latency_stats(ms: np.ndarray) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "runs": int(len(ms))}
