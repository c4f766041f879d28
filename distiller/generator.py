"""Amortised synthesis: a small conditional generator trained on the synthesis objective, then sampled.

Per-image inversion spends its whole budget on every image. A generator (DFAD, CMI, Fast-DFKD)
spends it once, on the same objective (the teacher's loss over the same random robust views, with
the recipe's ensemble / adversarial terms; the batch-norm prior over each generated batch is what
keeps its samples apart), and then makes any number of images for a forward pass each.

``synthesis.generator_steps > 0`` selects it. The generator is checkpointed (``generator.pt`` in
the run folder) every ``SAVE_EVERY`` steps, so an interrupted run resumes its training; the bank's
shards are then sampled with their own seeds, so they are the same whenever they are made.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .synthesis import robust_loss
from .torchfiles import load_torch, save_torch

SAVE_EVERY = 50


class Generator(torch.nn.Module):
    """z and a condition (a concept index, or a text embedding) -> an image in [0, 1].

    DCGAN-style: a linear map to ``size/16`` px (rounded up), four upsample + conv + BN + LeakyReLU
    blocks, resized to ``size`` when it is not a multiple of 16."""

    def __init__(self, size: int, cond: int, cond_dim: int = 0, zdim: int = 128, width: int = 128):
        super().__init__()
        self.zdim, self.size, self.start, self.width = zdim, size, -(-size // 16), width
        self.embed = torch.nn.Linear(cond_dim, zdim) if cond_dim else torch.nn.Embedding(cond, zdim)
        self.fc = torch.nn.Linear(2 * zdim, width * self.start * self.start)
        chans = [width, width, width // 2, width // 4, width // 8]
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Upsample(scale_factor=2, mode="nearest"),
            torch.nn.Conv2d(a, b, 3, padding=1, bias=False), torch.nn.BatchNorm2d(b), torch.nn.LeakyReLU(0.2))
            for a, b in zip(chans[:-1], chans[1:]))
        self.out = torch.nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(targets)], 1)
        x = F.leaky_relu(self.fc(h), 0.2).view(-1, self.width, self.start, self.start)
        for block in self.blocks:
            x = block(x)
        x = self.out(x)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _build(sample_targets: torch.Tensor, labels: int, size: int) -> Generator:
    if _indexed(sample_targets):
        return Generator(size, cond=labels)
    return Generator(size, cond=0, cond_dim=sample_targets.shape[-1])


def _indexed(targets: torch.Tensor) -> bool:
    return targets.dtype in (torch.int64, torch.int32)


def _condition(targets: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """What the generator sees: the concept when targets are class indices (an ImageNet teacher's member
    classes are too many and too sparse to learn one embedding each, and cross-entropy to a randomly
    sampled member learnt nothing in 200 steps; the generator's loss is then the concept's pooled
    cross-entropy, ``targets`` None), the text embedding (class x style) otherwise."""
    return classes if _indexed(targets) else targets


def _aim(targets: torch.Tensor):
    """What the objective aims each image at: None (its concept) when the generator sees the concept."""
    return None if _indexed(targets) else targets


def train_generator(objective, source, labels: int, styles: int, cfg, size: int, path: Path, seed: int,
                    device="cpu", on_step=None) -> Generator:
    """Train (or resume, or load) the generator for ``cfg.generator_steps`` steps of batch ``cfg.shard_size``."""
    gen = torch.Generator().manual_seed(seed)
    probe = source.targets(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), gen)
    torch.manual_seed(seed)
    g = _build(probe, labels, size).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.generator_lr, betas=(0.5, 0.999))
    step = 0
    if path.exists():
        ck = load_torch(path)
        g.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, gen = ck["step"], _generator_from(ck["rng"])
    b = cfg.shard_size
    pairs = cfg.generator_diversity > 0 and b >= 2
    while step < cfg.generator_steps:
        g.train()
        cls = torch.randint(labels, (b // 2 if pairs else b,), generator=gen)
        sty = torch.randint(styles, (len(cls),), generator=gen)
        if pairs:   # each (class, style) twice, with two z: the mode-seeking term compares the two images
            cls, sty = cls.repeat(2), sty.repeat(2)
        targets = source.targets(cls, sty, gen).to(device)
        z = torch.randn(b, g.zdim, generator=gen).to(device)
        img = g(z, _condition(targets, cls).to(device))
        loss = robust_loss(objective, img, _aim(targets), cls.to(device), cfg, gen).mean()
        if pairs:
            loss = loss + cfg.generator_diversity * mode_seeking(img, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if on_step:
            on_step(step, float(loss.detach()))
        if step % SAVE_EVERY == 0 or step == cfg.generator_steps:
            save_torch({"model": g.state_dict(), "opt": opt.state_dict(), "step": step, "rng": gen.get_state()}, path)
    return g.eval()


def mode_seeking(img: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN's mode-seeking term for a batch whose halves share their conditions: 1 / (image distance /
    z distance). A generator that ignores z (one image per class: what 1200 steps gave here without it)
    pays for it."""
    h = len(img) // 2
    ratio = (img[:h] - img[h:2 * h]).abs().mean() / (z[:h] - z[h:2 * h]).abs().mean()
    return 1.0 / (ratio + 1e-5)


def _generator_from(state: torch.Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def sampler(g: Generator, objective, cfg, device="cpu"):
    """``produce(targets, classes, gen)`` for ``fill_bank``: generated uint8 images and their objective loss."""
    @torch.no_grad()
    def produce(targets, classes, gen):
        z = torch.randn(len(targets), g.zdim, generator=gen).to(device)
        targets, classes = targets.to(device), classes.to(device)
        img = g(z, _condition(targets, classes))
        loss = objective.synthesis_loss(img, _aim(targets), classes, cfg).float().cpu()
        out = (img * 255).round().clamp(0, 255).to(torch.uint8)
        return out.permute(0, 2, 3, 1).cpu().contiguous(), loss
    return produce


def trained_steps(path: Path) -> int:
    """Steps of generator training finished in ``path`` (the generator stage's progress so far)."""
    return int(load_torch(path)["step"]) if Path(path).exists() else 0
