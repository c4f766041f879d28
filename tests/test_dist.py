"""Several processes on one run (torchrun, gloo on CPU): the bank is shared by shard index, so it is byte-identical
to one process's; rank 0 alone writes the rest; a rank that dies ends the group with one line; a rerun resumes."""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import python_env, smoke_args

SMALL = ["--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]', "--set", "synthesis.images_per_class=24",
         "--set", "teacher.judge=none", "--set", "synthesis.steps=120"]   # 5 shards of 12 (the smoke recipe adds 8 negatives)


def _env(**extra) -> dict:
    env = python_env()
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})   # the same threads per process for both
    return env


def _bank_hashes(run: Path) -> dict[str, str]:
    bank = run / "bank"
    return {str(p.relative_to(bank)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bank.rglob("*")) if p.is_file()}


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "distiller", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def single(tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = _cli(smoke_args(tiny_clip, out, "r", *SMALL), env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "r"


def test_two_gloo_ranks_make_the_same_bank_and_rank_0_alone_writes_the_rest(tiny_clip, single, tmp_path):
    r = _cli(smoke_args(tiny_clip, tmp_path, "r", *SMALL) + ["--nproc", "2"], env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2: shards [0, 2, 4] of 5" in r.stderr and "rank 1/2: shards [1, 3] of 5" in r.stderr   # 48 + 8 negatives
    assert "rank 1/2" in r.stderr and "the other stages are rank 0's" in r.stderr
    assert _bank_hashes(tmp_path / "r") == _bank_hashes(single)          # manifest, plan and every shard
    assert r.stdout.count("ship ") == 1                                   # one summary: rank 0's
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["student"]["best_val_agreement"] == json.loads((single / "report.json").read_text())["student"]["best_val_agreement"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_ends_the_group_in_one_line_and_one_process_resumes_the_bank(tiny_clip, single, tmp_path):
    """Two ranks without torchrun's agent (so nothing but our timeout stops rank 0); rank 1 is killed once the bank
    has a shard; rank 0 must stop with one error line, exit 2; then one process finishes the same bank."""
    args = smoke_args(tiny_clip, tmp_path, "r", *SMALL)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "distiller", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port), DISTILLER_DIST_TIMEOUT="30"))
             for r in (0, 1)]
    bank = tmp_path / "r" / "bank"
    deadline = time.time() + 300
    while not list(bank.glob("shard_[0-9]*")) and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.2)
    assert list(bank.glob("shard_[0-9]*")), procs[0].communicate()[1][-2000:]
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=240)
    assert procs[0].returncode == 2, err[-2000:]
    assert time.time() - t0 < 120
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "another rank failed" in lines[0] and "rerun" in lines[0]
    assert not (tmp_path / "r" / "report.json").exists()
    done = _cli(args, env=_env())                                           # one process, the same command
    assert done.returncode == 0, done.stderr[-2000:]
    assert _bank_hashes(tmp_path / "r") == _bank_hashes(single)


def test_a_rank_outside_the_world_is_refused(tiny_clip, tmp_path):
    r = _cli(smoke_args(tiny_clip, tmp_path, "r"), env=_env(RANK="3", WORLD_SIZE="2"))
    assert r.returncode == 2 and "RANK 3 is not within WORLD_SIZE 2" in r.stderr
    assert not (tmp_path / "r").exists()
