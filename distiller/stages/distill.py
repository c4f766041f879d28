"""``checkpoints/``: the student, trained (or as initialised) against the teacher's soft labels."""
from __future__ import annotations

import torch

from ..bank import Bank
from ..distill import SELECTION, Checkpoints, source_weights, total_steps, train_student, transfer_set, val_key
from ..images import real_images
from ..runfolder import Run
from ..students import StudentSpec, create_student, student_spec
from .base import Progress
from .heads import HeadsStage
from .judge import JudgeStage


class DistillStage:
    name = "distill"
    sharded = True     # DistributedDataParallel: every rank trains on its share of each batch (distill)

    @staticmethod
    def spec(run: Run) -> StudentSpec:
        return student_spec(run.recipe, run.concepts, HeadsStage.heads(run))

    @staticmethod
    def checkpoints(run: Run) -> Checkpoints:
        return Checkpoints(run.paths.checkpoints)

    def done(self, run: Run) -> bool:
        return self.checkpoints(run).complete(run.recipe.distill.epochs)

    def work(self, run: Run) -> int:
        cfg, real = run.recipe.distill, real_images(run)
        counts = {"surrogate": Bank(run.paths.bank).count("train"), "real": 0 if real is None else real.images.count("train")}
        return total_steps(sum(counts[k] for k in source_weights(counts, cfg)), cfg)

    @staticmethod
    def probes(run: Run) -> bool:
        """Whether the student's head is fresh on a pretrained backbone, so it is fitted first (LP-FT)."""
        rec = run.recipe
        return rec.student.init == "pretrained" and bool(DistillStage.spec(run).fresh_outputs) and rec.distill.probe_steps > 0

    def describe(self, run: Run) -> str:
        spec = self.spec(run)
        if not self.work(run):
            return f"student {spec.model} @ {spec.preprocess.size}px as initialised (distill.epochs = 0)"
        return f"distill {spec.model} @ {spec.preprocess.size}px"

    def run(self, run: Run, progress: Progress) -> None:
        rec, spec = run.recipe, self.spec(run)
        torch.manual_seed(rec.seed)   # the same student, whatever ran before in this process (a judge's network, ...)
        student = create_student(spec, rec.student.init)
        teacher = run.teacher() if rec.distill.relabel else None
        data = transfer_set(Bank(run.paths.bank), real_images(run), rec.distill, JudgeStage.confirmed(run))
        done = [0]

        def on_step(step, total):
            progress(step - done[0])
            done[0] = step

        def on_epoch(r):
            what = ("as initialised" + (" (head probed)" if "probe_loss" in r else "")) if r["loss"] is None else f"loss {r['loss']:.3f}"
            agree = ", ".join(f"{s} {r[val_key(s)]:.3f}" for s in SELECTION if val_key(s) in r)
            run.reporter.log(f"epoch {r['epoch']}: {what}, val agreement {agree}")
        train_student(student, spec, data, rec.distill, run.paths.checkpoints, rec.seed, teacher, run.device,
                      run.autocast(), on_step=on_step, on_epoch=on_epoch, probe=self.probes(run))
        if not self.work(run):
            progress()
