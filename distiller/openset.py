"""Open-set decisions: "other" when the other output wins, or when the best concept's probability is
below a threshold. The threshold is fitted at export where there is something to fit on."""
from __future__ import annotations

import numpy as np


def decide(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Decisions for probabilities [N, K + 1] (``other`` last): index K for "other"."""
    k = probs.shape[1] - 1
    pred = probs.argmax(1)
    reject = (pred != k) & (probs[np.arange(len(probs)), pred] < threshold)
    return np.where(reject, k, pred)


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    classes = np.unique(truth)
    return float(np.mean([(pred[truth == c] == c).mean() for c in classes])) if len(classes) else 0.0


def fit_threshold(probs: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The threshold in [0, 1] that maximises balanced accuracy over the known classes and "other" (index K
    in ``truth``), and that accuracy; of equals, the smallest (0: the other output alone decides)."""
    k = probs.shape[1] - 1
    top = probs[:, :k].max(1)
    candidates = np.unique(np.concatenate([[0.0], np.nextafter(top, 2.0)]))
    best, score = 0.0, -1.0
    for t in candidates:
        s = balanced_accuracy(decide(probs, float(t)), truth)
        if s > score + 1e-12:
            best, score = float(min(t, 1.0)), s
    return best, score
