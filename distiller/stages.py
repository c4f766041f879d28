"""The stages of a run, in order. Each owns its artefacts in the run folder and offers them through a
small API; no stage re-parses another's files.

Every stage has ``name``, ``done(run)``, ``work(run)`` (its progress total), ``describe(run)`` (the
progress line) and ``run(run, progress)``; ``pipeline.run_stages`` is the loop, and ``make`` is that
loop over ``STAGES``. Adding a stage is adding an object here.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Callable, Protocol

from runtime.classifier import read_report as read_report_file
from runtime.errors import UserError

from . import __version__
from .atomic import write_bytes, write_json
from .bridge import HeadsStage
from .images import LabelStage
from .judge import JudgeStage
from .report_html import HtmlReportStage
from .pipeline import Run

Progress = Callable[..., None]


class Stage(Protocol):
    name: str
    sharded: bool     # under torchrun: every rank runs its share (else rank 0 alone)

    def done(self, run: Run) -> bool: ...
    def work(self, run: Run) -> int: ...
    def describe(self, run: Run) -> str: ...
    def run(self, run: Run, progress: Progress) -> None: ...


def _styles_apply(run: Run) -> bool:
    from .teachers import resolve_family
    return resolve_family(run.recipe.teacher.model).styles


def _bank(run: Run):
    from .bank import Bank
    return Bank(run.paths.bank)


def bank_plan(run: Run, style_names, resolution: int):
    from .bank import BankPlan
    syn = run.recipe.synthesis
    return BankPlan(tuple(run.labels), tuple(style_names), syn.images_per_class, syn.shard_size, resolution,
                    syn.val_every, run.recipe.seed, negatives(run.recipe, len(run.labels)))


def negatives(recipe, k: int) -> int:
    """Negatives in the bank: ``synthesis.negative_share`` of it, for open-set CLIP teachers synthesising
    image by image (ImageNet teachers' "other" is their non-member classes; a generator is class-conditioned)."""
    from .teachers import resolve_family
    syn = recipe.synthesis
    if not recipe.openset or resolve_family(recipe.teacher.model).targets != "text" or syn.generator_steps:
        return 0
    return round(syn.negative_share / (1 - syn.negative_share) * syn.images_per_class * k)


class PromptsStage:
    """Learnt prompt styles (``styles.pt``); sources with nothing to learn are done from the start."""
    name = "prompts"
    sharded = False

    def _source(self, run: Run):
        from .prompts import source_class
        return source_class(run.recipe.prompts, _styles_apply(run))

    def done(self, run: Run) -> bool:
        return (self._source(run).training_steps(run.recipe.prompts) == 0 or run.paths.styles.exists()
                or _bank(run).is_complete())

    def work(self, run: Run) -> int:
        return self._source(run).training_steps(run.recipe.prompts)

    def describe(self, run: Run) -> str:
        from .prompts import DEFAULT_STYLES, source_name
        cfg = run.recipe.prompts
        styled = f" ({cfg.styles or DEFAULT_STYLES} styles)" if self._source(run).styled else ""
        return f"prompts: {source_name(cfg, _styles_apply(run))}{styled}"

    def run(self, run: Run, progress: Progress) -> None:
        from .prompts import build_prompt_source
        build_prompt_source(run.teacher(), run.recipe.prompts, run.paths, run.recipe.seed,
                            on_step=lambda style, step: progress())


def prompt_source(run: Run):
    from .prompts import build_prompt_source
    return build_prompt_source(run.teacher(), run.recipe.prompts, run.paths, run.recipe.seed)


def synthesis_objective(recipe, concepts, teacher, device="cpu", offline=False):
    """The teacher, or an ``Objective`` with the recipe's ensemble and adversarial competitor."""
    from .synthesis import Competitor, Objective
    from .teachers import build_teacher
    syn = recipe.synthesis
    if not syn.ensemble and not syn.adversarial:
        return teacher
    extra = [build_teacher(dataclasses.replace(recipe.teacher, model=name, judge="none"), concepts, device, offline,
                           openset=recipe.openset)
             for name in syn.ensemble]
    competitor = None
    if syn.adversarial:
        from .students import create_student, student_spec
        spec = student_spec(recipe, concepts)
        p = spec.preprocess
        competitor = Competitor(create_student(spec, recipe.student.init), p.size, p.mean, p.std).to(device)
    return Objective(teacher, extra, competitor, syn.adversarial)


def resolution(run: Run) -> int:
    return run.recipe.synthesis.resolution or run.teacher().input_size


class GeneratorStage:
    """Amortised synthesis (``synthesis.generator_steps > 0``): the generator, trained and checkpointed."""
    name = "generator"
    sharded = False

    def done(self, run: Run) -> bool:
        from .generator import trained_steps
        steps = run.recipe.synthesis.generator_steps
        return steps == 0 or _bank(run).is_complete() or trained_steps(run.paths.generator) >= steps

    def work(self, run: Run) -> int:
        return run.recipe.synthesis.generator_steps

    def describe(self, run: Run) -> str:
        return f"generator ({run.recipe.synthesis.generator_steps} steps)"

    def run(self, run: Run, progress: Progress) -> None:
        from .generator import trained_steps
        progress(trained_steps(run.paths.generator))
        source, objective = synthesis_inputs(run)
        self.generator(run, source, objective, on_step=lambda step, loss: progress())

    @staticmethod
    def generator(run: Run, source, objective, on_step=None):
        """Train the generator (or resume it, or load it when trained) on ``objective``'s loss."""
        from .generator import train_generator
        rec = run.recipe
        return train_generator(objective, source, len(run.labels), len(source.style_names), rec.synthesis,
                               resolution(run), run.paths.generator, rec.seed, run.device, on_step=on_step)


def synthesis_inputs(run: Run):
    """(prompt source, objective): what synthesis and the generator optimise, built once per stage. The
    global seed is set first, as the objective's competitor student is created from it."""
    import torch
    source = prompt_source(run)
    torch.manual_seed(run.recipe.seed)
    return source, synthesis_objective(run.recipe, run.concepts, run.teacher(), run.device, run.offline)


class SynthesizeStage:
    """The surrogate bank (``bank/``), ``teacher.json`` and ``samples.png``."""
    name = "synthesize"
    sharded = True     # every rank fills its share of the shards (dist)

    def done(self, run: Run) -> bool:
        bank = _bank(run)
        return bank.is_complete() and (bank.root / "manifest.jsonl").exists()

    def work(self, run: Run) -> int:
        syn = run.recipe.synthesis
        return -(-(syn.images_per_class * len(run.labels) + negatives(run.recipe, len(run.labels))) // syn.shard_size)

    def describe(self, run: Run) -> str:
        syn = run.recipe.synthesis
        neg = negatives(run.recipe, len(run.labels))
        from .priors import PRIORS
        return (f"synthesis ({syn.images_per_class * len(run.labels)} images{f' + {neg} negatives' if neg else ''}, "
                f"{PRIORS.get(syn.prior).steps(syn)} steps, {syn.prior} prior)")

    def run(self, run: Run, progress: Progress) -> None:
        from .bank import fill_bank
        from .dist import share_shards, world
        rec, bank, w = run.recipe, _bank(run), world()
        teacher = run.teacher()
        if w.main:
            write_json(run.paths.teacher, teacher.describe())
            for note in teacher.warnings():
                run.warn(note)
            if run.device == "cpu" and teacher.text_tower is not None and rec.teacher.model == "ViT-B-32":
                run.warn("CLIP synthesis on CPU is a pipeline try-out: images of useful quality need a GPU (--recipe gpu)")
            _warn_prior_cost(run)
        source, objective = synthesis_inputs(run)
        plan = bank_plan(run, source.style_names, resolution(run))
        produce = None
        if rec.synthesis.generator_steps:
            from .generator import sampler
            produce = sampler(GeneratorStage.generator(run, source, objective), objective, rec.synthesis, run.device)
        def fill(mine, on_shard):
            fill_bank(bank, plan, teacher, source, rec.synthesis, run.device, run.autocast(), on_shard=on_shard,
                      objective=objective, produce=produce, shards=mine)
        if share_shards(bank, plan.num_shards, progress, start=lambda: bank.start(plan), fill=fill, what="synthesis"):
            bank.write_manifest()
            write_bytes(run.paths.samples, bank.samples_png())


def _warn_prior_cost(run: Run) -> None:
    from .priors import cost_warning
    syn = run.recipe.synthesis
    note = cost_warning(syn, resolution(run), syn.images_per_class * len(run.labels) + negatives(run.recipe, len(run.labels)),
                        run.device)
    if note:
        run.warn(note)


class DistillStage:
    """``checkpoints/``: the student, trained (or as initialised) against the teacher's soft labels."""
    name = "distill"
    sharded = True     # DistributedDataParallel: every rank trains on its share of each batch (distill)

    @staticmethod
    def spec(run: Run):
        from .students import student_spec
        return student_spec(run.recipe, run.concepts, HeadsStage.heads(run))

    @staticmethod
    def checkpoints(run: Run):
        from .distill import Checkpoints
        return Checkpoints(run.paths.checkpoints)

    def done(self, run: Run) -> bool:
        return self.checkpoints(run).complete(run.recipe.distill.epochs)

    def work(self, run: Run) -> int:
        from .distill import source_weights, total_steps
        from .images import real_images
        cfg, real = run.recipe.distill, real_images(run)
        counts = {"surrogate": _bank(run).count("train"), "real": 0 if real is None else real.images.count("train")}
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
        from .distill import VAL_KEYS, train_student, transfer_set
        from .images import real_images
        from .students import create_student
        import torch
        rec, spec = run.recipe, self.spec(run)
        torch.manual_seed(rec.seed)   # the same student, whatever ran before in this process (a judge's network, ...)
        student = create_student(spec, rec.student.init)
        teacher = run.teacher() if rec.distill.relabel else None
        data = transfer_set(_bank(run), real_images(run), rec.distill, JudgeStage.confirmed(run))
        done = [0]

        def on_step(step, total):
            progress(step - done[0])
            done[0] = step

        def on_epoch(r):
            what = ("as initialised" + (" (head probed)" if "probe_loss" in r else "")) if r["loss"] is None else f"loss {r['loss']:.3f}"
            agree = ", ".join(f"{k[14:]} {r[k]:.3f}" for k in VAL_KEYS if k in r)
            run.reporter.log(f"epoch {r['epoch']}: {what}, val agreement {agree}")
        train_student(student, spec, data, rec.distill, run.paths.checkpoints, rec.seed, teacher, run.device,
                      run.autocast(), on_step=on_step, on_epoch=on_epoch, probe=self.probes(run))
        if not self.work(run):
            progress()


FIDELITY_IMAGES = 256   # bank images on which INT8 variants must agree with FP32


class ExportStage:
    """``export.json`` and the model files: every variant built, measured, and the deployable one picked."""
    name = "export"
    sharded = False

    def done(self, run: Run) -> bool:
        return run.paths.export.exists() or run.paths.report.exists()

    def work(self, run: Run) -> int:
        return len(run.recipe.export.variants)

    def describe(self, run: Run) -> str:
        return "export + measure"

    def run(self, run: Run, progress: Progress) -> None:
        import numpy as np
        import torch

        from exporter import ExportContext, export_all
        from runtime.metadata import ModelMetadata
        from runtime.preprocess import preprocess

        from .distill import load_student
        ckpts = DistillStage.checkpoints(run)
        if not ckpts.best.exists():
            raise UserError(f"{run.paths.root} has no trained student: run `distiller distill {run.paths.root}` first")
        from .images import real_images
        rec, spec, bank = run.recipe, DistillStage.spec(run), _bank(run)
        student = load_student(spec, ckpts.best)
        real = real_images(run)
        # calibration and fidelity on the user's own images where there are any: surrogate textures have
        # other activation ranges than the photos the model will see
        source = real if real is not None and real.images.count("val") and real.images.count("train") else bank
        tr_img, _, _ = source.load("train")
        va_img, va_logit, _ = source.load("val")
        calib_rows, check_rows = quantizer_split(len(tr_img), rec.export.calibration_images, FIDELITY_IMAGES - len(va_img),
                                                 rec.export.min_fidelity_images - len(va_img))
        calib = np.stack([preprocess(im, spec.preprocess) for im in tr_img[calib_rows]])
        # INT8 fidelity is measured on images the quantizers never saw (the val shards, then train images
        # outside the calibration set, up to FIDELITY_IMAGES): accuracy-controlled quantization tunes on the
        # calibration images, so it cannot pass by fitting the images it is judged on. "vs teacher" agreement
        # stays on the val shards (NaN teacher rows are skipped)
        if not len(va_img) and not len(check_rows):   # a bank too small for both: judged on what it has
            check_rows = calib_rows
            run.warn("the INT8 fidelity check reuses the calibration images: the bank has no others (make a bigger bank)")
        check = np.concatenate([va_img, tr_img[check_rows]])
        va_logit = np.concatenate([va_logit, np.full((len(check_rows), va_logit.shape[1]), np.nan, np.float32)])
        val = np.stack([preprocess(im, spec.preprocess) for im in check])
        with torch.no_grad():
            reference = student(torch.from_numpy(val)).numpy()
        has_negatives = source is bank and bank.plan().negatives > 0
        from .openset import open_set_threshold
        threshold, fit = open_set_threshold(rec, reference, va_logit, "real" if source is real else
                                            "surrogate+negatives" if has_negatives else None)
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
        result["fidelity_images"] = len(val)
        result["calibration_images"] = len(calib)
        result["calibration_source"] = "real" if source is real else "surrogate"
        result["threshold"] = {"value": threshold, **fit}
        for note in result["notes"]:
            run.warn(note)
        write_json(run.paths.export, result)

    @staticmethod
    def result(run: Run) -> dict:
        return json.loads(run.paths.export.read_text())


def quantizer_split(train: int, calibration: int, fidelity: int, reserve: int = 0) -> tuple:
    """Row indices of the train images the quantizers calibrate (and accuracy control tunes) on, spread
    evenly, and of up to ``fidelity`` other train images for the fidelity check; never the same image.
    ``reserve``: train images the fidelity check needs besides the val shards; calibration leaves them
    out, but keeps at least half the train images."""
    import numpy as np
    calibration = min(calibration, max((train + 1) // 2, train - max(0, reserve)))
    calib = np.unique(np.linspace(0, train - 1, min(calibration, train)).round().astype(int)) if train else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(train), calib)
    pick = np.unique(np.linspace(0, len(rest) - 1, min(len(rest), max(0, fidelity))).round().astype(int)) if len(rest) else rest
    return calib, rest[pick]


def teacher_info(run: Run) -> dict:
    """What the teacher was (family, model, weights), as described when the bank was made."""
    if run.paths.teacher.exists():
        info = json.loads(run.paths.teacher.read_text())
        return {k: info[k] for k in ("family", "model", "weights", "input_size") if k in info}
    return {"model": run.recipe.teacher.model}


class ReportStage:
    """``report.json``: what every other stage made, in one file (its presence marks a finished run)."""
    name = "report"
    sharded = False

    def done(self, run: Run) -> bool:
        return run.paths.report.exists()

    def work(self, run: Run) -> int:
        return 1

    def describe(self, run: Run) -> str:
        return "report"

    def run(self, run: Run, progress: Progress) -> None:
        from .images import transfer_set_info
        export = ExportStage.result(run)
        report = {
            "distiller_version": __version__,
            "labels": run.labels,
            "teacher": teacher_info(run),
            "student": student_info(run),
            "transfer_set": transfer_set_info(run),
            "recipe": run.recipe.name,
            "judge": JudgeStage.result(run),
            "deployable": export["deployable"],
            "export": export,
            "timings_s": run.timings(),
        }
        write_json(run.paths.report, report)
        progress()


def student_info(run: Run) -> dict:
    """report.json's ``student``: the network, how it started, each concept's head source, and the epoch shipped
    with the signal that chose it."""
    from .distill import SIGNALS, VAL_KEYS
    spec, ckpts = DistillStage.spec(run), DistillStage.checkpoints(run)
    history = ckpts.history()
    best = max(history, key=lambda h: h["val_agreement"])   # the epoch best.pt holds (the first best)
    signal = best.get("selected_on", "surrogate")
    student = {"model": spec.model, "input_size": spec.preprocess.size,
               "best_val_agreement": best["val_agreement"], "epochs": ckpts.last_epoch(),
               "init": run.recipe.student.init, "best_epoch": best["epoch"], "selected_on": signal,
               "selection": SIGNALS[signal] + ("; ties go to the student as initialised" if len(history) > 1 else ""),
               "head": {h.label: h.to_json() for h in HeadsStage.heads(run)} if run.recipe.student.init == "pretrained"
               else {c.label: {"source": "fresh", "classes": [], "similarity": None} for c in run.concepts},
               "probed": DistillStage.probes(run)}
    student.update({k: best[k] for k in VAL_KEYS if k in best})
    return student


def read_report(run: Run) -> dict:
    return read_report_file(run.paths.root)


def export_run(run: Run) -> dict:
    """Export (if not done yet) and report: what `distiller export RUN` does; returns the report."""
    from .pipeline import run_stages
    run_stages(run, EXPORT_STAGES)
    return read_report(run)


STAGES: tuple[Stage, ...] = (HeadsStage(), PromptsStage(), GeneratorStage(), SynthesizeStage(), LabelStage(),
                             JudgeStage(), DistillStage(), ExportStage(), ReportStage(), HtmlReportStage())
SYNTHESIS_STAGES = STAGES[:5]
DISTILL_STAGES = (STAGES[0], STAGES[6])     # the student's heads, then distillation
EXPORT_STAGES = STAGES[7:]
