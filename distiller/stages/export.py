"""``export.json`` and the model files: every variant built, measured, and the deployable one picked
(``exporter``). This stage chooses the images: calibration and fidelity on the user's own images where there
are any (surrogate textures have other activation ranges than the photos the model will see), else the bank's."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import torch

from exporter import ExportContext, export_all, open_set_threshold, quantizer_split
from runtime.atomic import read_json, write_json
from runtime.errors import UserError
from runtime.exports import ExportRecord
from runtime.metadata import ModelMetadata
from runtime.preprocess import preprocess

from .. import __version__
from ..bank import Bank
from ..distill import load_student
from ..images import real_images
from ..runfolder import Run
from .base import Progress
from .distill import DistillStage

FIDELITY_IMAGES = 256   # images on which INT8 variants must agree with FP32


def teacher_info(run: Run) -> dict:
    """What the teacher was (family, model, weights), as described when the bank was made."""
    info = read_json(run.paths.teacher)
    if info is not None:
        return {k: info[k] for k in ("family", "model", "weights", "input_size") if k in info}
    return {"model": run.recipe.teacher.model}


def _images(run: Run, spec):
    """(calibration batch, fidelity batch, teacher logits of the fidelity images (NaN rows: none), source name)."""
    rec, bank, real = run.recipe, Bank(run.paths.bank), real_images(run)
    source = real if real is not None and real.images.count("val") and real.images.count("train") else bank
    tr_img, _, _ = source.load("train")
    va_img, va_logit, _ = source.load("val")
    calib_rows, check_rows = quantizer_split(len(tr_img), rec.export.calibration_images, FIDELITY_IMAGES - len(va_img),
                                             rec.export.min_fidelity_images - len(va_img))
    calib = np.stack([preprocess(im, spec.preprocess) for im in tr_img[calib_rows]])
    # INT8 fidelity is measured on images the quantizers never saw (the val shards, then train images outside the
    # calibration set, up to FIDELITY_IMAGES). "vs teacher" agreement stays on the val shards (NaN rows are skipped)
    if not len(va_img) and not len(check_rows):   # a bank too small for both: judged on what it has
        check_rows = calib_rows
        run.warn("the INT8 fidelity check reuses the calibration images: the bank has no others (make a bigger bank)")
    check = np.concatenate([va_img, tr_img[check_rows]])
    va_logit = np.concatenate([va_logit, np.full((len(check_rows), va_logit.shape[1]), np.nan, np.float32)])
    val = np.stack([preprocess(im, spec.preprocess) for im in check])
    if source is real:
        return calib, val, va_logit, "real"
    return calib, val, va_logit, "surrogate+negatives" if bank.plan().negatives > 0 else "surrogate"


class ExportStage:
    name = "export"
    sharded = False

    def done(self, run: Run) -> bool:
        return run.paths.export.exists() or run.paths.report.exists()

    def work(self, run: Run) -> int:
        return len(run.recipe.export.variants)

    def describe(self, run: Run) -> str:
        return "export + measure"

    def run(self, run: Run, progress: Progress) -> None:
        ckpts = DistillStage.checkpoints(run)
        if not ckpts.best.exists():
            raise UserError(f"{run.paths.root} has no trained student: run `distiller distill {run.paths.root}` first")
        rec, spec = run.recipe, DistillStage.spec(run)
        student = load_student(spec, ckpts.best)
        calib, val, va_logit, source = _images(run, spec)
        with torch.no_grad():
            reference = student(torch.from_numpy(val)).numpy()
        threshold, fit = 0.0, {}
        if rec.openset:
            threshold, fit = open_set_threshold(reference, va_logit, None if source == "surrogate" else source,
                                                rec.other_bias)
        meta = ModelMetadata(
            labels=tuple(run.labels), preprocess=spec.preprocess, student=spec.model,
            teacher=teacher_info(run), recipe=rec.to_dict(),
            package_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            other_label=rec.other_label if rec.openset else "", threshold=threshold, threshold_fit=fit,
            other_bias=rec.other_bias if rec.openset else 0.0,
        )
        ctx = ExportContext(run.paths.root, student, meta, calib, rec.export.opset)
        result = export_all(ctx, rec.export.variants, val, reference, va_logit, rec.export.max_drop,
                            rec.export.latency_runs, rec.export.threads or None, on_variant=lambda n, r: progress(),
                            min_speedup=rec.export.min_speedup, min_fidelity_images=rec.export.min_fidelity_images)
        result.fidelity_images = len(val)
        result.calibration_images = len(calib)
        result.calibration_source = "real" if source == "real" else "surrogate"
        result.threshold = {"value": threshold, **fit}
        for note in result.notes:
            run.warn(note)
        write_json(run.paths.export, result.to_json())

    @staticmethod
    def result(run: Run) -> ExportRecord:
        """What the stage measured and chose (export.json)."""
        return ExportRecord.from_json(read_json(run.paths.export), str(run.paths.export))

    @staticmethod
    def record(report: dict) -> ExportRecord:
        """The same record as a finished run's report.json carries it (re-picked there by `bench --select`)."""
        return ExportRecord.from_json(report["export"], "report.json's export")
