"""Image batches as tensors: uint8 to float on the device, normalisation, and random differentiable views
(one affine warp does crop, scale, flip and rotation)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class Normalizer(torch.nn.Module):
    def __init__(self, pre):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def to_float(images_u8: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    x = torch.as_tensor(images_u8)
    if str(device).startswith("cuda"):   # uint8 through pinned memory: a quarter of the bytes of float, copied async
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device).permute(0, 3, 1, 2).float() / 255.0


def random_views(
    images: torch.Tensor,
    out_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.4, 1.0),
    rotate_deg: float = 0.0,
    flip: bool = True,
    noise: float = 0.0,
) -> torch.Tensor:
    """One random view per image of a [B, 3, H, W] batch in [0, 1], as [B, 3, out, out].

    ``scale`` is the fraction of the image area the view covers. Randomness comes only from
    ``generator`` (a CPU generator), so a seeded run repeats exactly on any device.
    """
    b = images.shape[0]
    u = torch.rand(b, 6, generator=generator)
    side = torch.sqrt(scale[0] + (scale[1] - scale[0]) * u[:, 0])
    angle = (u[:, 1] * 2 - 1) * math.radians(rotate_deg)
    sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    tx = (u[:, 3] * 2 - 1) * (1 - side)
    ty = (u[:, 4] * 2 - 1) * (1 - side)
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([
        torch.stack([cos * sign, -sin, tx], -1),
        torch.stack([sin * sign, cos, ty], -1),
    ], 1).to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if noise > 0:
        eps = torch.randn(views.shape, generator=generator).to(views.device, views.dtype)
        views = views + noise * eps
    return views


def resize_center(images: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """Eval view of square [B, 3, H, W] images: shorter side to ``resize`` (bicubic, antialiased), centre crop."""
    if images.shape[-1] != resize:
        images = F.interpolate(images, size=(resize, resize), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top = int(round((resize - size) / 2.0))
    return images[..., top:top + size, top:top + size]
