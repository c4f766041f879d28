"""The ``make`` pipeline: a loop over stages (``stages.STAGES``), each owning its artefacts.

This module holds what every stage shares: the ``Run`` (a run folder with its recipe, concepts and
lazily built teacher), the ``Reporter`` progress sink, the checks made before anything is written
(``preflight``), the run folder's creation (``init_run``) and ``make`` itself. Each stage can be
run on its own (``distiller synthesize|distill|export RUN``) and skips what is already complete.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import UserError

from .atomic import load_torch, read_json, save_torch, write_json, write_text
from .concepts import Concept, load_concepts, save_concepts
from .dist import rank_device, world
from .recipe import Recipe, recipe_from_dict, tomllib
from .runfolder import RunPaths


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

    def __init__(self, root: Path, reporter: Reporter | None = None, device: str | None = None, offline: bool = False,
                 teacher=None):
        self.paths = RunPaths(root)
        if not self.paths.recipe.exists() or not self.paths.concepts.exists():
            raise UserError(f"{root} is not a distiller run folder (no recipe.toml / concepts.json): start one with `distiller make`")
        try:
            self.recipe: Recipe = recipe_from_dict(tomllib.loads(self.paths.recipe.read_text()))
            self.concepts: list[Concept] = load_concepts(self.paths.concepts)
        except (ValueError, TypeError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{root}: its recipe.toml or concepts.json is damaged ({type(exc).__name__}): "
                            "start the run again with `distiller make ... --exist-ok`") from None
        self.reporter = reporter or Reporter()
        self.device = rank_device(resolve_device(device or self.recipe.device))   # cuda:LOCAL_RANK under torchrun
        self.offline = offline
        self._teacher = teacher

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.concepts]

    def teacher(self):
        if self._teacher is None:
            from .teachers import build_teacher
            path = self.paths.text_embeddings
            emb = load_torch(path, weights_only=True) if path.exists() else None
            self._teacher = build_teacher(self.recipe.teacher, self.concepts, self.device, self.offline, emb,
                                          self.recipe.openset)
        if self._teacher.text is not None and not self.paths.text_embeddings.exists() and world().main:
            save_torch(self._teacher.text.cpu(), self.paths.text_embeddings)
        return self._teacher

    def warn(self, message: str) -> None:
        """Print a warning and keep it in warnings.json (report.html lists every warning the run printed)."""
        self.reporter.warn(message)
        seen = self.warnings()
        if message not in seen and world().main:   # rank 0 alone writes the run folder's files
            write_json(self.paths.warnings, seen + [message])

    def warnings(self) -> list[str]:
        return read_json(self.paths.warnings, [])

    def autocast(self):
        if not self.device.startswith("cuda"):   # bf16 autocast on GPUs; CPUs compute in float32
            return None
        import torch
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    @contextmanager
    def timer(self, stage: str, every_s: float = 1.0):
        """Time a stage into timings.json as it goes: ``tick()`` adds the time since the last tick (at most
        every ``every_s``); the rest is added on the way out, an interrupt included. A kill loses at most
        the last few seconds, never the whole stage."""
        last = [time.perf_counter(), 0.0]   # last tick, last write (the first tick writes at once)

        def tick(force: bool = False) -> None:
            now = time.perf_counter()
            if not world().main:   # rank 0 times the stage for everyone
                return
            if force or now - last[1] >= every_s:
                t = self.timings()
                t[stage] = round(t.get(stage, 0.0) + now - last[0], 2)
                write_json(self.paths.timings, t)
                last[0] = last[1] = now
        try:
            yield tick
        finally:
            tick(force=True)

    def timings(self) -> dict:
        return read_json(self.paths.timings, {})


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return device
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return "cuda" if torch.cuda.is_available() else "cpu"


WORK = ("styles.pt", "generator.pt", "checkpoints", "judge.json", "export.json", "report.json")


def has_work(paths: RunPaths) -> bool:
    """Whether any stage of the run got anywhere (a complete shard, learnt styles, a checkpoint, ...)."""
    from .bank import Bank
    return (any((paths.root / w).exists() for w in WORK) or bool(Bank(paths.bank).complete())
            or any(paths.bank.glob("real_[0-9]*")))


def run_state(root: Path, recipe: Recipe, concepts: list[Concept], exist_ok: bool = False, images=None) -> str:
    """What ``init_run`` will do with ``root``, decided without writing: "new" (no folder, or an empty one),
    "resume" (same recipe and classes, unfinished), or "restart" (``exist_ok``, or a folder no stage got
    anywhere in: a start that failed). Raises the user's error for a finished or different run."""
    paths = RunPaths(root)
    if not paths.root.exists() or not any(paths.root.iterdir()):
        return "new"
    same = (paths.recipe.exists() and paths.concepts.exists()
            and paths.recipe.read_text() == recipe.to_toml() and _same_concepts(paths, concepts)
            and _image_dirs(paths) == (images.dirs if images is not None else None))
    finished = paths.report.exists()
    if (exist_ok and (finished or not same)) or (not same and not has_work(paths)):
        return "restart"
    if finished:
        raise UserError(f"run {root} already exists and is finished: choose another --name, or pass --exist-ok to overwrite it")
    if not same:
        raise UserError(f"run {root} exists with other classes, settings or --images: choose another --name, or pass "
                        f"--exist-ok to start it over (to add images to a run: distiller synthesize RUN --images DIR)")
    return "resume"


def init_run(root: Path, recipe: Recipe, concepts: list[Concept], exist_ok: bool = False,
             reporter: Reporter | None = None, images=None) -> Path:
    """Create a run folder, or resume an unfinished one started with the same recipe and classes. A
    folder no stage got anywhere in (a start that failed) is started over with the new settings."""
    paths = RunPaths(root)
    state = run_state(root, recipe, concepts, exist_ok, images)
    if state == "resume":
        return paths.root
    if state == "restart":
        if not exist_ok and reporter is not None:
            reporter.log(f"{root}: no stage had finished anything; starting it over with these settings")
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_concepts(concepts, paths.concepts)
    if images is not None:
        from .images import save_image_set
        save_image_set(images, paths.images)
    write_text(paths.recipe, recipe.to_toml())
    return paths.root


def _image_dirs(paths: RunPaths):
    from .images import read_image_set
    try:
        images = read_image_set(paths.images)
    except (ValueError, KeyError, TypeError):
        return ["damaged"]
    return None if images is None else images.dirs


def _same_concepts(paths: RunPaths, concepts: list[Concept]) -> bool:
    try:
        return load_concepts(paths.concepts) == concepts
    except (ValueError, TypeError, KeyError):
        return False


def check_out(out: Path, name: str) -> Path:
    """The run folder ``out/name``, after checking (without writing) that it can be made there."""
    import unicodedata
    bad = (not name or name in (".", "..") or any(c in name for c in "/\\")
           or any(unicodedata.category(c).startswith("C") for c in name))
    if bad:
        raise UserError(f"--name {name!r}: use a plain folder name (no '/', '..' or control characters); "
                        f"the run goes under --out")
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is a file, not a folder: pass a folder for the runs")
    if not os.access(probe, os.W_OK | os.X_OK) or not probe.stat().st_mode & 0o222:
        raise UserError(f"--out {out}: {probe} is read-only: pass a folder you can write to")
    run = Path(out) / name
    if run.exists() and not run.is_dir():
        raise UserError(f"{run} is a file, not a run folder: choose another --name")
    return run


def preflight(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Every check that can fail on user input, before anything is written."""
    from exporter import VARIANTS

    from .bank import BankPlan
    from .prompts import check_source
    from .students import student_spec
    from .teachers import check_teacher, resolve_family
    resolve_device(recipe.device)
    syn = recipe.synthesis
    from .stages import negatives
    BankPlan(tuple(c.label for c in concepts), ("plain",), syn.images_per_class, syn.shard_size,
             syn.resolution, syn.val_every, recipe.seed, negatives(recipe, len(concepts))).validate()
    bridged = resolve_family(recipe.teacher.model).styles and recipe.student.head == "imagenet"
    if bridged:   # head = imagenet with a CLIP teacher: the text bridge may yet find rows WordNet has not
        from .bridge import plan_heads
        student_spec(recipe, concepts, plan_heads(concepts, "auto"))
    else:
        student_spec(recipe, concepts)
    if recipe.openset:
        labels = [c.label for c in concepts]
        if not recipe.other_label.strip() or recipe.other_label in labels:
            raise UserError(f"other_label {recipe.other_label!r} " + ("is empty" if not recipe.other_label.strip() else
                            "is also one of the classes") + ": pass another name with --other-label NAME")
    from .distill import check_weights
    check_weights(recipe.distill)
    for v in recipe.export.variants:
        VARIANTS.get(v)
    check_teacher(recipe.teacher, offline, concepts)
    from .priors import check_prior
    check_prior(recipe.synthesis, offline)
    check_source(recipe.prompts, resolve_family(recipe.teacher.model).styles)
    check_judges(recipe, concepts, offline)
    check_synthesis(recipe, concepts, offline)


def check_judges(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Every network that may judge the bank can be had: taken as if each concept had ImageNet rows (the CLIP
    bridge is only known once the teacher has read the classes)."""
    import dataclasses

    from .bridge import HeadSource
    from .judge import judge_names, student_teacher_name
    from .teachers import check_teacher, judge_cfg, resolve_family
    heads = [HeadSource(c.label, "wordnet") for c in concepts]
    for name in judge_names(recipe, concepts, heads, synthesis_networks(recipe, concepts), student_teacher_name(recipe)):
        judge = judge_cfg(dataclasses.replace(recipe.teacher, judge=name))
        # an ImageNet judge of a CLIP run scores pooled rows, not WordNet synsets: its concepts are not checked
        check_teacher(judge, offline, concepts if not resolve_family(recipe.teacher.model).styles else None)


def check_synthesis(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Ensemble members share the teacher's targets (ImageNet classes); the adversarial term needs a
    pretrained student to disagree with (a scratch one at step 0 is noise) and an ImageNet teacher.
    (Numeric ranges are the recipe's own bounds.)"""
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
    if syn.adversarial and (recipe.student.init != "pretrained" or targets != "imagenet"
                            or not student_spec(recipe, concepts).pooled):
        raise UserError("synthesis.adversarial needs an ImageNet teacher and a pretrained student with its ImageNet "
                        "head (student.init = pretrained, student.head = auto|imagenet): the student as initialised "
                        "is what the images are pushed to disagree with. Set it to 0 otherwise")


def synthesis_networks(recipe, concepts) -> tuple[str, ...]:
    """Networks besides the teacher that shaped the bank (so none of them may judge it)."""
    used = list(recipe.synthesis.ensemble)
    if recipe.synthesis.adversarial:
        from .students import student_spec
        from .teachers import network_name
        used.append(network_name(student_spec(recipe, concepts).model))
    return tuple(used)


def run_stages(run: Run, stages) -> None:
    """Run each stage that is not done yet, with a progress bar over its work and its time recorded. Under
    torchrun every rank takes part in the ``sharded`` stages (each its share) and waits while rank 0 runs the
    stages before them; after the last sharded stage the other ranks are done and rank 0 goes on alone."""
    from .dist import barrier
    w = world()
    last = max((i for i, s in enumerate(stages) if s.sharded), default=-1) if w.size > 1 else -1
    for i, stage in enumerate(stages):
        if i > last and not w.main:
            import sys
            print(f"rank {w.rank}/{w.size}: done; {', '.join(s.name for s in stages[i:])}: rank 0's", file=sys.stderr, flush=True)
            return
        if w.main or stage.sharded:
            _run_stage(run, stage, agree=i <= last and stage.sharded)
        if i <= last:
            barrier(f"stage {stage.name}")


def _run_stage(run: Run, stage, agree: bool = False) -> None:
    """``agree``: every rank decides whether the stage is done before any of them starts on it."""
    done = stage.done(run)
    if agree:
        from .dist import barrier
        barrier(f"{stage.name}: what is done")
    if done:
        if stage.work(run):   # a stage with nothing to do for this recipe says nothing
            run.reporter.log(f"{stage.name}: done, skipped")
        return
    with run.timer(stage.name) as tick, run.reporter.task(stage.describe(run), max(1, stage.work(run))) as advance:
        def progress(n: int = 1, _advance=advance, _tick=tick) -> None:
            _advance(n)
            _tick()
        stage.run(run, progress)


def make(run_dir: Path, recipe: Recipe, concepts: list[Concept], reporter: Reporter | None = None,
         exist_ok: bool = False, offline: bool = False, yes: bool = False, images=None) -> dict | None:
    """The whole pipeline; rerun the same call to resume an interrupted run. ``images``: the user's own
    unlabelled images (``images.scan_images``), labelled by the teacher beside the bank. Under torchrun,
    rank 0 returns the report and the other ranks None (``dist``)."""
    from . import dist
    from .plan import confirm_plan
    from .stages import STAGES, read_report
    preflight(recipe, concepts, offline)
    with dist.group(resolve_device(recipe.device)) as w:
        teacher = None
        if w.main:   # rank 0 alone decides and writes the run folder; the others wait for it
            resume = run_state(run_dir, recipe, concepts, exist_ok, images) == "resume"   # a finished run is refused early
            teacher = confirm_plan(run_dir if resume else None, recipe, concepts, reporter or Reporter(), yes, offline)
            init_run(run_dir, recipe, concepts, exist_ok, reporter, images)
        dist.barrier("the run folder")
        run = Run(run_dir, reporter, offline=offline, teacher=teacher)
        run_stages(run, STAGES)
        return read_report(run) if w.main else None
