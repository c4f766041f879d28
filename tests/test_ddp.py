"""Distillation under DistributedDataParallel (gloo, 2 ranks spawned here): each step's batch is one process's batch
split between the ranks, so the DDP student is the single-process student up to float rounding, and a checkpoint
made with N ranks resumes with M. A tiny conv student and teacher keep it to seconds; the make-level run is in
test_dist."""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distiller.distill import Checkpoints, TransferSet, train_student
from distiller.recipe import load_recipe
from runtime.metadata import Preprocess

EPOCHS, STOP_AFTER = 4, 2


class Stop(Exception):
    pass


def _net(seed: int, k: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, k))


class Teacher:
    input_size = 16

    def __init__(self):
        self.net = _net(99).eval()

    def logits(self, x):
        return self.net(x)


def _data() -> TransferSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8)
    logits = rng.normal(size=(40, 3)).astype(np.float32) * 3
    weights = np.where(np.arange(40) % 3 == 0, 2.0, 1.0).astype(np.float32)   # uneven weights: the scaling matters
    return TransferSet(images[:32], logits[:32], weights[:32], {"surrogate": (images[32:], logits[32:])})


def _cfg(relabel: bool):
    return dataclasses.replace(load_recipe("smoke").distill, epochs=EPOCHS, batch_size=8, warmup_epochs=1, lr=0.01,
                               relabel=relabel, mixup=0.4 if relabel else 0.0, freeze_bn=False)


def _train(folder, relabel: bool, stop: bool):
    spec = SimpleNamespace(preprocess=Preprocess(size=16, resize=18), model="tiny", num_classes=3)
    steps = 32 // 8

    def on_step(step, total):
        if stop and step == STOP_AFTER * steps + 1:   # a kill early in epoch 3: epoch 2's checkpoint is on disk
            raise Stop
    try:
        train_student(_net(0), spec, _data(), _cfg(relabel), folder, seed=5, teacher=Teacher() if relabel else None,
                      on_step=on_step)
    except Stop:
        pass


def _rank(rank, port, folder, relabel, stop):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        _train(folder, relabel, stop)
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(folder, relabel, stop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(folder), relabel, stop), nprocs=2, join=True)


def _model(folder):
    return Checkpoints(folder).state()["model"]


def _close(a, b):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))


@pytest.fixture
def one_thread():
    """One thread here, as in each spawned rank (the same float reductions); the session's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("relabel", [False, True], ids=["cached-logits", "relabel+mixup"])
def test_ddp_equals_one_process_and_resumes_across_world_sizes(tmp_path, relabel, one_thread):
    one, one_half, two_half = tmp_path / "one", tmp_path / "one_half", tmp_path / "two_half"
    _train(one, relabel, stop=False)                       # 1 process, 4 epochs
    _train(one_half, relabel, stop=True)                   # 1 process, killed after epoch 2
    _two_ranks(two_half, relabel, stop=True)               # 2 ranks, killed after epoch 2
    assert Checkpoints(two_half).last_epoch() == STOP_AFTER
    _close(_model(two_half), _model(one_half))             # the same student after 2 epochs, whatever N
    h1, h2 = Checkpoints(one_half).history(), Checkpoints(two_half).history()
    assert [r["val_agreement"] for r in h2] == [r["val_agreement"] for r in h1]   # validation gathered from both ranks
    assert [r["loss"] for r in h2[1:]] == pytest.approx([r["loss"] for r in h1[1:]], rel=1e-4)
    assert h1[1]["loss"] != h1[2]["loss"]
    shutil.copytree(one_half, tmp_path / "one_then_two")
    _two_ranks(tmp_path / "one_then_two", relabel, stop=False)   # 1 process's checkpoint, resumed by 2 ranks
    _train(two_half, relabel, stop=False)                        # 2 ranks' checkpoint, resumed by 1 process
    for folder in (tmp_path / "one_then_two", two_half):
        assert Checkpoints(folder).last_epoch() == EPOCHS
        _close(_model(folder), _model(one))
    moved = max(float((a - b).abs().max()) for a, b in zip(_model(one).values(), _net(0).state_dict().values()))
    assert moved > 1e-3                                            # the student did learn: equality is not trivial


def test_a_batch_smaller_than_the_world_is_refused(monkeypatch, tmp_path):
    from runtime.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    spec = SimpleNamespace(preprocess=Preprocess(size=16, resize=18), model="tiny", num_classes=3)
    data = _data()
    small = TransferSet(data.images[:2], data.logits[:2], data.weights[:2], data.val)
    with pytest.raises(UserError, match="a batch of 2 images cannot be split between 3 ranks"):
        train_student(_net(0), spec, small, _cfg(False), tmp_path / "c", seed=0)


def test_each_rank_gets_its_own_gpu_and_autocast_falls_back_without_one(smoke_run):
    from distiller.ranks import World, rank_device
    from distiller.runfolder import Run
    assert rank_device("cuda", World(rank=3, size=4, local_rank=1)) == "cuda:1"   # one GPU per local rank
    assert rank_device("cpu", World(rank=3, size=4, local_rank=1)) == "cpu"       # --device cpu: gloo, no GPU
    run = Run(smoke_run, device="cpu")
    assert run.device == "cpu" and run.autocast() is None                         # CPUs compute in float32
    run.device = "cuda:1"
    ctx = run.autocast()
    assert ctx is not None                                                        # bf16 on a rank's GPU ...
    if not torch.cuda.is_available():                                             # ... and without one: off, a warning
        with pytest.warns(UserWarning, match="CUDA is not available"), ctx():
            y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
        assert y.dtype == torch.float32


def test_gpu_ranks_sync_bn_statistics_without_changing_the_student():
    """On GPUs the student's BN layers become synchronised ones (timm's fused BN + activation kept): the same
    outputs, the same parameter tensors the optimiser holds."""
    import timm
    from distiller.ranks import sync_bn
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval()
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    synced = sync_bn(model).eval()
    assert type(synced.bn1).__name__ == "SyncBatchNormAct"
    assert torch.equal(synced(x), before)
    assert [id(p) for p in synced.parameters()] == params
