"""Calibration images made from the student itself (after ZeroQ, Cai et al. CVPR 2020): pixels optimised so
that the feature statistics of every BatchNorm layer of the *student*, over the batch, match the running
statistics the layer learnt on photos. Quantizers calibrated on them see activation ranges like a photo's,
which the teacher's surrogate textures do not give (the INT8 lever of issue 25, measured in benchmarks/int8.py).

A batch is optimised together (BN statistics are batch statistics), seeded by (seed, batch index), so a batch
is the same images whichever process makes it and whenever. Images are pixels in [0, 1] at the student's input
size (jitter and flips between steps, as DeepInversion), returned as uint8 HWC: already the student's crop, so
they are normalised, never resized, on the way to a quantizer (``to_tensor``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from runtime.atomic import clean_temporaries, write_json
from runtime.errors import UserError

from .bank import Shards
from .bnstats import BNStats
from .recipe import CalibrationCfg


class Schedule(Protocol):
    """How images are optimised: the recipe's ``[calibration]`` (``CalibrationCfg``) or a run's ``StatPlan``."""
    steps: int
    batch: int
    lr: float
    jitter: float
    form: str


def make_batch(model: torch.nn.Module, count: int, size: int, mean, std, cfg: Schedule, seed: int) -> np.ndarray:
    """``count`` images (uint8 [count, size, size, 3]) whose BN statistics in ``model`` match its running ones."""
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    params = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (0.5 + 0.2 * torch.randn(count, 3, size, size, generator=gen)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    stats = BNStats(model)
    stats.form, stats.active = cfg.form, True
    shift = max(1, int(cfg.jitter * size))
    try:
        for _ in range(cfg.steps):
            dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
            view = torch.roll(x, (dx, dy), (2, 3))
            if torch.rand((), generator=gen) < 0.5:
                view = view.flip(3)
            stats.terms = []
            model((view - mean_t) / std_t)
            loss = stats.prior(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    finally:
        stats.close()
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
    return (x.detach().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def statistic_gap(model: torch.nn.Module, images: np.ndarray, mean, std, form: str = "kl") -> float:
    """The BN prior of ``images`` (uint8 HWC at the model's input size) in ``model``: how far their batch statistics
    lie from the running ones (0: identical)."""
    stats = BNStats(model.eval())
    stats.form, stats.active = form, True
    try:
        with torch.no_grad():
            model(torch.from_numpy(to_tensor(images, mean, std)))
        return float(stats.prior(1.0))
    finally:
        stats.close()


def to_tensor(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HWC images at the input size -> normalised NCHW float32 (no resize: they are the crop already)."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


def make_images(model: torch.nn.Module, count: int, size: int, mean, std, cfg: Schedule, seed: int) -> np.ndarray:
    """``count`` images made ``cfg.batch`` at a time; batch b is seeded (seed, b), as the run folder's shards are."""
    batches = [make_batch(model, min(cfg.batch, count - s), size, mean, std, cfg, batch_seed(seed, b))
               for b, s in enumerate(range(0, count, cfg.batch))]
    return np.concatenate(batches) if batches else np.zeros((0, size, size, 3), np.uint8)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a run seeded ``seed`` (the generator's 63-bit range)."""
    return (seed * 1_000_003 + 7919 * (batch + 1)) % (2**63 - 1)


@dataclass(frozen=True)
class StatPlan:
    """What ``calibration/`` will hold: ``calibration`` images the quantizers see, then ``holdout`` more that judge
    them, made ``batch`` at a time (one shard per batch) with these settings."""
    calibration: int
    holdout: int
    size: int
    batch: int
    steps: int
    lr: float
    jitter: float
    form: str
    seed: int

    @property
    def total(self) -> int:
        return self.calibration + self.holdout

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.batch)

    def indices(self, shard: int) -> range:
        return range(shard * self.batch, min(self.total, (shard + 1) * self.batch))


def stat_plan(recipe, calibration: int, size: int) -> StatPlan:
    c: CalibrationCfg = recipe.calibration
    return StatPlan(calibration, c.holdout, size, c.batch, c.steps, c.lr, c.jitter, c.form, recipe.seed)


class StatImages(Shards):
    """``calibration/``: plan.json and one atomic shard per batch (images.npy uint8 [n, S, S, 3], logits.npy: the
    student's FP32 outputs on them, records.json). Written like the bank: a kill loses at most the batch in hand,
    and a resumed set is byte-identical to an uninterrupted one (each batch is seeded by its index)."""

    def plan(self) -> StatPlan | None:
        p = self.root / "plan.json"
        return StatPlan(**json.loads(p.read_text())) if p.exists() else None

    def start(self, plan: StatPlan) -> None:
        old = self.plan()
        if old is not None and old != plan:
            diffs = [k for k in asdict(plan) if asdict(plan)[k] != asdict(old)[k]]
            raise UserError(f"{self.root} was made with other settings ({', '.join(diffs)}): remove it to make them "
                            f"again with the recipe's, or start the run over with --exist-ok")
        self.root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.root)
        if old is None:
            write_json(self.root / "plan.json", asdict(plan))

    def is_complete(self) -> bool:
        plan = self.plan()
        return plan is not None and len(self.complete()) == plan.num_shards

    def make_shard(self, model: torch.nn.Module, plan: StatPlan, shard: int, mean, std) -> None:
        rows = plan.indices(shard)
        images = make_batch(model, len(rows), plan.size, mean, std, plan, batch_seed(plan.seed, shard))
        with torch.no_grad():
            logits = model(torch.from_numpy(to_tensor(images, mean, std))).numpy()
        records = [{"index": i, "split": "calibration" if i < plan.calibration else "holdout"} for i in rows]
        self.write_shard(shard, images, logits, records)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(calibration images, held-out images), uint8 HWC at the student's input size."""
        plan = self.plan()
        if plan is None or not self.is_complete():
            raise UserError(f"{self.root} is not complete: run `distiller export` on the run to make it")
        images = np.concatenate([self.arrays(i)[0] for i in self.complete()])
        return images[:plan.calibration], images[plan.calibration:]
