"""Several processes on one run: PyTorch's own distributed engine (torchrun, ``torch.distributed``).

    torchrun --standalone --nproc_per_node 2 -m distiller make --classes cats,dogs ...
    distiller make --nproc 2 ...          # the same, launched for you on this machine

Every rank runs ``make``'s checks; rank 0 alone writes the run folder's files. The bank is the unit of
work: rank r fills shards r, r+N, r+2N, ... (each shard is seeded by its index, so the bank does not
depend on N), then rank 0 writes the manifest and the samples. The other stages are rank 0's; the other
ranks leave once the bank is complete. Collectives time out (``DISTILLER_DIST_TIMEOUT``, seconds), so a
rank that dies ends the group with one line instead of a hang (torchrun also stops the others).
"""
from __future__ import annotations

import os
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
        cuda = device == "cuda"
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    return w


def barrier(what: str) -> None:
    """Wait for every rank; a rank that failed or hangs past the timeout is one clear error here."""
    w = world()
    if w.size == 1:
        return
    import torch.distributed as dist
    try:
        dist.barrier()
    except Exception as exc:   # gloo/nccl raise their own types (RuntimeError, DistBackendError, ...)
        raise UserError(f"rank {w.rank} of {w.size}: another rank failed or did not reach '{what}' within "
                        f"{timeout_s():.0f} s ({type(exc).__name__}): see that rank's error above, fix it and rerun "
                        f"the same command (finished shards are kept)") from None


def finish() -> None:
    """Leave the process group (each rank, at its end)."""
    if world().size == 1:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
