"""``export.json`` and the model files: every variant built, measured, and the deployable one picked
(``exporter``). This stage chooses the images: calibration and fidelity on the user's own images where there
are any (surrogate textures have other activation ranges than the photos the model will see), else the bank's."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import torch

from exporter import ExportContext, FidelitySet, export_all, quantizer_split, surrogate_rule, write_metadata
from runtime import Classifier
from runtime.atomic import clean_temporaries, read_json, remove, write_json
from runtime.errors import UserError
from runtime.exports import ExportRecord, ShipRule, VariantRecord
from runtime.metadata import ModelMetadata
from runtime.openset import OpenSetRule, with_other_bias
from runtime.preprocess import preprocess

from .. import __version__
from ..bank import Bank
from ..distill import load_student
from ..images import real_images
from ..runfolder import Run
from ..statimages import to_tensor
from ..teachers import resolve_family
from .base import Progress
from .calibration import CalibrationStage, calibration_source, has_real_split, makes_statistics_images
from .distill import DistillStage

FIDELITY_IMAGES = 256   # images on which INT8 variants must agree with FP32
PARTIAL_FILE = "export.partial.json"


def teacher_info(run: Run) -> dict:
    """What the teacher was (family, model, weights), as described when the bank was made."""
    info = read_json(run.paths.teacher)
    if info is not None:
        return {k: info[k] for k in ("family", "model", "weights", "input_size") if k in info}
    return {"model": run.recipe.teacher.model}


def _preprocessed(images: np.ndarray, spec) -> np.ndarray:
    return np.stack([preprocess(im, spec.preprocess) for im in images])


def _split_store(run: Run, store, spec, name: str) -> tuple[np.ndarray, list[tuple]]:
    """Calibration rows from ``store``'s train images (spread evenly) and its fidelity part: the val images, then
    train images outside the calibration set up to FIDELITY_IMAGES; never the same image."""
    rec = run.recipe
    tr_img, _, _ = store.load("train")
    va_img, va_logit, _ = store.load("val")
    calib_rows, check_rows = quantizer_split(len(tr_img), rec.export.calibration_images, FIDELITY_IMAGES - len(va_img),
                                             rec.export.min_fidelity_images - len(va_img))
    if not len(va_img) and not len(check_rows):   # a bank too small for both: judged on what it has
        check_rows = calib_rows
        run.warn("the INT8 fidelity check reuses the calibration images: the bank has no others (make a bigger bank)")
    nan = np.full((len(check_rows), va_logit.shape[1]), np.nan, np.float32)
    part = (_preprocessed(np.concatenate([va_img, tr_img[check_rows]]), spec), np.concatenate([va_logit, nan]), name)
    return _preprocessed(tr_img[calib_rows], spec), [part]


def student_outputs(student, x: np.ndarray) -> np.ndarray:
    """The torch student's raw outputs for a preprocessed batch, 64 images at a time ([0, 0] for none)."""
    with torch.no_grad():
        rows = [student(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)]
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def _images(run: Run, spec, student) -> tuple[np.ndarray, FidelitySet, str]:
    """(calibration batch, fidelity set, calibration source). The source is ``calibration_source(run)``; the
    fidelity set holds every image no quantizer saw: the statistics images held out, the bank's validation
    shards, the real validation images, each row labelled with its source."""
    bank, source = Bank(run.paths.bank), calibration_source(run)
    parts: list[tuple] = []
    if source == "real":
        real = real_images(run)
        if not has_real_split(run):
            raise UserError("calibration.source = real needs real images in both splits: give --images DIR (a few "
                            "dozen or more), or set calibration.source = auto")
        calib, parts = _split_store(run, real, spec, "real")
        va_img, va_logit, _ = bank.load("val")
        parts.append((_preprocessed(va_img, spec), va_logit, "bank"))
    elif source == "statistics" and makes_statistics_images(run):
        pre = spec.preprocess
        calib_u8, held = CalibrationStage.store(run).load()
        calib = to_tensor(calib_u8, pre.mean, pre.std)
        va_img, va_logit, _ = bank.load("val")
        k = va_logit.shape[1]
        parts = [(to_tensor(held, pre.mean, pre.std), np.full((len(held), k), np.nan, np.float32), "statistics"),
                 (_preprocessed(va_img, spec), va_logit, "bank")]
    else:   # the bank (also when nothing is quantized: FP32 alone is judged on the bank, as before)
        calib, parts = _split_store(run, bank, spec, "bank")
        source = "bank"
    images = np.concatenate([p[0] for p in parts])
    reference = student_outputs(student, images)
    sources = np.concatenate([np.full(len(p[0]), p[2], dtype=object) for p in parts]).astype(str)
    return calib, FidelitySet(images, reference, np.concatenate([p[1] for p in parts]), sources), source


def ship_rule(run: Run, fid: FidelitySet, source: str) -> ShipRule:
    """The recipe's ship rule, with the fidelity source whose top-1 agreement ``max_drop`` applies to: the real
    validation images when there are; the bank's when INT8 calibrates on the bank (as before statistics
    calibration); none for statistics calibration without real images: a synthetic image far from every concept
    flips its top-1 easily (benchmarks/int8.py), so the logit cosine (``min_cosine``) judges alone, on the most
    photo-like images there are (real, else the statistics images held out; the bank's surrogates flip under any
    INT8 calibration, real photos included)."""
    e, counts = run.recipe.export, fid.counts()
    judged_on = "real" if "real" in counts else ("bank" if source == "bank" else None)
    cosine_on = next((s for s in ("real", "statistics") if s in counts), "all")
    return ShipRule(e.max_drop, e.min_speedup, e.min_fidelity_images, e.min_cosine, judged_on, cosine_on)


def answers_other(run: Run) -> bool:
    """Whether the run's models answer other by default: the recipe's ``other_decision``, or with ``auto`` its
    teacher family's measured choice (``TeacherFamily.answers_other``)."""
    choice = run.recipe.other_decision
    return choice == "on" or (choice == "auto" and resolve_family(run.recipe.teacher.model).answers_other)


def surrogate_inputs(run: Run, spec) -> np.ndarray:
    """The bank images (every split) its teacher gives a concept, as the student's input: the data-free rule's
    stand-ins for photos of the classes."""
    images, logits, _ = Bank(run.paths.bank).load()
    concept = logits.argmax(1) < len(run.labels)
    return _preprocessed(images[concept], spec) if concept.any() else np.zeros((0, 3, spec.preprocess.size,
                                                                                spec.preprocess.size), np.float32)


def open_set_rule(run: Run, outputs: np.ndarray) -> OpenSetRule:
    """The data-free rule (``exporter.surrogate_rule``) on one model's raw outputs for ``surrogate_inputs``."""
    k = len(run.labels)
    return surrogate_rule(with_other_bias(outputs, k, run.recipe.other_bias), k, answers_other(run))


def rule_per_variant(run: Run, result: ExportRecord, x: np.ndarray) -> None:
    """Each variant's rule set on its own outputs (an INT8 file's logits differ a little from FP32's, and a threshold
    on them should keep what it keeps for FP32), written into the file where it differs and into its record."""
    for rec in result.variants.values():
        clf = Classifier.load(run.paths.root / rec.file)
        rows = [clf.logits(x[i:i + 64]) for i in range(0, len(x), 64)]
        rule = open_set_rule(run, np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))
        if rule != clf.rule:
            write_metadata(clf.path, clf.metadata.replace(open_set=rule))
        rec.open_set = rule.to_json()


class _Partial:
    """``export.partial.json``: each variant built and judged so far, written as it finishes, so a killed export
    resumes with the next variant and keeps the fidelity it measured (gone once export.json is written)."""

    def __init__(self, run: Run):
        self.path, self.rows = run.paths.root / PARTIAL_FILE, {}
        clean_temporaries(run.paths.root)          # model files a kill left half-written
        clean_temporaries(run.paths.root / "openvino")

    def load(self) -> dict[str, VariantRecord]:
        data = read_json(self.path) or {}
        try:
            self.rows = {n: VariantRecord.from_json(r) for n, r in data.items()}
        except (KeyError, TypeError, ValueError):
            self.rows = {}   # damaged: every variant is built again
        return dict(self.rows)

    def add(self, name: str, record: VariantRecord) -> None:
        self.rows[name] = record
        write_json(self.path, {n: r.to_json() for n, r in self.rows.items()})

    def remove(self) -> None:
        remove(self.path)


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
        calib, fid, source = _images(run, spec, student)
        x = surrogate_inputs(run, spec) if rec.openset else None
        rule = open_set_rule(run, student_outputs(student, x)) if rec.openset else OpenSetRule(on=False)   # unread
        meta = ModelMetadata(
            labels=tuple(run.labels), preprocess=spec.preprocess, student=spec.model,
            teacher=teacher_info(run), recipe=rec.to_dict(),
            package_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            other_label=rec.other_label if rec.openset else "", open_set=rule,
            other_bias=rec.other_bias if rec.openset else 0.0,
        )
        ctx = ExportContext(run.paths.root, student, meta, calib, rec.export.opset)
        partial = _Partial(run)
        done = partial.load()
        progress(len(done))

        def on_variant(name, record):
            partial.add(name, record)
            progress()
        result = export_all(ctx, rec.export.variants, fid, ship_rule(run, fid, source), rec.export.latency_runs,
                            rec.export.threads or None, on_variant=on_variant, done=done)
        result.calibration_images, result.calibration_source = len(calib), source
        if rec.openset:
            rule_per_variant(run, result, x)
        for note in result.notes:
            run.warn(note)
        write_json(run.paths.export, result.to_json())
        partial.remove()

    @staticmethod
    def stale(run: Run) -> bool:
        """Whether the run's export predates per-source fidelity (made by an older distiller)."""
        data = read_json(run.paths.export)
        return data is not None and "fidelity_sources" not in data

    @staticmethod
    def clear(run: Run) -> None:
        """Forget the export and what was made from it (the model files are rewritten in place, atomically)."""
        for path in (run.paths.export, run.paths.report, run.paths.html, run.paths.root / PARTIAL_FILE):
            remove(path)

    @staticmethod
    def result(run: Run) -> ExportRecord:
        """What the stage measured and chose (export.json)."""
        return ExportRecord.from_json(read_json(run.paths.export), str(run.paths.export))

    @staticmethod
    def record(report: dict) -> ExportRecord:
        """The same record as a finished run's report.json carries it (re-picked there by `bench --select`)."""
        return ExportRecord.from_json(report["export"], "report.json's export")
