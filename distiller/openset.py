"""Open-set operating points on real images: how well known images rank above images of other things (AUROC,
the false-positive rate where 95% of known images are kept), what a rule's answer costs the known classes and
buys on the others, and the rule fitted on a user's own labelled photos (``distiller eval --fit``). The runtime
decides (``runtime.openset``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import UserError
from runtime.openset import SCORES, OpenSetRule, conformal_threshold

from .stats import auroc, auroc_interval, wilson

MIN_FIT_IMAGES = 10   # known images under which --fit refuses: its threshold would be the sample's minimum score
FIT_SCORE = "margin"  # --fit's score: on halves of the VLCS photos it kept 95% and rejected as many others as the
                      # teacher's own score did; the best concept output alone rejected half as many (docs/open-set.md)


def rejection(known: np.ndarray, other: np.ndarray, other_decisions, k: int, rule: OpenSetRule) -> dict:
    """Known images against images of other things, from outputs [N, K + 1] as the rule reads them: AUROC of the
    rule's score with its interval, and the share of the other images answered "other" (decision K) with a Wilson
    interval."""
    area, interval = score_auroc(rule.score, known, other, k)
    hit = int((np.asarray(other_decisions) == k).sum())
    n = len(other_decisions)
    return {"auroc": area, "auroc_ci": interval, "other_accuracy": hit / max(n, 1),
            "other_ci": wilson(hit, n), "other_images": n, "known_images": int(len(known)), "score": rule.score}


def balanced(pred: np.ndarray, truth: np.ndarray) -> float:
    """Recall averaged over the classes present in ``truth``, each weighing the same."""
    classes = np.unique(truth)
    return float(np.mean([(pred[truth == c] == c).mean() for c in classes])) if len(classes) else 0.0


@dataclass(frozen=True)
class OperatingPoint:
    """What one rule does on labelled known images and on images of none of the classes."""
    closed_balanced: float        # known-class balanced accuracy with the closed-set answer
    known_balanced: float         # ... with the rule's answer (a known image answered "other" is wrong)
    known_kept: float             # share of the known images not answered "other"
    other_answered: float         # share of the other images answered "other"
    other_ci: tuple[float, float]
    known_images: int
    other_images: int

    @property
    def ratio(self) -> float:
        return self.known_balanced / self.closed_balanced if self.closed_balanced else 0.0


def operating_point(rule: OpenSetRule, known: np.ndarray, truth: np.ndarray, other: np.ndarray, k: int) -> OperatingPoint:
    """``rule`` applied to outputs [N, K + 1] (bias applied) of known images (``truth``: their concept index) and of
    other images."""
    dk, do = rule.decide(known, k), rule.decide(other, k) if len(other) else np.zeros(0, int)
    hit = int((do == k).sum())
    return OperatingPoint(balanced(known[:, :k].argmax(1), truth), balanced(dk, truth), float((dk != k).mean()),
                          hit / max(len(do), 1), wilson(hit, len(do)), len(dk), len(do))


def fpr_at(score: str, known: np.ndarray, other: np.ndarray, k: int, keep: float = 0.95) -> float:
    """The share of other images kept (not rejected) by the ``score`` threshold that keeps ``keep`` of these known
    images: FPR95 at keep = 0.95 (an oracle on this set: a score's quality, not an operating point)."""
    rule = OpenSetRule(score)
    s_known, s_other = rule.known_score(known, k), rule.known_score(other, k)
    t = float(np.quantile(s_known, 1.0 - keep, method="lower"))
    return float((s_other >= t).mean())


def score_auroc(score: str, known: np.ndarray, other: np.ndarray, k: int) -> tuple[float, tuple[float, float]]:
    rule = OpenSetRule(score)
    pos, neg = rule.known_score(known, k), rule.known_score(other, k)
    return auroc(pos, neg), auroc_interval(pos, neg)


@dataclass(frozen=True)
class Fit:
    """A threshold fitted on a user's labelled known images, and what it buys on their other images."""
    rule: OpenSetRule
    promised: bool                # enough images for the conformal promise (keep >= asked on new images)
    point: OperatingPoint | None  # on the fitting images (None without other images)

    def to_json(self) -> dict:
        """As eval.json keeps it: the rule written, and what it did on the fitting images."""
        return {"rule": self.rule.to_json(), "promised": self.promised,
                **(asdict(self.point) if self.point is not None else {})}


def fit_rule(score: str, known: np.ndarray, truth: np.ndarray, other: np.ndarray | None, k: int, keep: float,
             source: str) -> Fit:
    """The rule on ``score`` whose threshold keeps at least ``keep`` of new known images like these (split
    conformal over the known images' scores), turned on. Too few known images is a user error."""
    if score not in SCORES:
        raise UserError(f"unknown open-set score {score!r}: use one of {', '.join(SCORES.names())}")
    if not 0.5 <= keep < 1.0:
        raise UserError(f"--keep {keep}: use a share in [0.5, 1), e.g. 0.95")
    if len(known) < MIN_FIT_IMAGES:
        raise UserError(f"--fit needs at least {MIN_FIT_IMAGES} labelled images of the classes, got {len(known)}: "
                        "add more photos to --data")
    threshold, promised = conformal_threshold(OpenSetRule(score).known_score(known, k), keep)
    rule = OpenSetRule(score, threshold, True, {"source": source, "keep": keep, "known_images": int(len(known)),
                                                "other_images": int(0 if other is None else len(other)),
                                                "promised": promised})
    point = operating_point(rule, known, truth, other, k) if other is not None and len(other) else None
    return Fit(rule, promised, point)


def describe_rule(rule: OpenSetRule, other_label: str, bias: float = 0.0, run: str = "RUN") -> str:
    """An open-set model's rule in one sentence (the make summary, report.html); ``run``: the run folder named in
    the fitting hint."""
    fit = rule.fit or {}
    read = f" (its other output read {bias:g} log-odds lower: other_bias)" if bias else ""
    what = SCORES.get(rule.score).description
    if fit.get("source") == "bank surrogates":
        how = f"set to keep {100 * fit['keep']:.0f}% of the run's {fit['images']} surrogate images of the classes"
    elif "keep" in fit:
        how = f"{fit['source']}, keeping {100 * fit['keep']:.0f}% of them"
    else:
        how = fit.get("note") or fit.get("source") or "as exported"
    rule_text = f"it answers {other_label} where {what}{read} is under {rule.threshold:.4g} ({how})"
    if rule.on:
        return f"Open set: {rule_text}."
    return (f"Open set is off by default: answers are always one of the classes; with it on, {rule_text}. "
            f"Turn it on with classify(open_set=True) or --set other_decision=on, or fit it on your own photos: "
            f"distiller eval {run} --data DIR --other-data DIR2 --fit")
