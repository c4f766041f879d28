"""Surrogate-image synthesis: optimise images from noise until the teacher sees their targets.

What is optimised is the image prior's (``priors.py``, ``synthesis.prior``): the default is the
Fourier-spectrum / decorrelated-colour parametrisation of feature visualisation (Olah et al., Lucid,
``FourierImage`` here), which biases the optimisation towards natural 1/f images, seen through
transformation robustness: every step scores several random crops, flips and rotations of each image,
so the result must look like its target from many views rather than through one pixel-exact
adversarial pattern. DeepInversion's pixels and the paper's VQGAN latents are the other priors.

Knows nothing about files: it takes targets and returns finished uint8 images.
"""
from __future__ import annotations

import numpy as np
import torch

# Lucid's colour correlation (square root of the ImageNet colour covariance).
_COLOR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR / _COLOR.norm(dim=0).max()


class FourierImage(torch.nn.Module):
    """A batch of images parametrised by their decorrelated-colour Fourier spectra."""

    def __init__(self, batch: int, size: int, generator: torch.Generator, decay_power: float = 1.0, std: float = 0.01):
        super().__init__()
        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.rfftfreq(size)[None, :]
        freqs = np.sqrt(fx * fx + fy * fy)
        scale = 1.0 / np.maximum(freqs, 1.0 / size) ** decay_power
        scale = scale * np.sqrt(size * size)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32)[None, None, :, :, None])
        self.size = size
        self.spectrum = torch.nn.Parameter(std * torch.randn(batch, 3, size, size // 2 + 1, 2, generator=generator))

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex((self.spectrum * self.scale).contiguous())
        img = torch.fft.irfftn(spec, s=(self.size, self.size), norm="backward") / 4.0
        img = torch.einsum("bchw,dc->bdhw", img, _COLOR.to(img.device))
        return torch.sigmoid(img)


class Objective:
    """What synthesis minimises per image, beyond one teacher's own loss (DeepInversion and its kin).

    ``extra`` teachers (an ensemble sharing the teacher's targets): their losses are averaged in, so
    an image must convince every network rather than exploit one network's quirks. ``competitor``
    (the student as initialised): DeepInversion's Adaptive term, ``adversarial`` x (1 - JS(teacher,
    competitor)) with JS in [0, 1] over the concepts, pushes images to where the student still
    disagrees with the teacher. It is what ``synthesize`` needs of a teacher (``input_size``,
    ``synthesis_loss``), so either can be handed to it.
    """

    def __init__(self, teacher, extra=(), competitor=None, adversarial: float = 0.0):
        self.teacher, self.extra = teacher, list(extra)
        self.competitor, self.adversarial = competitor, float(adversarial)
        self.input_size = teacher.input_size

    def synthesis_loss(self, views, targets, classes, cfg) -> torch.Tensor:
        if self.competitor is not None and self.adversarial:
            loss, logits = self.teacher.synthesis_loss_and_logits(views, targets, classes, cfg)
        else:
            loss, logits = self.teacher.synthesis_loss(views, targets, classes, cfg), None
        for t in self.extra:
            loss = loss + t.synthesis_loss(views, targets, classes, cfg)
        loss = loss / (1 + len(self.extra))
        if logits is not None:
            k = self.teacher.num_classes   # disagreement over the concepts ("other" holds most of the mass)
            loss = loss + self.adversarial * (1 - js_divergence(logits[:, :k].float(), self.competitor(views)[:, :k].float()))
        return loss


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per row Jensen-Shannon divergence of two softmax distributions, in bits (0 same, 1 disjoint)."""
    pa, pb = logits_a.softmax(-1), logits_b.softmax(-1)
    m = (0.5 * (pa + pb)).clamp_min(1e-12).log()
    kl = lambda p, lp: (p * (lp - m)).sum(-1)   # noqa: E731
    return (0.5 * kl(pa, logits_a.log_softmax(-1)) + 0.5 * kl(pb, logits_b.log_softmax(-1))) / np.log(2.0)


class Competitor(torch.nn.Module):
    """A frozen student taking synthesis views ([0, 1], any size) through its own size and normalisation."""

    def __init__(self, model, size: int, mean, std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = size
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[-1] != self.size:
            views = torch.nn.functional.interpolate(views, size=(self.size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.model((views - self._mean) / self._std)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))


def robust_loss(objective, img: torch.Tensor, targets, classes: torch.Tensor, cfg, generator: torch.Generator,
                views=None) -> torch.Tensor:
    """Per image of ``img`` [B, 3, H, W]: ``objective``'s synthesis loss averaged over ``cfg.crops`` random
    views (default: crop, flip, rotation, noise; a prior may bring its own, ``views(img, size, generator)``).
    ``targets`` None: the objective aims at ``classes`` itself."""
    from .priors import crop_views
    b = img.shape[0]
    v = views(img, objective.input_size, generator) if views else crop_views(img, objective.input_size, generator, cfg)
    rep = None if targets is None else targets.repeat(cfg.crops, *([1] * (targets.dim() - 1)))
    return objective.synthesis_loss(v, rep, classes.repeat(cfg.crops), cfg).float().view(cfg.crops, b).mean(0)


def synthesize(teacher, targets: torch.Tensor, classes: torch.Tensor, cfg, size: int, generator: torch.Generator, device="cpu", autocast=None, on_step=None):
    """Optimise ``len(targets)`` images (``classes``: each one's concept index) of ``size`` px through the recipe's
    image prior (``synthesis.prior``: phases, images, views, penalties); returns (uint8 [B, H, W, 3] CPU tensor,
    final loss [B])."""
    from .priors import make_prior
    b = targets.shape[0]
    prior = make_prior(cfg, b, size, generator, device)
    loss_cfg = prior.loss_cfg(cfg)
    targets, classes = targets.to(device), classes.to(device)
    loss_per, step = torch.zeros(b), 0
    for phase, steps in enumerate(prior.schedule()):
        opt, sched = prior.begin(phase)
        for _ in range(steps):
            img = prior.image()
            with autocast() if autocast else _null():
                loss = robust_loss(teacher, img, targets, classes, loss_cfg, generator, prior.views)
            if cfg.tv_weight:
                loss = loss + cfg.tv_weight * total_variation(img)
            extra = prior.penalty()
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if sched is not None:
                sched.step()
            prior.after_step()
            loss_per, step = loss.detach().cpu(), step + 1
            if on_step:
                on_step(step, float(loss_per.mean()))
    final = (prior.final() * 255).round().clamp(0, 255).to(torch.uint8)
    return final.permute(0, 2, 3, 1).cpu().contiguous(), loss_per


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def teacher_logits(teacher, images_u8: torch.Tensor, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Teacher logits over the concepts for uint8 [N, H, W, 3] images, as float32 [N, K] on CPU."""
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i:i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append(teacher.logits(x).float().cpu())
    return torch.cat(out)
