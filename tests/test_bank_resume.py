"""A bank killed in the middle of a shard and resumed is byte-identical to an uninterrupted one."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import python_env
from distiller.bank import Bank
from distiller.concepts import parse_concepts
from distiller.pipeline import init_run
from distiller.recipe import load_recipe


def _new_run(root: Path, tiny_clip) -> Path:
    cfg, weights = tiny_clip
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights), "device": "cpu",
                                "synthesis.images_per_class": 24, "synthesis.shard_size": 8, "synthesis.steps": 12})
    init_run(root, rec, parse_concepts("cat,dog"))
    return root


def _synthesize(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distiller", "synthesize", str(run), "--quiet"],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _digest(bank: Path) -> dict[str, str]:
    return {str(p.relative_to(bank)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bank.rglob("*")) if p.is_file()}


def test_killed_and_resumed_bank_is_byte_identical(tiny_clip, tmp_path):
    whole = _new_run(tmp_path / "whole", tiny_clip)
    assert _synthesize(whole).wait(timeout=300) == 0

    killed = _new_run(tmp_path / "killed", tiny_clip)
    proc = _synthesize(killed)
    bank = Bank(killed / "bank")
    deadline = time.time() + 300
    timings = killed / "timings.json"

    def timed() -> float:   # what the stage timer has written so far (it writes at most once a second)
        try:
            return json.loads(timings.read_text()).get("synthesize", 0.0)
        except (FileNotFoundError, ValueError):
            return 0.0
    while (len(bank.complete()) < 2 or timed() <= 0) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)   # wherever it is: optimising or writing a later shard
    proc.wait()
    done, shards = len(bank.complete()), bank.plan().num_shards    # 48 images + 8 negatives: 7 shards
    assert shards == 7 and 2 <= done < shards, f"kill landed after {done} of {shards} shards: not in the middle"
    assert not bank.is_complete()
    assert not (bank.root / "manifest.jsonl").exists()   # each shard keeps its own records; no shared file yet
    # what a kill during a shard's write leaves behind: a half-filled temporary folder, cleaned on resume
    half = bank.root / f".shard_{done:05d}.dead.tmp"
    half.mkdir(exist_ok=True)
    (half / "images.npy").write_bytes(b"half")
    assert json.loads((killed / "timings.json").read_text())["synthesize"] > 0   # the killed part is kept

    r = _synthesize(killed)
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err.decode()
    assert bank.is_complete() and not half.exists()
    assert _digest(killed / "bank") == _digest(whole / "bank")
    assert (killed / "samples.png").is_file()
