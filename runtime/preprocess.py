"""Image loading and preprocessing with numpy and Pillow only.

Reproduces torchvision's ``Resize(int)`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on
PIL images, which is what timm's and open_clip's eval transforms are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .metadata import Preprocess

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_image(image: ImageLike) -> Image.Image:
    """Any supported input as an RGB PIL image; EXIF orientation applied for files."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise UserError(f"array images must be HxW or HxWxC uint8 with C in 1, 3, 4; got {image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as an image ({exc.__class__.__name__}): check the file") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _PIL_INTERP[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:  # torchvision pads with zeros; we never resize below the crop
        raise UserError(f"image {w}x{h} is smaller than the {size} px crop")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, cfg: Preprocess) -> np.ndarray:
    """CHW float32, normalised."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(image: ImageLike, cfg: Preprocess) -> np.ndarray:
    """One image as a CHW float32 array ready for the model."""
    img = load_image(image)
    img = resize_shorter(img, cfg.resize, cfg.interpolation)
    img = center_crop(img, cfg.size)
    return to_tensor(img, cfg)


def list_images(root: Path) -> list[Path]:
    """Image files under a folder, sorted, hidden files skipped."""
    return sorted(
        p for p in Path(root).rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
