"""Image loading and preprocessing with numpy and Pillow only.

The exact path reproduces torchvision's ``Resize(int)`` + ``CenterCrop`` + ``ToTensor`` +
``Normalize`` on PIL images, which is what timm's and open_clip's eval transforms are. The fast
path (``fast=True``) gets the same picture for less: libjpeg decodes a large JPEG straight at 1/2,
1/4 or 1/8 scale (``Image.draft``, never below twice the resize target), and large downscales go
through Pillow's ``reducing_gap`` (a box reduction first, then the resampling filter).

Inputs: a path, encoded ``bytes`` (a socket, a camera API), a PIL image, or a numpy array (HxW or
HxWxC with C in 1, 3, 4; uint8, uint16 or float in [0, 1]; ``channels="bgr"`` for OpenCV frames).
16-bit images (``I;16`` PNGs, 48-bit RGB) are scaled to 8 bits, never clipped to white.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .metadata import Preprocess

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
MAX_PIXELS = 64_000_000        # above this only a JPEG is decoded (in draft mode, at a fraction of its size)
REDUCING_GAP = 3.0             # fast path: box-reduce first while the image is over 3x the target


def _name(image) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__} image>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16- and 32-bit integer and float modes scaled to 8 bits (``convert`` would clip them) and
    transparent pixels (RGBA, LA, a palette with transparency) flattened on white, as a viewer shows them."""
    if img.mode in ("RGB",):
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            arr = arr * 255.0 if float(np.nanmax(arr, initial=0)) <= 1.0 else arr
        else:
            arr = arr.astype(np.float64) / 257.0   # 16-bit range onto 8 bits (I holds 16-bit PNGs)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _array_image(arr: np.ndarray, channels: str) -> Image.Image:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise UserError(f"array images must be HxW or HxWxC with C in 1, 3, 4; got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"array image of shape {arr.shape} is empty: pass an image with pixels")
    if arr.dtype == np.uint8:
        a = arr
    elif arr.dtype == np.uint16:
        a = np.rint(arr / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise UserError(f"float images must hold values in [0, 1]; got {arr.dtype} in "
                            f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]: scale it, or pass uint8")
        a = np.rint(arr * 255.0).astype(np.uint8)
    else:
        raise UserError(f"array images must be uint8, uint16 or float in [0, 1]; got {arr.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if channels == "bgr" and a.ndim == 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def _draft_factor(w: int, h: int, draft_short: int) -> int:
    """libjpeg's reduction (1, 2, 4 or 8) for a w x h JPEG: the largest that keeps the shorter side at
    least ``draft_short`` (0: no reduction asked), then doubled while the result is over MAX_PIXELS."""
    k = 1
    if draft_short:
        while k < 8 and min(w, h) // (2 * k) >= draft_short:
            k *= 2
    while k < 8 and (w / k) * (h / k) > MAX_PIXELS:
        k *= 2
    return k


def load_image(image: ImageLike, channels: str = "rgb", draft_short: int = 0) -> Image.Image:
    """Any supported input as an RGB PIL image; EXIF orientation applied for encoded images.
    ``draft_short`` > 0: a JPEG may be decoded at a reduced scale whose shorter side stays at least
    that many pixels (libjpeg's DCT scaling; the fast path asks for twice the resize target)."""
    if channels not in ("rgb", "bgr"):
        raise UserError(f"channels = {channels!r}: use rgb or bgr")
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise UserError(f"image of size {image.width}x{image.height} is empty: pass an image with pixels")
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_image(image, channels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise UserError("empty bytes: pass an encoded image (JPEG, PNG, ...)")
        source = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        source = Path(image)
        try:   # only regular files: opening a FIFO or a device would block or never end
            mode = source.stat().st_mode
        except FileNotFoundError:
            raise UserError(f"{_name(image)}: no such image file") from None
        except OSError as exc:
            raise UserError(f"{_name(image)}: cannot read it ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise UserError(f"{_name(image)}: not a regular file (a FIFO, device, socket or folder): pass an image file")
    else:
        raise UserError(f"cannot classify a {type(image).__name__}: pass a path, bytes, a PIL image or a numpy array")
    name = _name(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w == 0 or h == 0:
                    raise UserError(f"{name}: the image is empty ({w}x{h})")
                if img.format == "JPEG":
                    k = _draft_factor(w, h, draft_short)
                    if k > 1:
                        img.draft("RGB", (-(-w // k), -(-h // k)))
                elif w * h > MAX_PIXELS:
                    raise UserError(f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS // 1_000_000} "
                                    "megapixel limit for non-JPEG images: downscale it first")
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except FileNotFoundError:
        raise UserError(f"{name}: no such image file") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{name}: too large to decode safely ({exc.__class__.__name__}): downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{name}: cannot read it as an image ({exc.__class__.__name__}): check the file") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str, reducing_gap: float | None = None) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _PIL_INTERP[interpolation], reducing_gap=reducing_gap)


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


def preprocess(image: ImageLike, cfg: Preprocess, fast: bool = False, channels: str = "rgb") -> np.ndarray:
    """One image as a CHW float32 array ready for the model (``fast``: draft decoding and reducing gap)."""
    img = load_image(image, channels, draft_short=2 * cfg.resize if fast else 0)
    img = resize_shorter(img, cfg.resize, cfg.interpolation, REDUCING_GAP if fast else None)
    img = center_crop(img, cfg.size)
    return to_tensor(img, cfg)


def list_images(root: Path) -> list[Path]:
    """Image files under a folder, sorted, hidden files skipped."""
    return sorted(
        p for p in Path(root).rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
