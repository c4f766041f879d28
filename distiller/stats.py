"""Intervals and ranking scores for the numbers distiller reports."""
from __future__ import annotations

import math

import numpy as np


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores that should rank ``positive`` above ``negative`` (ties count half)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def auroc_interval(positive, negative, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the AUROC (each group resampled on its own)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    draws = [auroc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(reps)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)
