"""Which images the quantizers see and which judge them, and the open-set rule set at export.

Calibration (and NNCF's accuracy-control tuning) use train images spread evenly; the INT8 fidelity check uses
other images, never the same ones, so accuracy-controlled quantization cannot pass by fitting the images it is
judged on. The data-free open-set rule is set on the run's surrogate images of the concepts."""
from __future__ import annotations

import numpy as np

from runtime.openset import OpenSetRule, conformal_threshold


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


SURROGATE_SCORE = "max_logit"   # measured against the other scores: benchmarks/open_set.py, docs/open-set.md
SURROGATE_KEEP = 0.95           # FPR95's convention, with the class surrogates standing in for the known images


def surrogate_rule(outputs: np.ndarray, k: int, on: bool) -> OpenSetRule:
    """The data-free open-set rule: the best concept output (``SURROGATE_SCORE``) under the threshold that keeps
    ``SURROGATE_KEEP`` of the run's own surrogate images of the concepts (``outputs`` [N, K + 1]: the student's
    outputs, bias applied, on the bank images its teacher gives a concept; split conformal, so a new image like
    them is kept with that probability). Without any, the other output alone decides (margin 0)."""
    if not len(outputs):
        return OpenSetRule("margin", 0.0, on, {"source": "none", "images": 0,
                                               "note": "no surrogate image of a concept: the other output alone decides"})
    rule = OpenSetRule(SURROGATE_SCORE)
    threshold, promised = conformal_threshold(rule.known_score(outputs, k), SURROGATE_KEEP)
    return rule.replace(threshold=threshold, on=on, fit={"source": "bank surrogates", "images": int(len(outputs)),
                                                         "keep": SURROGATE_KEEP, "promised": promised})
