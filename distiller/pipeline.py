"""The ``make`` pipeline: concepts -> teacher -> prompts -> synthesis -> bank -> distill -> export.

Each stage reads and writes the run folder, skips what is already complete and can be run on
its own (``distiller synthesize|distill|export RUN``). This module orchestrates; the stages'
logic lives in their own modules. Progress goes through a small ``Reporter`` so the CLI can
draw bars and tests can stay quiet.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from runtime.errors import UserError

from . import __version__
from .concepts import Concept, load_concepts, save_concepts
from .recipe import Recipe, recipe_from_dict
from .runfolder import RunPaths, write_json_atomic, write_text_atomic


class Reporter:
    """Progress sink. The CLI subclasses it with rich bars; the default is silent."""

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int):
        yield lambda advance=1, **info: None


class Run:
    """A run folder with its recipe and concepts, plus the lazily built teacher."""

    def __init__(self, root: Path, reporter: Reporter | None = None, device: str | None = None, offline: bool = False):
        self.paths = RunPaths(root)
        if not self.paths.recipe.exists() or not self.paths.concepts.exists():
            raise UserError(f"{root} is not a distiller run folder (no recipe.toml / concepts.json): start one with `distiller make`")
        import tomllib
        self.recipe: Recipe = recipe_from_dict(tomllib.loads(self.paths.recipe.read_text()))
        self.concepts: list[Concept] = load_concepts(self.paths.concepts)
        self.reporter = reporter or Reporter()
        self.device = resolve_device(device or self.recipe.device)
        self.offline = offline
        self._teacher = None

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.concepts]

    def teacher(self):
        if self._teacher is None:
            import torch

            from .teachers import build_teacher
            emb = torch.load(self.paths.text_embeddings, weights_only=True) if self.paths.text_embeddings.exists() else None
            self._teacher = build_teacher(self.recipe.teacher, self.concepts, self.device, self.offline, emb)
            if emb is None and getattr(self._teacher, "text", None) is not None:
                from .distill import save_atomic
                save_atomic(self._teacher.text.cpu(), self.paths.text_embeddings)
        return self._teacher

    def autocast(self):
        if self.device != "cuda":
            return None
        import torch
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    def record_time(self, stage: str, seconds: float) -> None:
        p = self.paths.timings
        t = json.loads(p.read_text()) if p.exists() else {}
        t[stage] = round(t.get(stage, 0.0) + seconds, 2)
        write_json_atomic(p, t)


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return device
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_run(root: Path, recipe: Recipe, concepts: list[Concept], exist_ok: bool = False) -> Path:
    """Create a run folder, or resume an unfinished one started with the same recipe and classes."""
    paths = RunPaths(root)
    if paths.root.exists() and any(paths.root.iterdir()):
        same = (paths.recipe.exists() and paths.concepts.exists()
                and paths.recipe.read_text() == recipe.to_toml() and load_concepts(paths.concepts) == concepts)
        finished = paths.report.exists()
        if exist_ok and (finished or not same):
            shutil.rmtree(paths.root)
        elif finished:
            raise UserError(f"run {root} already exists and is finished: choose another --name, or pass --exist-ok to overwrite it")
        elif not same:
            raise UserError(f"run {root} exists with other classes or settings: choose another --name, or pass --exist-ok to start it over")
        else:
            return paths.root  # resume
    paths.root.mkdir(parents=True, exist_ok=True)
    save_concepts(concepts, paths.concepts)
    write_text_atomic(paths.recipe, recipe.to_toml())
    return paths.root


def preflight(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Every check that can fail on user input, before anything is written."""
    from exporter import VARIANTS

    from .bank import BankPlan
    from .prompts import check_source
    from .students import student_spec
    from .teachers import check_teacher, judge_cfg, resolve_family
    resolve_device(recipe.device)
    syn = recipe.synthesis
    BankPlan(tuple(c.label for c in concepts), ("plain",), syn.images_per_class, syn.shard_size,
             syn.resolution, syn.val_every, recipe.seed).validate()
    student_spec(recipe, concepts)
    for v in recipe.export.variants:
        VARIANTS.get(v)
    check_teacher(recipe.teacher, offline, concepts)
    check_source(recipe.prompts, resolve_family(recipe.teacher.model).styles)
    judge = judge_cfg(recipe.teacher, synthesis_networks(recipe, concepts))
    if judge is not None:
        check_teacher(judge, offline, concepts)
    check_synthesis(recipe, concepts, offline)


def check_synthesis(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Ensemble members share the teacher's targets (ImageNet classes); the adversarial term needs a
    pretrained student to disagree with (a scratch one at step 0 is noise) and an ImageNet teacher."""
    import dataclasses

    from .students import student_spec
    from .teachers import check_teacher, resolve_family
    syn, teacher = recipe.synthesis, recipe.teacher.model
    targets = resolve_family(teacher).targets
    for name in syn.ensemble:
        if name == teacher or resolve_family(name).targets != "imagenet" or targets != "imagenet":
            raise UserError(f"synthesis.ensemble = {list(syn.ensemble)}: members must be ImageNet classifiers other than "
                            f"the teacher (efficientnet-lite0|1|2, timm:NAME) with an ImageNet teacher; {name!r} is not")
        check_teacher(dataclasses.replace(recipe.teacher, model=name), offline, concepts)
    if syn.generator_steps < 0 or syn.generator_lr <= 0:
        raise UserError(f"synthesis.generator_steps = {syn.generator_steps}, generator_lr = {syn.generator_lr}: "
                        "use steps >= 0 (0: optimise each image) and a learning rate > 0")
    if syn.adversarial < 0:
        raise UserError(f"synthesis.adversarial = {syn.adversarial}: use a weight >= 0 (0 turns it off)")
    if syn.adversarial and (recipe.student.init != "pretrained" or targets != "imagenet"
                            or not student_spec(recipe, concepts).groups):
        raise UserError("synthesis.adversarial needs an ImageNet teacher and a pretrained student with its ImageNet "
                        "head (student.init = pretrained, student.head = auto|imagenet): the student as initialised "
                        "is what the images are pushed to disagree with. Set it to 0 otherwise")


def coverage_warnings(teacher) -> list[str]:
    if getattr(teacher, "coverage", None) is None:
        return []
    from .imagenet_concepts import warnings_for
    return warnings_for(teacher.coverage)


def synthesize_stage(run: Run) -> None:
    import torch

    from .bank import Bank, BankPlan, fill_bank
    from .prompts import build_prompt_source

    bank = Bank(run.paths.bank)
    if bank.is_complete():
        run.reporter.log("bank: complete, skipped")
        return
    t0 = time.perf_counter()
    rec = run.recipe
    teacher = run.teacher()
    write_json_atomic(run.paths.teacher, teacher.describe())
    for note in coverage_warnings(teacher):
        run.reporter.warn(note)
    if run.device == "cpu" and teacher.describe().get("family") == "open_clip" and rec.teacher.model == "ViT-B-32":
        run.reporter.warn("CLIP synthesis on CPU is a pipeline try-out: images of useful quality need a GPU (--recipe gpu)")
    from .prompts import DEFAULT_STYLES, source_name
    name = source_name(teacher, rec.prompts)
    n_styles = rec.prompts.styles or DEFAULT_STYLES
    total = n_styles * rec.prompts.train_steps if name == "contrastive" else 1
    styled = name not in ("plain", "classes")
    with run.reporter.task(f"prompts: {name}" + (f" ({n_styles} styles)" if styled else ""), total) as advance:
        done = [0]

        def step(style, i):
            done[0] += 1
            advance()
        source = build_prompt_source(teacher, rec.prompts, run.paths, rec.seed, on_step=step)
        advance(total - done[0])  # styles reused from styles.pt, or a source with nothing to learn
    res = rec.synthesis.resolution or teacher.input_size
    plan = BankPlan(tuple(run.labels), tuple(source.style_names), rec.synthesis.images_per_class,
                    rec.synthesis.shard_size, res, rec.synthesis.val_every, rec.seed)
    torch.manual_seed(rec.seed)
    objective = synthesis_objective(run, teacher)
    produce = None
    if rec.synthesis.generator_steps:
        from .generator import sampler, train_generator
        with run.reporter.task(f"generator ({rec.synthesis.generator_steps} steps)", rec.synthesis.generator_steps) as advance:
            g = train_generator(objective, source, len(run.labels), len(source.style_names), rec.synthesis, res,
                                run.paths.generator, rec.seed, run.device, on_step=advance_to(advance))
        produce = sampler(g, objective, rec.synthesis, run.device)
    with run.reporter.task(f"synthesis ({plan.total} images, {rec.synthesis.steps} steps)", plan.num_shards) as advance:
        advance(len(bank.complete()))
        fill_bank(bank, plan, teacher, source, rec.synthesis, run.device, run.autocast(), on_shard=lambda i, n: advance(),
                  objective=objective, produce=produce)
    write_samples(bank, run.paths.samples)
    run.record_time("synthesize", time.perf_counter() - t0)


def synthesis_objective(run: Run, teacher):
    """The teacher, or an ``Objective`` with the recipe's ensemble and adversarial competitor."""
    import dataclasses

    from .synthesis import Competitor, Objective
    from .teachers import build_teacher
    syn, rec = run.recipe.synthesis, run.recipe
    if not syn.ensemble and not syn.adversarial:
        return teacher
    extra = [build_teacher(dataclasses.replace(rec.teacher, model=name, judge="none"), run.concepts, run.device, run.offline)
             for name in syn.ensemble]
    competitor = None
    if syn.adversarial:
        from .students import create_student, student_spec
        spec = student_spec(rec, run.concepts)
        p = spec.preprocess
        competitor = Competitor(create_student(spec, rec.student.init), p.size, p.mean, p.std).to(run.device)
    return Objective(teacher, extra, competitor, syn.adversarial)


def synthesis_networks(recipe, concepts) -> tuple[str, ...]:
    """Networks besides the teacher that shaped the bank (so none of them may judge it)."""
    used = list(recipe.synthesis.ensemble)
    if recipe.synthesis.adversarial:
        from .students import student_spec
        from .teachers.imagenet import LITE_BY_ARCH
        model = student_spec(recipe, concepts).model
        used.append(LITE_BY_ARCH.get(model, model))
    return tuple(used)


def judge_stage(run: Run) -> dict | None:
    """Score the bank with a held-out network: per concept, how often it sees the intended class.

    Surrogate images that only convince the network that made them are adversarial textures, not
    data; a judge that never took part in synthesis is a cheap proxy for whether they transfer.
    """
    import numpy as np
    import torch

    from .bank import Bank
    from .synthesis import teacher_logits
    from .teachers import build_teacher, judge_cfg

    rec = run.recipe
    cfg = judge_cfg(rec.teacher, synthesis_networks(rec, run.concepts))
    if cfg is None:
        return None
    name = cfg.model
    if run.paths.judge.exists():
        return json.loads(run.paths.judge.read_text())
    t0 = time.perf_counter()
    judge = build_teacher(cfg, run.concepts, run.device, run.offline)
    imgs, _, recs = Bank(run.paths.bank).load()
    with torch.no_grad():
        pred = teacher_logits(judge, torch.from_numpy(imgs), device=run.device).argmax(1).numpy()
    truth = np.array([r["class"] for r in recs])
    per = {c.label: float((pred[truth == k] == k).mean()) for k, c in enumerate(run.concepts)}
    result = {"judge": name, "per_concept": per, "overall": float((pred == truth).mean()), "images": int(len(truth)),
              "min": rec.teacher.judge_min}
    write_json_atomic(run.paths.judge, result)
    for label, a in per.items():
        if a < rec.teacher.judge_min:
            run.reporter.warn(f"{label}: the held-out judge {name} sees it in only {100 * a:.0f}% of its surrogate images: "
                              f"they may not transfer; the student can fail on real {label}")
    run.record_time("judge", time.perf_counter() - t0)
    return result


def distill_stage(run: Run) -> None:
    from .bank import Bank
    from .distill import train_student
    from .students import create_student, student_spec

    rec = run.recipe
    best = run.paths.checkpoints / "best.pt"
    last = run.paths.checkpoints / "last.pt"
    if best.exists() and last.exists():
        import torch
        if torch.load(last, map_location="cpu", weights_only=False)["epoch"] >= rec.distill.epochs:
            run.reporter.log("student: trained, skipped")
            return
    t0 = time.perf_counter()
    spec = student_spec(rec, run.concepts)
    student = create_student(spec, rec.student.init)
    teacher = run.teacher() if rec.distill.relabel else None
    bank = Bank(run.paths.bank)
    n_train = sum(1 for r in _manifest(bank) if r["split"] == "train")
    steps = rec.distill.epochs * max(1, n_train // min(rec.distill.batch_size, n_train))
    what = f"distill {spec.model} @ {spec.preprocess.size}px" if steps else f"student {spec.model} @ {spec.preprocess.size}px as initialised (distill.epochs = 0)"
    with run.reporter.task(what, steps or 1) as advance:
        train_student(student, spec, bank, rec.distill, run.paths.checkpoints, rec.seed, teacher, run.device,
                      run.autocast(), on_step=advance_to(advance),
                      on_epoch=lambda r: run.reporter.log(
                          f"epoch {r['epoch']}: " + ("as initialised" if r["loss"] is None else f"loss {r['loss']:.3f}")
                          + f", val agreement {r['val_agreement']:.3f}"))
        if not steps:
            advance()
    run.record_time("distill", time.perf_counter() - t0)


def advance_to(advance):
    """An ``on_step(step, ...)`` callback that moves a progress bar to ``step`` (callers report counts so far)."""
    done = [0]

    def on_step(step, *_):
        advance(step - done[0])
        done[0] = step
    return on_step


def _manifest(bank):
    return [json.loads(line) for line in (bank.root / "manifest.jsonl").read_text().splitlines() if line]


FIDELITY_IMAGES = 256   # bank images on which INT8 variants must agree with FP32


def export_stage(run: Run) -> dict:
    import numpy as np
    import torch

    from exporter import ExportContext, export_all
    from runtime.metadata import ModelMetadata
    from runtime.preprocess import preprocess

    from .bank import Bank
    from .distill import load_student
    from .students import student_spec

    if run.paths.report.exists():
        run.reporter.log("export: report.json exists, skipped")
        return json.loads(run.paths.report.read_text())
    best = run.paths.checkpoints / "best.pt"
    if not best.exists():
        raise UserError(f"{run.paths.root} has no trained student: run `distiller distill {run.paths.root}` first")
    t0 = time.perf_counter()
    rec = run.recipe
    spec = student_spec(rec, run.concepts)
    student = load_student(spec, best)
    bank = Bank(run.paths.bank)
    tr_img, _, _ = bank.load("train")
    va_img, va_logit, _ = bank.load("val")
    pick = np.linspace(0, len(tr_img) - 1, min(rec.export.calibration_images, len(tr_img))).round().astype(int)
    calib = np.stack([preprocess(im, spec.preprocess) for im in tr_img[pick]])
    # INT8 fidelity is numeric, not generalisation: check it on the val shards plus train images (up to
    # FIDELITY_IMAGES); "vs teacher" agreement stays on the val shards (NaN teacher rows are skipped)
    extra = np.linspace(0, len(tr_img) - 1, max(0, min(len(tr_img), FIDELITY_IMAGES - len(va_img)))).round().astype(int)
    check = np.concatenate([va_img, tr_img[extra]])
    va_logit = np.concatenate([va_logit, np.full((len(extra), va_logit.shape[1]), np.nan, np.float32)])
    val = np.stack([preprocess(im, spec.preprocess) for im in check])
    with torch.no_grad():
        reference = student(torch.from_numpy(val)).numpy()
    meta = ModelMetadata(
        labels=tuple(run.labels), preprocess=spec.preprocess, student=spec.model,
        teacher=teacher_info(run), recipe=rec.to_dict(),
        package_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    ctx = ExportContext(run.paths.root, student, meta, calib, rec.export.opset)
    with run.reporter.task("export + measure", len(rec.export.variants)) as advance:
        result = export_all(ctx, rec.export.variants, val, reference, va_logit, rec.export.max_drop,
                            rec.export.latency_runs, rec.export.threads or None, on_variant=lambda n, r: advance(),
                            min_speedup=rec.export.min_speedup)
    result["fidelity_images"] = len(val)
    for note in result["notes"]:
        run.reporter.warn(note)
    run.record_time("export", time.perf_counter() - t0)
    report = build_report(run, spec, result)
    write_json_atomic(run.paths.report, report)
    return report


def teacher_info(run: Run) -> dict:
    """What the teacher was (family, model, weights), as described when the bank was made."""
    if run.paths.teacher.exists():
        info = json.loads(run.paths.teacher.read_text())
        return {k: info[k] for k in ("family", "model", "weights", "input_size") if k in info}
    return {"model": run.recipe.teacher.model}


def build_report(run: Run, spec, export: dict) -> dict:
    import torch
    ckpt = torch.load(run.paths.checkpoints / "last.pt", map_location="cpu", weights_only=False)
    timings = json.loads(run.paths.timings.read_text()) if run.paths.timings.exists() else {}
    return {
        "distiller_version": __version__,
        "labels": run.labels,
        "teacher": teacher_info(run),
        "student": {"model": spec.model, "input_size": spec.preprocess.size, "best_val_agreement": max(
            h["val_agreement"] for h in ckpt["history"]), "epochs": ckpt["epoch"]},
        "recipe": run.recipe.name,
        "judge": json.loads(run.paths.judge.read_text()) if run.paths.judge.exists() else None,
        "deployable": export["deployable"],
        "export": export,
        "timings_s": timings,
    }


def make(run_dir: Path, recipe: Recipe, concepts: list[Concept], reporter: Reporter | None = None,
         exist_ok: bool = False, offline: bool = False) -> dict:
    """The whole pipeline; rerun the same call to resume an interrupted run."""
    preflight(recipe, concepts, offline)
    init_run(run_dir, recipe, concepts, exist_ok)
    run = Run(run_dir, reporter, offline=offline)
    synthesize_stage(run)
    judge_stage(run)
    distill_stage(run)
    return export_stage(run)


def write_samples(bank, path: Path, per_class: int = 8, tile: int = 96) -> None:
    """A grid of surrogate images: one row per class (and style), up to ``per_class`` columns."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    imgs, _, recs = bank.load()
    rows: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(recs):
        rows.setdefault((r["class"], r["style"]), []).append(i)
    keys = sorted(rows)[:64]
    label_w = 120
    sheet = Image.new("RGB", (label_w + per_class * tile, len(keys) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for y, key in enumerate(keys):
        r0 = recs[rows[key][0]]
        name = r0["label"] if r0["style_name"] == "plain" else f"{r0['label']}\n{r0['style_name']}"
        draw.text((4, y * tile + 4), name, fill="black")
        for x, i in enumerate(rows[key][:per_class]):
            sheet.paste(Image.fromarray(np.asarray(imgs[i])).resize((tile, tile), Image.BILINEAR), (label_w + x * tile, y * tile))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    from .runfolder import write_bytes_atomic
    write_bytes_atomic(path, buf.getvalue())
