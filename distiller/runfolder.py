"""The run folder: where each artefact of a run lives (``RunPaths``), and the ``Run`` every stage is handed
(the folder with its recipe and concepts, the lazily built teacher, warnings and timings)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runtime.atomic import read_json, write_json
from runtime.classifier import REPORT_FILE
from runtime.errors import UserError

from .concepts import Concept, load_concepts
from .ranks import rank_device, world
from .recipe import Recipe, recipe_from_dict, tomllib
from .torchfiles import load_torch, save_torch


class RunPaths:
    """Where each artifact of a run lives (runs/<name>/...)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    recipe = property(lambda s: s.root / "recipe.toml")
    concepts = property(lambda s: s.root / "concepts.json")
    text_embeddings = property(lambda s: s.root / "text_embeddings.pt")
    styles = property(lambda s: s.root / "styles.pt")
    bank = property(lambda s: s.root / "bank")
    calibration = property(lambda s: s.root / "calibration")   # INT8 calibration images (statimages)
    checkpoints = property(lambda s: s.root / "checkpoints")
    samples = property(lambda s: s.root / "samples.png")
    export = property(lambda s: s.root / "export.json")
    report = property(lambda s: s.root / REPORT_FILE)
    timings = property(lambda s: s.root / "timings.json")
    judge = property(lambda s: s.root / "judge.json")
    teacher = property(lambda s: s.root / "teacher.json")
    generator = property(lambda s: s.root / "generator.pt")   # synthesis.generator_steps > 0
    warnings = property(lambda s: s.root / "warnings.json")   # every warning the run printed
    eval = property(lambda s: s.root / "eval.json")           # `distiller eval RUN --data DIR`, saved
    teacher_latency = property(lambda s: s.root / "teacher_latency.json")
    html = property(lambda s: s.root / "report.html")
    images = property(lambda s: s.root / "images.json")       # --images: the user's files (images.py)
    heads = property(lambda s: s.root / "heads.json")         # each concept's head source (bridge.py)
    teacher_onnx = property(lambda s: s.root / "teacher_image.onnx")   # `distiller bench`: the teacher, timed

    def teacher_onnx_at(self, size: int) -> Path:
        return self.root / f"teacher_image_{size}.onnx"

    def work(self) -> tuple[Path, ...]:
        """What a stage leaves once it got anywhere (besides bank shards): a run with none of them never started."""
        return (self.styles, self.generator, self.checkpoints, self.judge, self.calibration, self.export, self.report)


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
            from .teachers import build_teacher  # torch: lazy, so the runtime-only install can read a run folder
            path = self.paths.text_embeddings
            emb = load_torch(path) if path.exists() else None
            self._teacher = build_teacher(self.recipe.teacher, self.concepts, self.device, self.offline, emb,
                                          self.recipe.openset)
        if self._teacher.text is not None and not self.paths.text_embeddings.exists() and world().main:
            save_torch(self._teacher.text.cpu(), self.paths.text_embeddings)
        return self._teacher

    def resolution(self) -> int:
        """The bank's image size: the recipe's, else the teacher's input size."""
        return self.recipe.synthesis.resolution or self.teacher().input_size

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


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer per run folder: an OS advisory lock (``flock``) on ``.<name>.lock`` beside the folder, held
    while the block runs; the kernel drops it when the process dies, so a kill -9 never leaves a stale lock.
    A second writer gets the user's error at once. Readers never take it. (Where ``fcntl`` is missing, no lock.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    root = Path(root)
    lock = root.parent / f".{root.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot lock {root} for writing ({exc.strerror}): check that {lock.parent} is writable") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{root} is being written by another distiller process (pid {pid}): wait for it or use "
                            f"another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
