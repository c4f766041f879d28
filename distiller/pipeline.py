"""The ``make`` pipeline: a loop over stages (``stages.STAGES``), each owning its artefacts.

This module decides what happens to a run folder (``run_state``: new, resume or restart; ``init_run``) and
runs stages (``run_stages``: each stage not done yet, with its progress and time; under torchrun every rank
takes part in the sharded ones). ``make`` checks everything once (``preflight``), confirms the estimate and
loops; each group of stages also runs on its own (``distiller synthesize|distill|export RUN``) and skips what
is already complete.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import unicodedata
from contextlib import nullcontext
from pathlib import Path

from runtime.atomic import write_text
from runtime.errors import UserError

from . import ranks
from .bank import Bank
from .concepts import Concept, load_concepts, save_concepts
from .examples import scan_examples, scanned_concepts, store_examples, stored_concepts
from .estimate import confirm_estimate
from .images import read_image_set, save_image_set
from .preflight import preflight
from .priors import resolve_weights
from .recipe import Recipe
from .runfolder import Reporter, Run, RunPaths, resolve_device, writer_lock
from .stages import STAGES, ExportStage, stage_group
from .stages.calibration import calibration_source
from .stages.report import read_report
from .teachers import resolve_paths


def has_work(paths: RunPaths) -> bool:
    """Whether any stage of the run got anywhere (a complete shard, learnt styles, a checkpoint, ...)."""
    return (any(p.exists() for p in paths.work()) or bool(Bank(paths.bank).complete())
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
        save_image_set(images, paths.images)
    write_text(paths.recipe, recipe.to_toml())
    return paths.root


def _image_dirs(paths: RunPaths):
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


def run_stages(run: Run, stages) -> None:
    """Run each stage that is not done yet, with a progress bar over its work and its time recorded. Under
    torchrun every rank takes part in the ``sharded`` stages (each its share) and waits while rank 0 runs the
    stages before them; after the last sharded stage the other ranks are done and rank 0 goes on alone."""
    w = ranks.world()
    last = max((i for i, s in enumerate(stages) if s.sharded), default=-1) if w.size > 1 else -1
    for i, stage in enumerate(stages):
        if i > last and not w.main:
            print(f"rank {w.rank}/{w.size}: done; {', '.join(s.name for s in stages[i:])}: rank 0's", file=sys.stderr, flush=True)
            return
        if w.main or stage.sharded:
            _run_stage(run, stage, agree=i <= last and stage.sharded)
        if i <= last:
            ranks.barrier(f"stage {stage.name}")


def _run_stage(run: Run, stage, agree: bool = False) -> None:
    """``agree``: every rank decides whether the stage is done before any of them starts on it."""
    done = stage.done(run)
    if agree:
        ranks.barrier(f"{stage.name}: what is done")
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
    rank 0 returns the report and the other ranks None (``ranks``)."""
    sets = scan_examples(concepts)                 # concepts by example: their images, checked before any write
    scanned, stored = scanned_concepts(concepts, sets), stored_concepts(run_dir, concepts, sets)
    preflight(recipe, scanned, offline, images is not None)
    recipe = dataclasses.replace(recipe, teacher=resolve_paths(recipe.teacher),   # the run works from any folder
                                 synthesis=resolve_weights(recipe.synthesis))
    with ranks.group(resolve_device(recipe.device)) as w, (writer_lock(run_dir) if w.main else nullcontext()):
        teacher = None
        if w.main:   # rank 0 alone decides and writes the run folder (holding its writer's lock); the others wait
            resume = run_state(run_dir, recipe, stored, exist_ok, images) == "resume"   # a finished run is refused early
            teacher = confirm_estimate(run_dir if resume else None, recipe, scanned, reporter or Reporter(), yes, offline)
            init_run(run_dir, recipe, stored, exist_ok, reporter, images)
            store_examples(run_dir, concepts, sets)
        ranks.barrier("the run folder")
        run = Run(run_dir, reporter, offline=offline, teacher=teacher)
        run_stages(run, STAGES)
        return read_report(run) if w.main else None


def export_run(run: Run) -> dict:
    """Export (if not done yet) and report: what `distiller export RUN` does; returns the report. A run exported
    before per-source fidelity and statistics calibration is exported again, and says so."""
    if ExportStage.stale(run):
        run.warn(f"{run.paths.export.name} was made before INT8 calibration from the student's own statistics: "
                 f"exporting again (calibration source: {calibration_source(run)})")
        ExportStage.clear(run)
    run_stages(run, stage_group("export"))
    return read_report(run)
