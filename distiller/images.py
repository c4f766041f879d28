"""The user's own images (``--images DIR``): unlabelled photos that the teacher labels, beside the bank.

    images.json                 the run's image list: every usable file (path, sha256, split) and every
                                skipped one with its reason; written before any stage runs
    bank/real_00000/images.npy  uint8 [N, R, R, 3]: each image's centre square at the bank's resolution
                   logits.npy   float32 [N, K]: the teacher's logits on it
                   records.json index, shard, source "real", path, sha256, split

Folder names are never read: the images are unlabelled. A file is usable when Pillow decodes it (the
first frame of a GIF; EXIF orientation applied; grayscale, palette, CMYK, 16-bit and transparent images
converted as the runtime converts them) and it is at least ``MIN_SIDE`` px on each side; exact duplicates
(same bytes) count once. Which images are held back for validation is fixed per image by (seed, sha256),
so adding images later never moves an image between splits. Shards are written atomically, like the
bank's: a kill loses at most the shard being labelled, and a rerun redoes nothing that was written.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.atomic import read_json, remove, write_json
from runtime.errors import UserError
from runtime.preprocess import IMAGE_SUFFIXES, load_image

from .bank import Bank, Shards

MIN_SIDE = 16          # px: smaller images carry nothing at training resolution
SCAN_DRAFT = 256       # JPEGs are checked decoded at a reduced scale (libjpeg draft): much faster, same verdict


@dataclass
class ImageSet:
    """A scan's result: usable files in order (path, sha256, split), skipped ones with their reasons."""
    dirs: list[str]
    files: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    ignored: int = 0    # files that are not images by their suffix (never read)

    def to_json(self) -> dict:
        return {"dirs": self.dirs, "files": self.files, "skipped": self.skipped, "ignored": self.ignored}

    @classmethod
    def from_json(cls, d: dict) -> "ImageSet":
        return cls(list(d["dirs"]), list(d["files"]), list(d["skipped"]), int(d.get("ignored", 0)))

    def count(self, split: str | None = None) -> int:
        return sum(1 for f in self.files if split is None or f["split"] == split)

    def hashes(self) -> set[str]:
        return {f["sha256"] for f in self.files}


def _walk(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


def _check(data: bytes) -> str | None:
    """Why the encoded image cannot be used, or None."""
    try:
        img = load_image(data, draft_short=SCAN_DRAFT)
    except UserError as exc:
        import re
        why = re.search(r"\((\w+)\)", str(exc))
        return f"corrupt: Pillow cannot decode it ({why.group(1) if why else 'unreadable'})"
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        return f"too small ({w}x{h}, under {MIN_SIDE} px on a side)"
    return None


def _key(sha: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_of(sha: str, seed: int, val_fraction: float) -> str:
    """``val`` for a fixed, seeded part of the images: decided per image by (seed, sha256) alone."""
    return "val" if _key(sha, seed) < val_fraction else "train"


def hold_back(files: list[dict], seed: int, val_fraction: float) -> None:
    """A first scan holds back exactly round(fraction x M) images (at least one of two or more): those whose
    (seed, sha256) key is smallest, so the split depends on the seed and the contents, never on file order."""
    n = min(len(files) - 1, max(1 if val_fraction > 0 else 0, round(val_fraction * len(files)))) if len(files) >= 2 else 0
    val = set(sorted(range(len(files)), key=lambda i: _key(files[i]["sha256"], seed))[:n])
    for i, f in enumerate(files):
        f["split"] = "val" if i in val else "train"


def scan_images(dirs, seed: int, val_fraction: float, known: ImageSet | None = None, flag: str = "--images",
                files: bool = False) -> ImageSet:
    """Every usable image under ``dirs`` (recursively; ``files``: an image file may stand for a folder); ``known``:
    a run's images so far, whose files are skipped as already in it. ``flag`` names the input in errors. Raises
    UserError, before anything is written, when there is none to add."""
    roots = []
    for d in dirs:
        p = Path(d).expanduser()
        if not (p.is_dir() or (files and p.is_file())):
            raise UserError(f"{flag} {d}: {'not a folder' if p.exists() else 'no such folder'}: pass a folder of images "
                            f"(it is read recursively; folder names are not labels)")
        roots.append(p.absolute())
    out = ImageSet([str(r) for r in roots])
    seen = {f["sha256"]: f["path"] for f in (known.files if known else [])}
    already = set(seen)
    for root in roots:
        for p in ([root] if root.is_file() else _walk(root)):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                out.ignored += 1
                continue
            path = str(p)
            try:
                data = p.read_bytes()
            except OSError as exc:
                out.skipped.append({"path": path, "reason": f"unreadable ({type(exc).__name__})"})
                continue
            if not data:
                out.skipped.append({"path": path, "reason": "empty file (0 bytes)"})
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                why = "already in the run" if sha in already else f"duplicate of {seen[sha]}"
                out.skipped.append({"path": path, "reason": why})
                continue
            reason = _check(data)
            if reason:
                out.skipped.append({"path": path, "reason": reason})
                continue
            seen[sha] = path
            out.files.append({"path": path, "sha256": sha, "split": split_of(sha, seed, val_fraction)})
    if not out.files:
        what = f"{len(out.skipped)} skipped" + (f", {out.ignored} other files" if out.ignored else "")
        new = " new" if known and known.files else ""
        raise UserError(f"{flag} {', '.join(map(str, dirs))}: no{new} usable image ({what}): pass folders holding "
                        f"JPEG, PNG, WebP, BMP, TIFF or GIF images of at least {MIN_SIDE} px")
    if known is None:
        hold_back(out.files, seed, val_fraction)
    return out


def merge(old: ImageSet, new: ImageSet) -> ImageSet:
    return ImageSet(old.dirs + [d for d in new.dirs if d not in old.dirs], old.files + new.files,
                    old.skipped + new.skipped, old.ignored + new.ignored)


def read_image_set(path: Path) -> ImageSet | None:
    d = read_json(path, None)
    return None if d is None else ImageSet.from_json(d)


def save_image_set(images: ImageSet, path: Path) -> None:
    write_json(path, images.to_json())


def square(path: str, size: int) -> np.ndarray:
    """The image's centre square at ``size`` px, uint8 [size, size, 3] (what the eval transform crops from)."""
    from PIL import Image
    img = load_image(path, draft_short=2 * size)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


class RealImages(Shards):
    """The real images' shards in the bank folder; shard i holds files i*shard_size ... of images.json."""
    prefix = "real_"

    def __init__(self, root: Path, images: ImageSet | None, shard_size: int):
        super().__init__(root)
        self.images = images
        self.shard_size = shard_size

    @property
    def num_shards(self) -> int:
        return 0 if not self.images else -(-len(self.images.files) // self.shard_size)

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min(len(self.images.files), (shard + 1) * self.shard_size))

    def is_complete(self) -> bool:
        return set(range(self.num_shards)) <= set(self.complete())

    def stale(self) -> list[int]:
        """Complete shards that no longer hold their planned files (the last one, when images were added)."""
        out = []
        for i in self.complete():
            if i >= self.num_shards or len(self.records(i)) != len(self.indices(i)):
                out.append(i)
        return out

    def load(self, split: str | None = None):
        """(images uint8 [N, R, R, 3], logits [N, K], records) of one split, or of all; empty arrays when none."""
        imgs, logits, recs = [], [], []
        for i in range(self.num_shards):
            im, lg = self.arrays(i)
            shard = self.records(i)
            keep = [j for j, r in enumerate(shard) if split is None or r["split"] == split]
            imgs.append(im[keep])
            logits.append(lg[keep])
            recs += [shard[j] for j in keep]
        if not imgs:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 0), np.float32), []
        return np.concatenate(imgs), np.concatenate(logits), recs


def clear_stale(real: RealImages) -> None:
    real.root.mkdir(parents=True, exist_ok=True)
    for i in real.stale():
        remove(real.shard_dir(i))


def real_images(run) -> RealImages | None:
    """The run's real images (``images.json`` and their shards), or None when it has none."""
    images = read_image_set(run.paths.images)
    if images is None:
        return None
    return RealImages(run.paths.bank, images, run.recipe.images.shard_size)


def transfer_set_info(run) -> dict:
    """``report.json``'s ``transfer_set``: images per source, and every skipped file with its reason."""
    images = read_image_set(run.paths.images)
    return {"surrogate": Bank(run.paths.bank).count(), "real": 0 if images is None else len(images.files),
            "real_val": 0 if images is None else images.count("val"),
            "skipped": [] if images is None else images.skipped}


def add_images(run, dirs) -> ImageSet:
    """``distiller synthesize RUN --images DIR``: add the new usable images under ``dirs`` to the run (its
    surrogates kept). A trained student and its export no longer match the transfer set, so they are removed
    and run anew. Returns the images added (raises UserError, writing nothing, when there are none)."""
    known = read_image_set(run.paths.images)
    new = scan_images(dirs, run.recipe.seed, run.recipe.images.val_fraction, known)
    save_image_set(new if known is None else merge(known, new), run.paths.images)
    stale = [p for p in (run.paths.checkpoints, run.paths.export, run.paths.report, run.paths.html) if p.exists()]
    for p in stale:
        remove(p)
    if stale:
        run.reporter.warn(f"{len(new.files)} images added: the student and its export are made anew from the new "
                          f"transfer set: run `distiller distill {run.paths.root}`, then `distiller export {run.paths.root}`")
    return new
