"""Linear probe: a fresh concept head fitted on a pretrained student's frozen features.

The first half of LP-FT (Kumar et al., ICLR 2022): a random head fine-tuned at once sends large,
random gradients into the backbone and distorts the features it was chosen for. Fitting the head
first, on frozen features of the eval view of each image and of its mirror, against the teacher's
soft labels, gives fine-tuning a head that already agrees with the teacher (and "as initialised",
epoch 0, is then the probed student, which competes with every fine-tuned epoch).
"""
from __future__ import annotations

import torch

from .augment import Normalizer, resize_center, to_float


@torch.no_grad()
def features(student, spec, images_u8, device="cpu", batch_size=64, mirror=True) -> torch.Tensor:
    """Pre-logit features of the eval view (and its mirror) of uint8 [N, H, W, 3] images: [N or 2N, D]."""
    student.eval()
    norm = Normalizer(spec.preprocess).to(device)
    out, flipped = [], []
    for i in range(0, len(images_u8), batch_size):
        x = norm(resize_center(to_float(images_u8[i:i + batch_size], device), spec.preprocess.size, spec.preprocess.resize))
        for views, acc in ((x, out), (x.flip(-1), flipped)) if mirror else ((x, out),):
            acc.append(student.pre_logits(views).float().cpu())
    return torch.cat(out + flipped)


def _scores(z, weight, bias, fixed=None, free=None):
    """The probe's logits: the linear rows, with ``fixed`` logits kept where ``free`` is False."""
    s = z @ weight.T + bias
    return s if fixed is None else torch.where(free, s, fixed)


def _fit(z, t, w, k: int, steps: int, temp: float, wd: float, fixed=None, free=None):
    """Soft-label logistic regression on standardised features: full batch, Adam, deterministic. With ``fixed``
    [N, k] and ``free`` (a bool mask over the k outputs), only the free outputs are learnt; the others keep
    their ``fixed`` logits (a pooled ImageNet output beside fresh ones)."""
    weight = torch.zeros(k, z.shape[1], requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.01)
    target = torch.softmax(t / temp, -1)
    w = w / w.sum()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        s = _scores(z, weight, bias, fixed, free)
        per = torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), target, reduction="none").sum(-1) * temp * temp
        loss = (per * w).sum() + wd * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach(), float(loss.detach())


CV_FOLDS = 5


def choose_weight_decay(z, t, w, n: int, cfg, fixed=None, free=None) -> tuple[float, dict]:
    """The probe's L2 weight from ``cfg.probe_weight_decay`` by 5-fold cross-validation over the images (both
    views of an image in one fold): the weighted agreement of each held-out fold's eval view with the teacher.
    Ties go to the stronger regulariser."""
    grid = sorted(cfg.probe_weight_decay, reverse=True)
    if len(grid) == 1 or n < 2 * CV_FOLDS:
        return grid[0], {}
    reps = len(z) // n
    fold = torch.arange(n) % CV_FOLDS
    fold = fold[torch.randperm(n, generator=torch.Generator().manual_seed(0))].repeat(reps)
    first = torch.arange(len(z)) < n                   # the eval view; the mirror only trains
    scores = {}
    for wd in grid:
        hit = tot = 0.0
        for f in range(CV_FOLDS):
            tr, te = fold != f, (fold == f) & first
            part = None if fixed is None else fixed[tr]
            weight, bias, _ = _fit(z[tr], t[tr], w[tr], t.shape[1], cfg.probe_steps, cfg.probe_temperature, wd, part, free)
            s = _scores(z[te], weight, bias, None if fixed is None else fixed[te], free)
            agree = (s.argmax(1) == t[te].argmax(1)).float()
            hit, tot = hit + float((agree * w[te]).sum()), tot + float(w[te].sum())
        scores[wd] = hit / max(tot, 1e-9)
    best = max(grid, key=lambda wd: scores[wd])         # max keeps the first (strongest) of equals
    return best, scores


def fit_head(student, spec, images_u8, teacher_logits, weights, cfg, device="cpu") -> dict:
    """Fit the fresh outputs of a pretrained ``student``'s concept head (a ``PooledStudent``) on frozen features
    to the teacher's soft labels (at ``probe_temperature``), its pooled outputs held as they are; the L2 weight
    chosen by cross-validation. Returns {probe_loss, probe_weight_decay, probe_cv}."""
    feats = features(student, spec, images_u8, device)
    n = len(images_u8)
    reps = len(feats) // n
    t = torch.as_tensor(teacher_logits).float().repeat(reps, 1)
    w = torch.as_tensor(weights).float().repeat(reps)
    head, outputs = student.head, list(spec.fresh_outputs)
    free = torch.zeros(t.shape[1], dtype=torch.bool)
    free[outputs] = True
    fixed = None
    if not bool(free.all()):
        with torch.no_grad():
            fixed = head.cpu()(feats).float()
        head.to(device)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-4)
    z = (feats - mean) / std                    # standardised: one learning rate suits every backbone
    wd, cv = choose_weight_decay(z, t, w, n, cfg, fixed, free)
    weight, bias, loss = _fit(z, t, w, t.shape[1], cfg.probe_steps, cfg.probe_temperature, wd, fixed, free)
    wf = weight / std                           # fold the standardisation into the rows
    head.set_rows(outputs, wf[outputs], (bias - wf @ mean)[outputs])
    return {"probe_loss": loss, "probe_weight_decay": wd, "probe_cv": {str(k): round(v, 4) for k, v in cv.items()}}
