"""Atomic file writes and the run folder's layout."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


class RunPaths:
    """Where each artifact of a run lives (runs/<name>/...)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    recipe = property(lambda s: s.root / "recipe.toml")
    concepts = property(lambda s: s.root / "concepts.json")
    text_embeddings = property(lambda s: s.root / "text_embeddings.pt")
    styles = property(lambda s: s.root / "styles.pt")
    bank = property(lambda s: s.root / "bank")
    checkpoints = property(lambda s: s.root / "checkpoints")
    samples = property(lambda s: s.root / "samples.png")
    report = property(lambda s: s.root / "report.json")
    timings = property(lambda s: s.root / "timings.json")
    judge = property(lambda s: s.root / "judge.json")
    teacher = property(lambda s: s.root / "teacher.json")
    generator = property(lambda s: s.root / "generator.pt")   # synthesis.generator_steps > 0


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name; rename it onto ``path`` when complete."""
    return path.with_name(f".{path.name}.tmp")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
