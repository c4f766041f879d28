"""The surrogate image bank: the only thing on disk between synthesis and distillation.

    bank/plan.json                what the bank will hold (checked on resume)
    bank/shard_00000/images.npy   uint8 [N, H, W, 3]
                    logits.npy    float32 [N, K] teacher logits over the plain class embeddings
                    records.json  one record per image: index, class, label, style, seed, split
    bank/real_00000/...           the user's own images (``--images``), labelled by the teacher (``images.py``)
    bank/manifest.jsonl           every record of every shard with its logits (source surrogate | real, path,
                                  sha256), written once the bank is complete and again once the real images are

A shard is written into a temporary folder and renamed when complete, so a kill never leaves
half a shard; resume counts the complete shards and continues with the next one. Each shard is
seeded from (run seed, shard index), so a resumed bank is byte-identical to an uninterrupted one.
Each shard's records travel with the shard: no file is shared between shards (so no two writers
ever touch one file), and readers order records by shard index. The manifest is derived from the
shards, once, for people and tools that want one file.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.atomic import atomic_dir, clean_temporaries, remove, write_json, write_text
from runtime.errors import UserError


@dataclass(frozen=True)
class BankPlan:
    labels: tuple[str, ...]
    style_names: tuple[str, ...]
    images_per_class: int
    shard_size: int
    resolution: int
    val_every: int
    seed: int
    negatives: int = 0      # open-set CLIP runs: images of the generic "other" prompts, after the concepts' images

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def concept_images(self) -> int:
        return self.images_per_class * self.num_classes

    @property
    def total(self) -> int:
        return self.concept_images + self.negatives

    def is_negative(self, g: int) -> bool:
        return g >= self.concept_images

    def negative_prompt(self, g: int, prompts: int) -> int:
        """Which generic prompt negative ``g`` is made for (they take turns)."""
        return (g - self.concept_images) % prompts

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.shard_size)

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.total, (shard + 1) * self.shard_size))

    def class_of(self, g: int) -> int:
        """The concept image ``g`` is made for; K (the "other" output) for a negative."""
        return self.num_classes if self.is_negative(g) else g % self.num_classes

    def style_of(self, g: int) -> int:
        return 0 if self.is_negative(g) else (g // self.num_classes) % len(self.style_names)

    def split(self, shard: int) -> str:
        n, k = self.num_shards, self.val_every
        if n < k:
            return "val" if shard == n - 1 else "train"
        return "val" if shard % k == k - 1 else "train"

    def shard_seed(self, shard: int) -> int:
        return int(np.random.SeedSequence([self.seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)

    def validate(self) -> None:
        if self.num_shards < 2:
            raise UserError(
                f"the bank would hold {self.num_shards} shard; need at least 2 (train and val): "
                f"raise synthesis.images_per_class or lower synthesis.shard_size"
            )


class Shards:
    """Atomic shards ``<prefix>NNNNN/`` (images.npy, logits.npy, records.json) in the bank folder: the
    surrogate bank's (``shard_``) and the real images' (``real_``, ``images.RealImages``)."""
    prefix = "shard_"

    def __init__(self, root: Path):
        self.root = Path(root)

    def shard_dir(self, i: int) -> Path:
        return self.root / f"{self.prefix}{i:05d}"

    def complete(self) -> list[int]:
        if not self.root.is_dir():
            return []
        n = len(self.prefix)
        return sorted(int(p.name[n:]) for p in self.root.glob(f"{self.prefix}[0-9]*") if p.is_dir() and p.name[n:].isdigit())

    def write_shard(self, i: int, images: np.ndarray, logits: np.ndarray, records: list[dict]) -> None:
        """One complete shard, atomically: its images, the teacher's logits and its records."""
        final = self.shard_dir(i)
        remove(final)
        with atomic_dir(final) as tmp:
            np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / "logits.npy", np.ascontiguousarray(logits, dtype=np.float32))
            (tmp / "records.json").write_text(json.dumps(records, indent=0) + "\n")

    def records(self, shard: int) -> list[dict]:
        return json.loads((self.shard_dir(shard) / "records.json").read_text())

    def arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.shard_dir(shard)
        return np.load(d / "images.npy"), np.load(d / "logits.npy")


MANIFEST = "manifest.jsonl"
SHARD_PREFIXES = ("shard_", "real_")   # surrogate, real: the manifest lists both, in this order


def image_sha256(image: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def write_manifest(root: Path) -> None:
    """manifest.jsonl from every complete shard's own records (surrogate, then real), in shard order."""
    lines = []
    for prefix in SHARD_PREFIXES:
        shards = Shards(root)
        shards.prefix = prefix
        for i in shards.complete():
            _, logits = shards.arrays(i)
            for rec, lg in zip(shards.records(i), logits):
                lines.append(json.dumps({**rec, "logits": [round(float(v), 5) for v in lg]}))
    write_text(Path(root) / MANIFEST, "\n".join(lines) + "\n")


class Bank(Shards):
    """The surrogate bank: a plan and the shards that fill it."""

    manifest = property(lambda s: s.root / MANIFEST)

    def plan(self) -> BankPlan | None:
        p = self.root / "plan.json"
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return BankPlan(**{**d, "labels": tuple(d["labels"]), "style_names": tuple(d["style_names"])})

    def start(self, plan: BankPlan) -> None:
        """Create the bank, or check that an existing one was started with the same plan."""
        plan.validate()
        old = self.plan()
        if old is not None and old != plan:
            diffs = [k for k in asdict(plan) if asdict(plan)[k] != asdict(old)[k]]
            raise UserError(
                f"{self.root} was started with other settings ({', '.join(diffs)}): "
                f"use a new run name, or --exist-ok to start the run over"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.root)   # half-written shards from a killed run
        if old is None:
            write_json(self.root / "plan.json", {**asdict(plan), "labels": list(plan.labels), "style_names": list(plan.style_names)})

    def count(self, split: str | None = None) -> int:
        """Images the plan puts in ``split`` (train | val), or in the whole bank."""
        plan = self.plan()
        if plan is None:
            return 0
        return sum(len(plan.indices(i)) for i in range(plan.num_shards) if split is None or plan.split(i) == split)

    def write_manifest(self) -> None:
        write_manifest(self.root)

    def is_complete(self) -> bool:
        plan = self.plan()
        return plan is not None and len(self.complete()) == plan.num_shards

    def load(self, split: str | None = None):
        """(images uint8 [N, H, W, 3], logits float32 [N, K], records) for one split or all."""
        plan = self.plan()
        if plan is None or not self.is_complete():
            raise UserError(f"{self.root} is not a complete bank: run `distiller synthesize` on the run first")
        imgs, logits, recs = [], [], []
        for i in self.complete():
            if split is not None and plan.split(i) != split:
                continue
            im, lg = self.arrays(i)
            imgs.append(im)
            logits.append(lg)
            recs += self.records(i)
        return np.concatenate(imgs), np.concatenate(logits), recs

    def samples_png(self, per_class: int = 8, tile: int = 96) -> bytes:
        """A grid of surrogate images: one row per class (and style), up to ``per_class`` columns."""
        import io

        from PIL import Image, ImageDraw

        imgs, _, recs = self.load()
        rows: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(recs):
            if r["class"] is not None:   # negatives have no concept
                rows.setdefault((r["class"], r["style"]), []).append(i)
        keys = sorted(rows)[:64]
        label_w = 120
        sheet = Image.new("RGB", (label_w + per_class * tile, len(keys) * tile), "white")
        draw = ImageDraw.Draw(sheet)
        for y, key in enumerate(keys):
            draw.text((4, y * tile + 4), row_label(recs[rows[key][0]]), fill="black")
            for x, i in enumerate(rows[key][:per_class]):
                sheet.paste(Image.fromarray(np.asarray(imgs[i])).resize((tile, tile), Image.BILINEAR), (label_w + x * tile, y * tile))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        return buf.getvalue()


def row_label(rec: dict) -> str:
    """samples.png's label of a row: the class, its style, and the image prior that made it."""
    name = rec["label"] if rec["style_name"] == "plain" else f"{rec['label']}\n{rec['style_name']}"
    return name + (f"\n{rec['prior']} prior" if rec.get("prior") else "")   # banks before the priors lack it
