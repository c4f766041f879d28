"""``bank/real_*``: the teacher's labels on the user's images (``--images``); done at once without any."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from runtime.errors import UserError

from ..bank import write_manifest
from ..images import RealImages, clear_stale, real_images, square
from ..ranks import share_shards
from ..runfolder import Run
from ..synthesis import teacher_logits
from .base import Progress


def label_images(real: RealImages, teacher, resolution: int, device="cpu",
                 on_shard: Callable[[int, int], None] | None = None, shards=None) -> None:
    """The teacher labels every image not labelled yet, one atomic shard at a time (resumable). ``shards``: only
    these (one rank's share); the caller then clears stale shards before and checks every shard after."""
    if shards is None:
        clear_stale(real)
    done = set(real.complete())
    for i in (range(real.num_shards) if shards is None else shards):
        if i in done:
            continue
        files = [real.images.files[g] for g in real.indices(i)]
        try:
            images = np.stack([square(f["path"], resolution) for f in files])
        except UserError as exc:
            raise UserError(f"{exc}: it is in the run's images.json; restore it, or start the run over with --exist-ok") from None
        with torch.no_grad():
            logits = teacher_logits(teacher, torch.from_numpy(images), device=device)
        records = [{"index": g, "shard": i, "source": "real", "path": f["path"], "sha256": f["sha256"], "split": f["split"]}
                   for g, f in zip(real.indices(i), files)]
        real.write_shard(i, images, logits.numpy(), records)
        if on_shard:
            on_shard(i, real.num_shards)


class LabelStage:
    name = "label images"
    sharded = True     # every rank labels its share of the shards, as synthesis fills the bank (ranks)

    def done(self, run: Run) -> bool:
        real = real_images(run)
        return real is None or (real.is_complete() and not real.stale())

    def work(self, run: Run) -> int:
        real = real_images(run)
        return 0 if real is None else real.num_shards

    def describe(self, run: Run) -> str:
        return f"teacher labels {len(real_images(run).images.files)} images"

    def run(self, run: Run, progress: Progress) -> None:
        real = real_images(run)
        teacher, res = run.teacher(), run.resolution()
        if share_shards(real, real.num_shards, progress, start=lambda: clear_stale(real), what="labelling",
                        fill=lambda mine, on_shard: label_images(real, teacher, res, run.device, on_shard, mine)):
            write_manifest(run.paths.bank)
