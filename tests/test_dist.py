"""Several processes on one run (torchrun, gloo on CPU): the bank is shared by shard index, so it is byte-identical
to one process's; distillation is DDP (its exactness: test_ddp); rank 0 alone writes the rest; a rank that dies
ends the group with one line; a rerun resumes."""
from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import python_env, smoke_args

# BN statistics frozen: with batch statistics each rank would normalise its half-batch alone (DDP's usual behaviour,
# no SyncBatchNorm on CPU), and the DDP student could not be compared with one process's image for image
SMALL = ["--set", "distill.epochs=2", "--set", "distill.freeze_bn=true", "--set", 'export.variants=["onnx-fp32"]', "--set", "synthesis.images_per_class=24",
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
def photos(tmp_path_factory) -> list[str]:
    """10 unlabelled images in shards of 4: the teacher's labelling is split between the ranks too."""
    import numpy as np
    from PIL import Image
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return ["--images", str(folder), "--set", "images.shard_size=4", "--set", "images.val_fraction=0"]


@pytest.fixture(scope="module")
def single(tiny_clip, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = _cli(smoke_args(tiny_clip, out, "r", *SMALL, *photos), env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "r"


def test_two_gloo_ranks_make_the_same_bank_and_rank_0_alone_writes_the_rest(tiny_clip, single, photos, tmp_path):
    r = _cli(smoke_args(tiny_clip, tmp_path, "r", *SMALL, *photos) + ["--nproc", "2"], env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "r" / "bank").glob("real_*")) == ["real_00000", "real_00001", "real_00002"]
    assert "rank 0/2: shards [0, 2, 4] of 5" in r.stderr and "rank 1/2: shards [1, 3] of 5" in r.stderr   # 48 + 8 negatives
    assert "rank 1/2: done; export, report, report.html: rank 0's" in r.stderr
    assert _bank_hashes(tmp_path / "r") == _bank_hashes(single)          # manifest, plan and every shard
    assert r.stdout.count("ship ") == 1                                   # one summary: rank 0's
    # the DDP student (distillation under 2 ranks) against one process's, and one process's against another seed's
    other_seed = tmp_path / "seed1"
    shutil.copytree(single, other_seed, ignore=shutil.ignore_patterns("checkpoints", "export.json", "report.*", "openvino", "*.onnx"))
    recipe = other_seed / "recipe.toml"
    recipe.write_text(re.sub(r"(?m)^seed = \d+$", "seed = 1", recipe.read_text()))
    d = _cli(["distill", str(other_seed), "--quiet"], env=_env())
    assert d.returncode == 0, d.stderr[-2000:]
    losses = [[h["loss"] for h in _history(p)[1:]] for p in (tmp_path / "r", single)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)   # the same batches, split: the same KD loss every epoch
    ddp, one, seed1 = (_val_predictions(p) for p in (tmp_path / "r", single, other_seed))
    same_run, across_seeds = float((ddp == one).float().mean()), float((one == seed1).float().mean())
    assert across_seeds < 1.0                      # the seeds' students differ: the comparison can fail
    assert same_run >= across_seeds, (same_run, across_seeds)


def _history(run: Path) -> list[dict]:
    from distiller.distill import Checkpoints
    return Checkpoints(run / "checkpoints").history()


def _val_predictions(run: Path):
    """The trained student's (last epoch: selection may keep the student as initialised) on the bank's validation images."""
    from distiller.distill import student_logits
    from distiller.runfolder import Run
    from distiller.bank import Bank
    from distiller.stages import DistillStage
    from distiller.students import create_student
    r = Run(run, device="cpu")
    images, _, _ = Bank(r.paths.bank).load("val")
    spec = DistillStage.spec(r)
    student = create_student(spec)
    student.load_state_dict(DistillStage.checkpoints(r).state()["model"])
    return student_logits(student, spec, images).argmax(-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_ends_the_group_in_one_line_and_one_process_resumes_the_bank(tiny_clip, single, photos, tmp_path):
    """Two ranks without torchrun's agent (so nothing but our timeout stops rank 0); rank 1 is killed once the bank
    has a shard; rank 0 must stop with one error line, exit 2; then one process finishes the same bank."""
    args = smoke_args(tiny_clip, tmp_path, "r", *SMALL, *photos)
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
