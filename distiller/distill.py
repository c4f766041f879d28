"""Knowledge distillation: a student learns the teacher's soft labels on bank images.

KL divergence at temperature T on augmented views of bank images; the teacher relabels each
view (``relabel = true``) or the cached logits of the whole image are used. AdamW, linear warm-up
then cosine decay. ``last.pt`` after every epoch (resume continues from it), ``best.pt`` by
validation agreement with the teacher. Epoch 0, the student as initialised, is scored and is a
candidate too: ``epochs = 0`` ships a pretrained student as it starts (the free baseline). Knows nothing about export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import UserError

from .augment import Normalizer, random_views, resize_center, to_float
from .probe import fit_head
from .ranks import gather_rows, mean, world, wrap
from .students import create_student
from .torchfiles import load_torch, save_torch


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1), reduction="batchmean") * t * t


class Checkpoints:
    """The distill stage's artefacts: ``last.pt`` (resume: model, optimiser, schedule, history) after
    every epoch and ``best.pt`` (the model at the best validation agreement). Other stages read them
    through this, never by their keys."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    best = property(lambda s: s.folder / "best.pt")
    last = property(lambda s: s.folder / "last.pt")

    def state(self, device="cpu") -> dict | None:
        return load_torch(self.last, map_location=device) if self.last.exists() else None

    def last_epoch(self) -> int:
        """The last finished epoch (0: the student as initialised was scored), -1 before that."""
        state = self.state()
        return -1 if state is None else int(state["epoch"])

    def history(self) -> list[dict]:
        state = self.state()
        return [] if state is None else list(state["history"])

    def complete(self, epochs: int) -> bool:
        return self.best.exists() and self.last_epoch() >= epochs

    def save(self, state: dict, best: dict | None = None) -> None:
        if best is not None:
            save_torch(best, self.best)
        save_torch(state, self.last)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // max(1, min(batch_size, n_train)))


def total_steps(n_train: int, cfg) -> int:
    """Optimiser steps the whole KD loop takes on ``n_train`` images (the distill stage's progress total)."""
    return cfg.epochs * steps_per_epoch(n_train, cfg.batch_size)


SELECTION = ("real", "judge", "surrogate")   # the order of evidence an epoch is chosen by


def val_key(source: str) -> str:
    """The history key of the agreement on one validation source (``SELECTION``)."""
    return f"val_agreement_{source}"


VAL_KEYS = tuple(val_key(k) for k in SELECTION)
SIGNALS = {"real": "teacher agreement on your held-back real images",
           "judge": "agreement on the surrogate validation images the held-out judge also sees as their class",
           "surrogate": "teacher agreement on surrogate validation images (the weakest signal: the teacher's own images)"}


@dataclass
class TransferSet:
    """What the student learns from: train images (uint8 [N, R, R, 3]) with the teacher's logits and a loss
    weight per image, and validation sets per source: ``real`` (the user's held-back images), ``judge`` (the
    bank's validation images the held-out judge confirmed, against their intended class) and ``surrogate``.
    Selection trusts them in that order (``SELECTION``)."""
    images: np.ndarray
    logits: np.ndarray
    weights: np.ndarray
    val: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def selector(self) -> str:
        return next(k for k in SELECTION if len(self.val.get(k, ((),))[0]) or k == "surrogate")


def check_weights(cfg) -> None:
    if not cfg.probe_weight_decay:
        raise UserError("distill.probe_weight_decay = []: give one value or several (chosen by cross-validation)")
    if cfg.surrogate_weight == 0 and cfg.real_weight == 0:
        raise UserError("distill.surrogate_weight and distill.real_weight are both 0: keep one above 0 "
                        "(weights are relative; 0 drops a source)")


def transfer_set(bank, real, cfg, confirmed: set[int] | None = None) -> TransferSet:
    """The union of the surrogate bank's and the real images' train splits, each weighted by the recipe
    (``distill.surrogate_weight``, ``distill.real_weight``). Weights are relative: 0 drops a source when the
    other one has training images, and a source alone is used whatever its weight. Validation is kept per source;
    ``confirmed`` (bank indices the held-out judge saw as their class) adds the ``judge`` one."""
    train, val = {}, {}
    sources = [("surrogate", bank)] + ([("real", real)] if real is not None else [])
    for name, src in sources:
        im, lg, _ = src.load("train")
        if len(im):
            train[name] = (im, lg)
        vi, vl, recs = src.load("val")
        if len(vi):
            val[name] = (vi, vl)
        if name == "surrogate" and confirmed:
            keep = [i for i, r in enumerate(recs) if r["class"] is not None and int(r["index"]) in confirmed]
            classes = [recs[i]["class"] for i in keep]
            # against the intended class: the teacher and the judge both saw it there. Only when the judge confirmed
            # images of every concept: otherwise a student answering the confirmed concepts alone would score best
            if keep and len(set(classes)) == bank.plan().num_classes:
                target = np.full((len(keep), vl.shape[1]), -10.0, np.float32)
                target[np.arange(len(keep)), classes] = 10.0
                val["judge"] = (vi[keep], target)
    if not train:
        raise UserError("nothing to distill on: the run has no training images (check its bank and --images)")
    weights = source_weights({k: len(v[0]) for k, v in train.items()}, cfg)
    parts = [(im, lg, np.full(len(im), weights[k], np.float32)) for k, (im, lg) in train.items() if k in weights]
    return TransferSet(*(np.concatenate(x) for x in zip(*parts)), val)


def source_weights(counts: dict[str, int], cfg) -> dict[str, float]:
    """The loss weight of each source that trains (``counts``: its training images): those weighted above 0,
    or the only source there is, at weight 1."""
    check_weights(cfg)
    given = {"surrogate": cfg.surrogate_weight, "real": cfg.real_weight}
    have = {k: given[k] for k, n in counts.items() if n}
    return {k: w for k, w in have.items() if w > 0} or {k: 1.0 for k in have}


@torch.no_grad()
def student_logits(student, spec, images_u8, device="cpu", batch_size=128) -> torch.Tensor:
    """Student logits on the eval view (resize + centre crop) of uint8 [N, H, W, 3] images."""
    student.eval()
    norm = Normalizer(spec.preprocess).to(device)
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = resize_center(to_float(images_u8[i:i + batch_size], device), spec.preprocess.size, spec.preprocess.resize)
        out.append(student(norm(x)).float().cpu())
    return torch.cat(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def balanced_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Agreement averaged over the classes ``b`` picks, each weighing the same."""
    hit, truth = a.argmax(-1) == b.argmax(-1), b.argmax(-1)
    return float(torch.stack([hit[truth == k].float().mean() for k in truth.unique()]).mean())


def kd_loss_weighted(student_logits, teacher_logits, weights, temperature: float) -> torch.Tensor:
    t = temperature
    per = F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1), reduction="none").sum(-1)
    return (per * weights).sum() / weights.sum() * t * t


def _score(student, spec, data: TransferSet, device) -> dict:
    """Agreement with the teacher on each validation source; ``val_agreement`` is the selecting one's. Under
    torchrun each rank scores its share of the images and every rank gets the same numbers."""
    rec, w = {}, world()
    for name, (im, lg) in data.val.items():
        mine = im[w.rank::w.size]
        out = student_logits(student, spec, mine, device) if len(mine) else torch.zeros((0, lg.shape[1]))
        out, lg = gather_rows(out.to(device), len(im)).cpu(), torch.from_numpy(lg)
        # the judge's images: balanced over the concepts (the judge may confirm one concept far more than another)
        rec[val_key(name)] = balanced_agreement(out, lg) if name == "judge" else agreement(out, lg)
        if name == data.selector:
            rec["val_agreement"], rec["val_kl"] = rec[val_key(name)], float(kd_loss(out, lg, 1.0))
    rec["selected_on"] = data.selector
    return rec


def train_student(student, spec, data: TransferSet, cfg, ckpt_dir: Path, seed: int, teacher=None, device="cpu", autocast=None,
                  on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int, int], None] | None = None,
                  probe: bool = False) -> list[dict]:
    """Run (or resume) the KD loop; returns the per-epoch history. ``probe``: fit the (fresh) head on frozen
    features before epoch 0 (LP-FT).

    Under torchrun (``ranks``) this is DistributedDataParallel: every step's batch is the one a single process
    takes (the same seeded order, the same views), split between the ranks (rank r: its images r, r + N, ...,
    as a DistributedSampler deals them), and each rank's loss is scaled so the averaged gradient is the whole
    batch's: the effective batch is the recipe's, whatever N. Rank 0 probes the head and writes the checkpoints;
    validation is scored in shares and gathered. A checkpoint is an epoch, so a run resumes with another N."""
    n, w = len(data.images), world()
    bs = min(cfg.batch_size, n)
    if bs < w.size:
        raise UserError(f"a batch of {bs} images cannot be split between {w.size} ranks: use at most {bs} processes "
                        f"(or a larger distill.batch_size and bank)")
    if cfg.relabel and teacher is None:
        raise ValueError("relabel needs the teacher")
    steps = steps_per_epoch(n, cfg.batch_size)
    student.to(device)
    opt, sched = _optimiser(student, cfg, steps)
    ckpts = Checkpoints(ckpt_dir)
    start, best, history = _resume(ckpts, student, opt, sched, device)

    def checkpoint(rec, epoch):
        nonlocal best
        history.append(rec)
        improved = rec["val_agreement"] > best   # the same on every rank: the scores are gathered
        if improved:
            best = rec["val_agreement"]
        if not w.main:
            return
        ckpts.save({"model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": best, "history": history},
                   best={"model": student.state_dict(), "student": spec.model, "num_classes": spec.num_classes,
                         "epoch": epoch, "val_agreement": best} if improved else None)
        if on_epoch:
            on_epoch(rec)

    rec = {"epoch": 0, "loss": None}
    if not history and probe and w.main:   # rank 0 fits the (fresh) head; wrapping hands its weights to every rank
        rec.update(fit_head(student, spec, data.images, data.logits, data.weights, cfg, device))
    model = wrap(student, device)
    if not history:   # epoch 0: the student as initialised (its fresh head probed first, with ``probe``)
        checkpoint({**rec, **_score(student, spec, data, device)}, 0)
    for epoch in range(start, cfg.epochs):
        def stepped(s, epoch=epoch):
            if on_step:
                on_step(epoch * steps + s + 1, cfg.epochs * steps)
        loss = _train_epoch(model, student, spec, data, cfg, opt, sched, epoch, seed, teacher, device, autocast, stepped)
        checkpoint({"epoch": epoch + 1, "loss": mean(loss, device), **_score(student, spec, data, device)}, epoch + 1)
    return history


def _optimiser(student, cfg, steps: int):
    """AdamW with a linear warm-up over ``warmup_epochs``, then cosine decay to 0 over the rest."""
    total, warm = cfg.epochs * steps, cfg.warmup_epochs * steps
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _resume(ckpts: Checkpoints, student, opt, sched, device) -> tuple[int, float, list[dict]]:
    """(first epoch to train, best validation agreement so far, history) after loading ``last.pt`` if there is one."""
    state = ckpts.state(device)
    if state is None:
        return 0, -1.0, []
    student.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state["epoch"], state["best"], state["history"]


def _train_epoch(model, student, spec, data: TransferSet, cfg, opt, sched, epoch: int, seed: int, teacher, device,
                 autocast, on_step) -> float:
    """One epoch over the train images in a seeded order; its mean loss on this rank."""
    w = world()
    tr_img, tr_logit, tr_w = torch.from_numpy(data.images), torch.from_numpy(data.logits), torch.from_numpy(data.weights)
    n, bs = len(tr_img), min(cfg.batch_size, len(tr_img))
    steps = steps_per_epoch(n, cfg.batch_size)
    norm = Normalizer(spec.preprocess).to(device)
    student.train()
    if cfg.freeze_bn:   # keep the running statistics a pretrained student learnt on photos
        for m in student.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=gen)
    mine = slice(w.rank, None, w.size)   # this rank's share of every batch
    running = 0.0
    for s in range(steps):
        idx = perm[s * bs:(s + 1) * bs]   # the whole step's batch: its views are drawn as one process draws them
        s_in, t_logits, wt = _step_batch(to_float(tr_img[idx], device), tr_logit[idx], tr_w[idx].to(device), mine, spec,
                                         cfg, gen, teacher, device, seed, epoch, s)
        with autocast() if autocast else torch.enable_grad():
            out = model(norm(s_in))
        # this rank's weighted sum over the whole batch's weight, times N: DDP's mean of the gradients is the batch's
        loss = kd_loss_weighted(out.float(), t_logits, wt[mine], cfg.temperature) * (wt[mine].sum() / wt.sum() * w.size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        sched.step()
        running += loss.item()
        on_step(s)
    return running / steps


def _step_batch(x, cached_logits, wt, mine: slice, spec, cfg, gen, teacher, device, seed: int, epoch: int, step: int):
    """This rank's share (``mine``) of one step: the student's input views, their teacher logits (the teacher relabels
    exactly the view the student sees, or the cached logits of the whole image) and the whole batch's loss weights."""
    if not cfg.relabel:
        return random_views(x, spec.preprocess.size, gen, cfg.crop_scale)[mine], cached_logits[mine].to(device), wt
    views = random_views(x, teacher.input_size, gen, cfg.crop_scale)
    if cfg.mixup > 0:
        # seeded by the step, not the global RNG: the same on every rank and after a resume
        lam = float(np.random.default_rng([seed, epoch, step]).beta(cfg.mixup, cfg.mixup))
        views = lam * views + (1 - lam) * views.flip(0)
        wt = lam * wt + (1 - lam) * wt.flip(0)
    views = views[mine]   # this rank's share
    with torch.no_grad():
        t_logits = teacher.logits(views).float()
    s_in = F.interpolate(views, size=(spec.preprocess.size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    return s_in, t_logits, wt


def load_student(spec, ckpt: Path, device="cpu"):
    model = create_student(spec)
    model.load_state_dict(load_torch(ckpt, map_location=device)["model"])
    return model.eval()
