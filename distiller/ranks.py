"""Several processes on one run: PyTorch's own distributed engine (torchrun, ``torch.distributed``).

    torchrun --standalone --nproc_per_node 2 -m distiller make --classes cats,dogs ...
    distiller make --nproc 2 ...          # the same, launched for you on this machine

Every rank runs ``make``'s checks; rank 0 alone writes the run folder's files. The bank is the unit of
work: rank r fills shards r, r+N, r+2N, ... (each shard is seeded by its index, so the bank does not
depend on N), then rank 0 writes the manifest and the samples; the teacher labels ``--images`` shards the
same way. Distillation is DistributedDataParallel: each step's batch is the one-process batch, split
between the ranks (``World.mine``), so the student does not depend on N either, and a run resumes with
another N. The other stages are rank 0's; the other ranks leave once the student is trained. Collectives time out (``DISTILLER_DIST_TIMEOUT``, seconds), so a
rank that dies ends the group with one line instead of a hang (torchrun also stops the others).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from runtime.errors import UserError

DEFAULT_TIMEOUT_S = 1800   # the longest a rank waits at a barrier: rank 0's prompt training comes before synthesis


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> range:
        """This rank's share of ``n`` shards: r, r + N, r + 2N, ..."""
        return range(self.rank, n, self.size)


def world() -> World:
    """This process's place, from torchrun's environment (one process without it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} is not within WORLD_SIZE {size}: launch with torchrun")
    return World(rank, size, local)


def timeout_s() -> float:
    try:
        return float(os.environ.get("DISTILLER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise UserError("DISTILLER_DIST_TIMEOUT must be a number of seconds") from None


def init(device: str) -> World:
    """Join the process group (gloo on CPU, nccl on CUDA with one GPU per local rank); a no-op alone."""
    w = world()
    if w.size == 1:
        return w
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    return w


@contextmanager
def group(device: str):
    """In the process group for the block (``init`` then ``finish``); alone, nothing."""
    w = init(device)
    try:
        yield w
    finally:
        finish()


def barrier(what: str) -> None:
    """Wait for every rank; a rank that failed or hangs past the timeout is one clear error here."""
    w = world()
    if w.size == 1:
        return
    import torch.distributed as dist
    _collective(what, dist.barrier)


def rank_device(device: str, w: World | None = None) -> str:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` (one GPU per local rank) for CUDA, else ``device``."""
    w = w or world()
    return f"cuda:{w.local_rank}" if device == "cuda" else device


def wrap(model, device: str):
    """``model`` under DistributedDataParallel (rank 0's parameters and buffers copied to every rank); alone, itself."""
    w = world()
    if w.size == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel
    ids = None
    if device.startswith("cuda"):
        ids = [torch.device(device).index or 0]
        model = sync_bn(model)
    return DistributedDataParallel(model, device_ids=ids)


def sync_bn(model):
    """BN statistics over the whole batch, as one process computes them, on GPUs (CPUs have no SyncBatchNorm:
    there each rank normalises its share alone). timm's converter keeps its fused BN + activation layers; the
    parameters and buffers are the same tensors, so the optimiser's references stay valid."""
    from timm.layers import convert_sync_batchnorm
    return convert_sync_batchnorm(model)


def gather_rows(local, n: int):
    """Every rank holds the rows r, r + N, ... of an ``n``-row tensor (``World.mine(n)``); every rank gets all of
    it back, in order (alone: ``local`` itself)."""
    w = world()
    if w.size == 1:
        return local
    import torch
    import torch.distributed as dist
    m = -(-n // w.size)
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    _collective("validation", dist.all_gather, parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[r::w.size] = part[:len(range(r, n, w.size))]
    return out


def mean(value: float, device: str = "cpu") -> float:
    """The mean of one number over the ranks (alone: itself)."""
    w = world()
    if w.size == 1:
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _collective("the epoch's loss", dist.all_reduce, t)
    return float(t) / w.size


def _collective(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:   # gloo/nccl raise their own types (RuntimeError, DistBackendError, ...)
        raise _lost(what, exc) from None


def _lost(what: str, exc: Exception) -> UserError:
    w = world()
    return UserError(f"rank {w.rank} of {w.size}: another rank failed or did not reach '{what}' within "
                     f"{timeout_s():.0f} s ({type(exc).__name__}): see that rank's error above, fix it and rerun "
                     f"the same command (finished work is kept)")


def share_shards(store, total: int, progress, start, fill, what: str) -> bool:
    """A sharded stage's shape: rank 0 starts the store (``start()``: its plan written, half shards cleared) before
    anyone writes; every rank fills its share (``fill(shards, on_shard)``) while rank 0's bar counts every rank's
    complete shards (``store.complete()``); after a barrier rank 0 checks that it sees all ``total`` of them.
    Returns whether this rank goes on to finish the stage (rank 0)."""
    w = world()
    if w.main:
        start()
    barrier(f"{what}'s start")
    shown = [len(store.complete())]   # after the start: stale shards it removed are not counted
    progress(shown[0])

    def on_shard(*_):
        now = len(store.complete())
        progress(now - shown[0])
        shown[0] = now
    fill(w.mine(total), on_shard)
    if w.size > 1:   # each rank says what it did (the progress bar is rank 0's alone)
        import sys
        print(f"rank {w.rank}/{w.size}: shards {list(w.mine(total))} of {total} are in the bank", file=sys.stderr, flush=True)
    barrier(what)
    if not w.main:
        return False
    require_shared(total - len(store.complete()), total, store.root)
    on_shard()
    return True


def require_shared(missing: int, total: int, folder) -> None:
    """Rank 0, once every rank said its shards are written: those it cannot see mean no shared filesystem."""
    if missing:
        raise UserError(f"{missing} of {total} shards are missing from {folder} after every rank finished: with "
                        f"several machines the run folder must be on a filesystem they all share (--out /shared/path)")


def finish() -> None:
    """Leave the process group (each rank, at its end)."""
    if world().size == 1:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
