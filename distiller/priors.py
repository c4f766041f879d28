"""Image priors (``synthesis.prior``): how a synthesised image is parametrised, and what the optimiser moves.

- ``fourier``: decorrelated-colour Fourier spectra (Lucid's feature-visualisation prior), seen through random
  crops, flips and rotations. The default.
- ``pixels``: raw pixels, DeepInversion's ImageNet recipe (NVlabs ``imagenet_inversion.py``, setting 0): random
  roll (jitter) and flips, BN statistics matched in L2 with the first BN layer weighted x10, Adam with betas
  (0.5, 0.9), warm-up then cosine per resolution, clipped to valid colours after every step, an optional
  coarse-to-fine schedule (``synthesis.resolutions`` / ``resolution_steps``); its coefficients are
  ``[synthesis.pixels]``.
- ``vqgan``: continuous VQGAN latents decoded by a diffusers ``VQModel`` (``synthesis.prior_weights``: a hub id
  or a local folder), quantised to the nearest codebook entry with a straight-through gradient (VQGAN-CLIP).

The synthesizer (``synthesis.synthesize``) asks a prior for its phases, images, views and penalties, and knows
nothing else; the teacher's losses do not change, except that a prior may set the BN prior's form and weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import UserError
from runtime.registry import Registry

from .augment import random_views
from .hub import hub_reachable
from .units import format_duration

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


PRIORS: Registry[type] = Registry("synthesis.prior")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def crop_views(img: torch.Tensor, out_size: int, generator: torch.Generator, cfg) -> torch.Tensor:
    """``cfg.crops`` random crops, flips, rotations and noise of each image (transformation robustness)."""
    return torch.cat([random_views(img, out_size, generator, cfg.crop_scale, cfg.rotate_deg, True, cfg.noise)
                      for _ in range(cfg.crops)])


class Prior:
    """An image prior: what the synthesizer asks of it (phases, images, views, penalties, the loss settings it
    implies). The defaults: one phase of ``cfg.steps`` Adam steps at ``cfg.lr``, crop views, no penalty."""
    costly = False   # a forward and backward pass costs far more than the teacher's (warned about on CPUs)

    def __init__(self, batch: int, size: int, generator: torch.Generator, cfg, device="cpu"):
        self.batch, self.size, self.cfg, self.device = batch, size, cfg, device

    @staticmethod
    def check(cfg, offline: bool = False) -> None:
        """The recipe's settings for this prior, before anything is written."""

    @staticmethod
    def phases(cfg) -> list[int]:
        """The optimisation steps of each phase (one phase unless the prior has a schedule)."""
        return [cfg.steps]

    @classmethod
    def steps(cls, cfg) -> int:
        """Optimisation steps per image (the plan's estimate and the progress count)."""
        return sum(cls.phases(cfg))

    @staticmethod
    def timing_cfg(cfg, steps: int):
        """``cfg`` for timing ``steps`` steps at the bank's resolution (the plan's estimate)."""
        return dataclasses.replace(cfg, steps=steps)

    def schedule(self) -> list[int]:
        return self.phases(self.cfg)

    def begin(self, phase: int):
        """The optimiser and learning-rate schedule (or None) of ``phase``."""
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr), None

    def views(self, img: torch.Tensor, out_size: int, generator: torch.Generator) -> torch.Tensor:
        return crop_views(img, out_size, generator, self.cfg)

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def loss_cfg(self, cfg):
        return cfg

    def final(self) -> torch.Tensor:
        with torch.no_grad():
            return self.image()


@PRIORS.register("fourier")
class FourierPrior(Prior):
    def __init__(self, batch, size, generator, cfg, device="cpu"):
        super().__init__(batch, size, generator, cfg, device)
        self.image = FourierImage(batch, size, generator, cfg.decay_power).to(device)

    def parameters(self):
        return self.image.parameters()


@PRIORS.register("pixels")
class PixelsPrior(Prior):
    """Pixels in ImageNet-normalised units (DeepInversion's space: its learning rate and penalties mean the same)."""

    def __init__(self, batch, size, generator, cfg, device="cpu"):
        super().__init__(batch, size, generator, cfg, device)
        self.px, self.sizes = cfg.pixels, list(cfg.resolutions) or [size]
        self.mean, self.std = IMAGENET_MEAN.to(device), IMAGENET_STD.to(device)
        self.x = torch.randn(batch, 3, self.sizes[0], self.sizes[0], generator=generator).to(device).requires_grad_()

    @staticmethod
    def check(cfg, offline=False) -> None:
        res, steps = list(cfg.resolutions), list(cfg.resolution_steps)
        if len(res) != len(steps):
            raise UserError(f"synthesis.resolutions {res} and synthesis.resolution_steps {steps} must have one entry each "
                            f"per phase: e.g. resolutions = [64, 128], resolution_steps = [200, 100]")
        if res != sorted(res) or any(r < 8 for r in res):
            raise UserError(f"synthesis.resolutions {res} must rise from small to large, each at least 8 px")
        if any(s < 1 for s in steps):
            raise UserError(f"synthesis.resolution_steps {steps}: every phase needs at least one step")

    @staticmethod
    def phases(cfg) -> list[int]:
        return list(cfg.resolution_steps) or [cfg.steps]

    @staticmethod
    def timing_cfg(cfg, steps):   # every phase's step costs the teacher's forward at its own input size
        return dataclasses.replace(cfg, steps=steps, resolutions=(), resolution_steps=())

    def parameters(self):
        return [self.x]

    def begin(self, phase):
        if phase:   # handed up in size; a new optimiser and schedule per resolution (DeepInversion's)
            r = self.sizes[phase]
            self.x = F.interpolate(self.x.detach(), size=(r, r), mode="bilinear", align_corners=False).requires_grad_()
        opt = torch.optim.Adam([self.x], lr=self.px.lr, betas=tuple(self.px.betas), eps=1e-8)
        n = self.schedule()[phase]
        warm = max(1, round(self.px.warmup * n))

        def lr_at(i):   # linear warm-up, then cosine to 0
            return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, n - warm)))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def image(self) -> torch.Tensor:
        return self.x * self.std + self.mean

    def views(self, img, out_size, generator):
        """Per crop: one random roll of the batch by up to ``jitter`` of the side, and a flip half the time."""
        lim = round(self.px.jitter * img.shape[-1])
        out = []
        for _ in range(self.cfg.crops):
            u = torch.randint(-lim, lim + 1, (2,), generator=generator).tolist() if lim else [0, 0]
            v = torch.roll(img, shifts=(u[0], u[1]), dims=(2, 3))
            if self.px.flip and bool(torch.rand((), generator=generator) < 0.5):
                v = v.flip(3)
            out.append(_resized(v, out_size))
        return torch.cat(out)

    def penalty(self):
        """Per image: DeepInversion's L2 total variation (4 directions) and L2 norm, in normalised units."""
        x = self.x
        diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
                 x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
        tv = sum(d.flatten(1).norm(dim=1) for d in diffs)
        return self.px.tv_l2 * tv + self.px.l2 * x.flatten(1).norm(dim=1)

    def after_step(self):
        with torch.no_grad():   # keep every pixel a valid colour
            self.x.copy_(torch.max(torch.min(self.x, (1 - self.mean) / self.std), -self.mean / self.std))

    def loss_cfg(self, cfg):
        return dataclasses.replace(cfg, bn_weight=self.px.bn_weight, bn_form=self.px.bn_form,
                                   first_bn_weight=self.px.first_bn_weight)

    def final(self):
        with torch.no_grad():
            return _resized(self.image().clamp(0, 1), self.size)


def _resized(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-1] == size:
        return img
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@PRIORS.register("vqgan")
class VQGANPrior(Prior):
    """Latents of the decoder's codebook dimension, ``size / 2^(down blocks - 1)`` on a side, starting at random codes."""
    costly = True

    def __init__(self, batch, size, generator, cfg, device="cpu"):
        super().__init__(batch, size, generator, cfg, device)
        self.vq = load_vq(cfg.prior_weights, device)
        side = -(-size // downsampling(self.vq))
        codebook = self.vq.quantize.embedding.weight.detach()
        codes = torch.randint(len(codebook), (batch, side, side), generator=generator).to(codebook.device)
        self.z = codebook[codes].permute(0, 3, 1, 2).contiguous().requires_grad_()

    @staticmethod
    def check(cfg, offline=False) -> None:
        check_vq(cfg.prior_weights, offline)

    def parameters(self):
        return [self.z]

    def begin(self, phase):
        return torch.optim.Adam([self.z], lr=self.cfg.vqgan.lr), None

    def latents(self) -> torch.Tensor:
        """What the decoder reads: the nearest codebook entries with a straight-through gradient, or ``z`` itself."""
        return self.vq.quantize(self.z)[0] if self.cfg.vqgan.quantize else self.z

    def image(self):
        q = self.latents()
        dec = self.vq.decoder(self.vq.post_quant_conv(q), q if self.vq.config.norm_type == "spatial" else None)
        img = ((dec.float() + 1) / 2).clamp(0, 1)
        off = (img.shape[-1] - self.size) // 2
        return img[..., off:off + self.size, off:off + self.size]


def downsampling(vq) -> int:
    return 2 ** (len(vq.config.block_out_channels) - 1)


def make_prior(cfg, batch: int, size: int, generator: torch.Generator, device="cpu") -> Prior:
    return PRIORS.get(cfg.prior)(batch, size, generator, cfg, device)


def check_prior(cfg, offline: bool = False) -> None:
    """``synthesis.prior`` and its settings, before anything is written."""
    PRIORS.get(cfg.prior).check(cfg, offline)   # (the BN prior's forms are the recipe's own Literal)


# --- the VQGAN decoder: diffusers' VQModel from a local folder or the hub --------------------------------------

_LOADED: dict[tuple[str, str], object] = {}


def _local(weights: str) -> bool:
    return weights.startswith(("/", ".", "~")) or Path(weights).expanduser().exists()


def _hub_parts(weights: str) -> tuple[str, str | None]:
    parts = weights.strip("/").split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def check_vq(weights: str, offline: bool = False) -> None:
    """A VQModel folder (config.json naming VQModel), or a hub id in the cache or reachable; else one clear line."""
    if not weights:
        raise UserError("synthesis.prior = vqgan needs its decoder: set synthesis.prior_weights to a diffusers VQModel "
                        "hub id (ORG/NAME or ORG/NAME/SUBFOLDER) or a local folder saved with save_pretrained")
    if _local(weights):
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise UserError(f"synthesis.prior_weights = {weights}: no such folder: give a folder saved with "
                            f"VQModel.save_pretrained, or a hub id")
        try:
            name = json.loads((folder / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != "VQModel":
            raise UserError(f"synthesis.prior_weights = {weights} is not a diffusers VQModel folder (its config.json "
                            f"{'names ' + repr(name) if name else 'is missing or unreadable'}): give a folder saved "
                            f"with VQModel.save_pretrained")
        return
    if len(weights.strip("/").split("/")) < 2:
        raise UserError(f"synthesis.prior_weights = {weights!r} is neither a folder nor a hub id: write ORG/NAME "
                        f"(or ORG/NAME/SUBFOLDER) or a local folder path")
    if _cached(weights):
        return
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise UserError(f"VQGAN decoder {weights} is not in the local cache and the hub cannot be reached: download "
                        f"it elsewhere (VQModel.from_pretrained(...).save_pretrained(DIR)) and set "
                        f"synthesis.prior_weights = LOCAL_DIR")


def _cached(weights: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    repo, sub = _hub_parts(weights)
    return isinstance(try_to_load_from_cache(repo, f"{sub}/config.json" if sub else "config.json"), str)


def load_vq(weights: str, device="cpu"):
    """The frozen decoder (loaded once per process and device)."""
    key = (weights, str(device))
    if key not in _LOADED:
        from diffusers import VQModel
        if _local(weights):
            vq = VQModel.from_pretrained(str(Path(weights).expanduser()))
        else:
            repo, sub = _hub_parts(weights)
            vq = VQModel.from_pretrained(repo, subfolder=sub, local_files_only=_cached(weights))
        _LOADED[key] = vq.eval().requires_grad_(False).to(device)
    return _LOADED[key]


def resolve_weights(cfg):
    """A local decoder folder as an absolute path (the run is read from other folders too)."""
    if cfg.prior_weights and _local(cfg.prior_weights):
        return dataclasses.replace(cfg, prior_weights=str(Path(cfg.prior_weights).expanduser().resolve()))
    return cfg


def step_cost(cfg, size: int, device="cpu") -> float:
    """Seconds one forward and backward pass of one image of the prior costs at ``size`` px (measured once)."""
    import time
    prior = make_prior(cfg, 1, size, torch.Generator().manual_seed(0), device)
    t0 = time.perf_counter()
    prior.image().float().mean().backward()
    return time.perf_counter() - t0


def cost_warning(cfg, size: int, images: int, device: str) -> str | None:
    """For a costly prior (vqgan) on a CPU: its decoder's pass, measured on one image here, times the planned bank."""
    prior = PRIORS.get(cfg.prior)
    if not prior.costly or device != "cpu":
        return None
    per, steps = step_cost(cfg, size, device), prior.steps(cfg)
    return (f"synthesis.prior = {cfg.prior} on a CPU: its decoder's forward and backward pass takes {per:.2f} s per image "
            f"and step at {size} px here (measured), so {images} images x {steps} steps add about "
            f"{format_duration(per * images * steps)}: use a GPU (--recipe gpu-vqgan) for real banks")
