"""The open-set decision: when a model with an ``other_label`` output answers "none of these".

An open-set model has K concept outputs and one more, "other", last. A registered *score* reads those K + 1
outputs (``other_bias`` already taken off the other output) and says how much each image looks like one of the
concepts; the model's ``OpenSetRule`` answers ``other_label`` where the score is under its threshold, and the
closed-set answer (the best concept) everywhere else. Whether a plain ``classify`` applies the rule is the rule's
``on``: the exporter turns it on only where a data-free threshold was measured to keep the known classes
(docs/open-set.md); ``distiller eval --fit`` fits the threshold on a user's own photos and turns it on.
numpy only, like the rest of the runtime.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .errors import UserError
from .registry import Registry


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


@dataclass(frozen=True)
class Score:
    name: str
    read: Callable[[np.ndarray, int], np.ndarray]   # (outputs [N, K + 1], K) -> [N]; higher: more like a concept
    description: str


SCORES: Registry[Score] = Registry("open-set score")


def register_score(name: str, description: str):
    def deco(fn):
        SCORES.register(name, Score(name, fn, description))
        return fn
    return deco


@register_score("margin", "best concept output minus the other output (0: the other output wins)")
def _margin(z: np.ndarray, k: int) -> np.ndarray:
    return z[:, :k].max(1) - z[:, k]


@register_score("max_softmax", "the best concept's probability among the concepts alone")
def _max_softmax(z: np.ndarray, k: int) -> np.ndarray:
    return softmax(z[:, :k]).max(1)


@register_score("max_logit", "the best concept's output")
def _max_logit(z: np.ndarray, k: int) -> np.ndarray:
    return z[:, :k].max(1)


@register_score("energy", "logsumexp of the concept outputs")
def _energy(z: np.ndarray, k: int) -> np.ndarray:
    return logsumexp(z[:, :k])


@register_score("probability", "the best concept's probability over all K + 1 outputs, -1 where the other output "
                "wins (models of metadata schema 2 and 3)")
def _probability(z: np.ndarray, k: int) -> np.ndarray:
    p = softmax(z)
    best = p[:, :k].max(1)
    return np.where(p[:, k] > best, -1.0, best)


@dataclass(frozen=True)
class OpenSetRule:
    """Answer "other" where ``score`` is under ``threshold``; ``on``: whether ``classify`` does so by default
    (``open_set=True`` asks for it either way); ``fit``: how the threshold was chosen (source, images, recall)."""
    score: str = "margin"
    threshold: float = 0.0
    on: bool = True
    fit: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.score not in SCORES:
            raise UserError(f"open-set score {self.score!r} is unknown to this runtime ({', '.join(SCORES.names())}): "
                            "upgrade distiller or re-export the model")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise UserError(f"open-set threshold {self.threshold!r} is not a finite number: re-export the model, or "
                            "pass a number")
        object.__setattr__(self, "threshold", float(self.threshold))

    def known_score(self, outputs: np.ndarray, k: int) -> np.ndarray:
        """How much each row of outputs [N, K + 1] (bias applied) looks like a concept."""
        return SCORES.get(self.score).read(np.asarray(outputs, dtype=np.float64), k)

    def decide(self, outputs: np.ndarray, k: int) -> np.ndarray:
        """Answers for outputs [N, K + 1] as indices: the best concept, or K ("other") where the score is under
        the threshold."""
        outputs = np.asarray(outputs)
        return np.where(self.known_score(outputs, k) < self.threshold, k, outputs[:, :k].argmax(1))

    def replace(self, **changes) -> "OpenSetRule":
        return OpenSetRule(**{**asdict(self), **changes})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "model") -> "OpenSetRule":
        try:
            return cls(str(data["score"]), data["threshold"], bool(data.get("on", True)), dict(data.get("fit") or {}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{source}: its open-set rule is damaged ({type(exc).__name__}: {exc}): re-export it") from None


def with_other_bias(logits: np.ndarray, k: int, bias: float) -> np.ndarray:
    """``logits`` [..., K + 1] with ``bias`` taken off the other output (index K); a copy."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if bias and out.shape[-1] > k:
        out[..., k] -= bias
    return out


def conformal_threshold(scores: np.ndarray, keep: float) -> tuple[float, bool]:
    """The threshold that keeps at least ``keep`` of new images drawn like ``scores``, and whether the sample was
    big enough to promise it. Split conformal: the floor((n + 1)(1 - keep))-th smallest score, so that a new image
    from the same distribution is kept with probability >= keep; under rank 1 (fewer than 1 / (1 - keep) - 1
    images) the smallest score, which keeps every image of the sample but promises nothing more."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    rank = int(math.floor((len(s) + 1) * (1.0 - keep) + 1e-9))
    return float(s[max(rank, 1) - 1]), rank >= 1
