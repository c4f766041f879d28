"""Open-set scores on real images: how well known images rank above images of other things (AUROC), and how
often the others are answered "other". The runtime decides (``runtime.classifier.open_set_decision``); the
exporter fits its threshold (``exporter.calibration``)."""
from __future__ import annotations

import numpy as np

from runtime.classifier import softmax

from .stats import auroc, auroc_interval, wilson


def known_score(logits: np.ndarray, k: int) -> np.ndarray:
    """How much an image looks like one of the K concepts: the best concept's probability (softmax over
    every output, "other" included for an open-set model; the maximum softmax probability for a closed one)."""
    return softmax(logits)[:, :k].max(1)


def rejection(known_logits, other_logits, other_decisions, k: int) -> dict:
    """Known images against images of other things: AUROC of ``known_score`` with its interval, and the
    share of the other images answered "other" (decision K) with a Wilson interval."""
    pos, neg = known_score(known_logits, k), known_score(other_logits, k)
    hit = int((np.asarray(other_decisions) == k).sum())
    n = len(other_decisions)
    return {"auroc": auroc(pos, neg), "auroc_ci": auroc_interval(pos, neg), "other_accuracy": hit / max(n, 1),
            "other_ci": wilson(hit, n), "other_images": n, "known_images": int(len(pos))}
