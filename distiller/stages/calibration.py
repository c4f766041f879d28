"""``calibration/``: the images INT8 calibrates on, made from the trained student's own BatchNorm statistics
(``statimages``), when the run's calibration source is ``statistics``. Which source a run uses is decided here,
once (``calibration_source``), and read by the export stage."""
from __future__ import annotations

from exporter.variants import VARIANTS

from ..distill import load_student
from ..images import real_images
from ..ranks import share_shards
from ..runfolder import Run
from ..statimages import StatImages, StatPlan, stat_plan
from .base import Progress
from .distill import DistillStage

def has_real_split(run: Run) -> bool:
    """Whether the run has real images (--images) in both splits: enough to calibrate on and to judge on."""
    real = real_images(run)
    return real is not None and bool(real.images.count("val")) and bool(real.images.count("train"))


def calibration_source(run: Run) -> str:
    """What the run's INT8 variants calibrate on: the recipe's ``calibration.source``, or for ``auto`` the user's
    real images when there are, else images made from the student's BatchNorm statistics when those are a
    photo's (a pretrained student whose statistics distillation kept frozen), else the bank."""
    rec = run.recipe
    wanted = rec.calibration.source
    if wanted != "auto":
        return wanted
    if has_real_split(run):
        return "real"
    if rec.student.init == "pretrained" and rec.distill.freeze_bn:
        return "statistics"
    return "bank"


def makes_statistics_images(run: Run) -> bool:
    """Whether the run needs ``calibration/``: statistics calibration and at least one INT8 variant to calibrate."""
    quantizes = any(VARIANTS.get(v).precision == "int8" for v in run.recipe.export.variants)
    return quantizes and calibration_source(run) == "statistics"


class CalibrationStage:
    name = "calibration images"
    sharded = True     # every rank makes its share of the batches (ranks), as with the bank

    @staticmethod
    def store(run: Run) -> StatImages:
        return StatImages(run.paths.calibration)

    @staticmethod
    def plan(run: Run) -> StatPlan:
        return stat_plan(run.recipe, run.recipe.export.calibration_images, DistillStage.spec(run).preprocess.size)

    def done(self, run: Run) -> bool:
        if not makes_statistics_images(run) or run.paths.export.exists() or run.paths.report.exists():
            return True
        store = self.store(run)   # a set made with other settings is not done: ``start`` says so
        return store.is_complete() and store.plan() == self.plan(run)

    def work(self, run: Run) -> int:
        return self.plan(run).num_shards if makes_statistics_images(run) else 0

    def describe(self, run: Run) -> str:
        plan = self.plan(run)
        return (f"calibration images ({plan.calibration} + {plan.holdout} held out, from the student's BatchNorm "
                f"statistics, {plan.steps} steps)")

    def run(self, run: Run, progress: Progress) -> None:
        spec, store, plan = DistillStage.spec(run), self.store(run), self.plan(run)
        student = load_student(spec, DistillStage.checkpoints(run).best)
        pre = spec.preprocess

        def fill(mine, on_shard):
            done = set(store.complete())
            for shard in mine:
                if shard not in done:
                    store.make_shard(student, plan, shard, pre.mean, pre.std)
                    on_shard()
        share_shards(store, plan.num_shards, progress, start=lambda: store.start(plan), fill=fill,
                     what="calibration images")
