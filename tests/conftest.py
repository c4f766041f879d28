"""Shared fixtures: a tiny random open_clip teacher saved to files, and one smoke `make` run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The CLIP bridge's text-embedding cache goes to a folder of the session's, never the user's ~/.cache."""
    old = os.environ.get("DISTILLER_CACHE")
    os.environ["DISTILLER_CACHE"] = str(tmp_path_factory.mktemp("distiller-cache"))
    yield
    if old is None:
        os.environ.pop("DISTILLER_CACHE", None)
    else:
        os.environ["DISTILLER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_vq(tmp_path_factory) -> Path:
    """A folder holding a tiny random diffusers VQModel (save_pretrained)."""
    from distiller.testing import make_tiny_vq
    return make_tiny_vq(tmp_path_factory.mktemp("tiny_vq") / "vq")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, weights file) of a tiny randomly initialised open_clip model."""
    from distiller.testing import make_tiny_clip
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def smoke_args(tiny_clip, out: Path, name: str, *extra: str) -> list[str]:
    cfg, weights = tiny_clip
    return ["make", "--classes", "cat,dog", "--teacher", str(cfg), "--pretrained", str(weights), "--recipe", "smoke",
            "--device", "cpu", "--out", str(out), "--name", name, "--quiet", *extra]


@pytest.fixture(scope="session")
def smoke_run(tiny_clip, tmp_path_factory) -> Path:
    """One `distiller make --recipe smoke` run through the real CLI, shared by every test that reads it."""
    from distiller.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(smoke_args(tiny_clip, out, "smoke")) == 0
    return out / "smoke"


@pytest.fixture(scope="session")
def report(smoke_run) -> dict:
    return json.loads((smoke_run / "report.json").read_text())


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
