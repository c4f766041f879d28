"""Open-set decisions: "other" when the other output wins, or when the best concept's probability is
below a threshold. The threshold is fitted at export where there is something to fit on."""
from __future__ import annotations

import numpy as np

from runtime.classifier import open_set_decision as decide   # the runtime's own rule, fitted here
from runtime.classifier import softmax, with_other_bias


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


def known_score(logits: np.ndarray, k: int) -> np.ndarray:
    """How much an image looks like one of the K concepts: the best concept's probability (softmax over
    every output, "other" included for an open-set model; the maximum softmax probability for a closed one)."""
    return softmax(logits)[:, :k].max(1)


def rejection(known_logits, other_logits, other_decisions, k: int) -> dict:
    """Known images against images of other things: AUROC of ``known_score`` with its interval, and the
    share of the other images answered "other" (decision K) with a Wilson interval."""
    from .evaluation import wilson
    pos, neg = known_score(known_logits, k), known_score(other_logits, k)
    hit = int((np.asarray(other_decisions) == k).sum())
    n = len(other_decisions)
    return {"auroc": auroc(pos, neg), "auroc_ci": auroc_interval(pos, neg), "other_accuracy": hit / max(n, 1),
            "other_ci": wilson(hit, n), "other_images": n, "known_images": int(len(pos))}


def open_set_threshold(recipe, reference, teacher_logits, source: str | None) -> tuple[float, dict]:
    """The open-set threshold and how it was chosen: fitted on validation images (the teacher's argmax,
    "other" included, as the truth) from ``source``: the real ones (--images), or the bank's with its
    negatives; with neither (None), 0, so the other output alone decides. Both the student's outputs and
    the teacher's truth are read with the recipe's ``other_bias``."""
    if not recipe.openset:
        return 0.0, {}
    rows = ~np.isnan(teacher_logits).any(1)
    if source is None or not rows.any():
        return 0.0, {"source": "none", "images": 0,
                     "note": "no real validation images and no negatives to fit on: the other output alone decides"}
    k, bias = teacher_logits.shape[1] - 1, recipe.other_bias
    truth = with_other_bias(teacher_logits[rows], k, bias).argmax(1)
    t, score = fit_threshold(softmax(with_other_bias(reference[rows], k, bias)), truth)
    return t, {"source": source, "images": int(rows.sum()), "balanced_accuracy": round(score, 4),
               "other_images": int((truth == teacher_logits.shape[1] - 1).sum())}
