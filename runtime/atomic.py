"""The one way files reach the run folder: written under a temporary name, then renamed.

Every artefact (JSON, TOML, PNG, torch checkpoints, ONNX files, OpenVINO IR pairs, bank shards)
goes through ``atomic_path`` or ``atomic_dir``: a kill leaves either the old file or the new one,
never half of one, and the result is readable as the umask says (0644 under umask 022), like a
file made with ``open()``; ``tempfile`` alone would leave 0600.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: Path, final: Path, directory: bool = False) -> None:
    """Give ``tmp`` the mode a plain ``open()`` (or ``mkdir``) would, flush it to disk, rename it onto ``final``."""
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    files = [p for p in tmp.rglob("*") if p.is_file()] if directory else [tmp]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)


def temp_name(final: Path) -> Path:
    """A hidden sibling of ``final`` with the same suffix (tools such as OpenVINO key on it)."""
    final = Path(final)
    return final.with_name(f".{final.stem}.{secrets.token_hex(4)}.tmp{final.suffix}")


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final``, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def scratch_path(near: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``near`` (same suffix) for a tool's intermediate output; always removed."""
    tmp = temp_name(Path(near))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces ``final`` (which must not exist)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, default=None):
    """A run-folder JSON file, or ``default`` where it has not been written yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def clean_temporaries(folder: Path) -> None:
    """Remove what a killed writer left behind in ``folder`` (hidden ``*.tmp*`` names)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        remove(tmp)
