"""What every stage is: ``name``, ``sharded``, ``done(run)``, ``work(run)`` (its progress total),
``describe(run)`` (the progress line) and ``run(run, progress)``. ``pipeline.run_stages`` is the loop."""
from __future__ import annotations

from typing import Callable, Protocol

from ..runfolder import Run

Progress = Callable[..., None]


class Stage(Protocol):
    name: str
    sharded: bool     # under torchrun: every rank runs its share (else rank 0 alone)

    def done(self, run: Run) -> bool: ...
    def work(self, run: Run) -> int: ...
    def describe(self, run: Run) -> str: ...
    def run(self, run: Run, progress: Progress) -> None: ...
