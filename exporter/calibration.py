"""Which images the quantizers see and which judge them, and the open-set threshold fitted at export.

Calibration (and NNCF's accuracy-control tuning) use train images spread evenly; the INT8 fidelity check uses
other images, never the same ones, so accuracy-controlled quantization cannot pass by fitting the images it is
judged on. The open-set threshold is fitted on validation images with the teacher's answers as the truth."""
from __future__ import annotations

import numpy as np

from runtime.classifier import open_set_decision, softmax, with_other_bias


def quantizer_split(train: int, calibration: int, fidelity: int, reserve: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train images the quantizers calibrate (and accuracy control tunes) on, spread
    evenly, and of up to ``fidelity`` other train images for the fidelity check; never the same image.
    ``reserve``: train images the fidelity check needs besides the val shards; calibration leaves them
    out, but keeps at least half the train images."""
    calibration = min(calibration, max((train + 1) // 2, train - max(0, reserve)))
    calib = np.unique(np.linspace(0, train - 1, min(calibration, train)).round().astype(int)) if train else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(train), calib)
    pick = np.unique(np.linspace(0, len(rest) - 1, min(len(rest), max(0, fidelity))).round().astype(int)) if len(rest) else rest
    return calib, rest[pick]


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Recall averaged over the classes present in ``truth``, each weighing the same."""
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
        s = balanced_accuracy(open_set_decision(probs, float(t)), truth)
        if s > score + 1e-12:
            best, score = float(min(t, 1.0)), s
    return best, score


def open_set_threshold(reference: np.ndarray, teacher_logits: np.ndarray, source: str | None,
                       other_bias: float = 0.0) -> tuple[float, dict]:
    """The open-set threshold and how it was chosen: fitted on validation images (the teacher's argmax,
    "other" included, as the truth) from ``source`` (the real ones, or the bank's with its negatives); with
    neither (None), 0, so the other output alone decides. Both the student's outputs and the teacher's truth
    are read with ``other_bias``."""
    rows = ~np.isnan(teacher_logits).any(1)
    if source is None or not rows.any():
        return 0.0, {"source": "none", "images": 0,
                     "note": "no real validation images and no negatives to fit on: the other output alone decides"}
    k = teacher_logits.shape[1] - 1
    truth = with_other_bias(teacher_logits[rows], k, other_bias).argmax(1)
    t, score = fit_threshold(softmax(with_other_bias(reference[rows], k, other_bias)), truth)
    return t, {"source": source, "images": int(rows.sum()), "balanced_accuracy": round(score, 4),
               "other_images": int((truth == teacher_logits.shape[1] - 1).sum())}
