"""Before a run starts: what the bank will hold and what synthesizing it will cost on this machine.

``confirm_estimate`` times a few optimisation steps of one shard-sized batch with the real teacher and
objective, prints the estimate, and stops a run above ``synthesis.confirm_above`` planned images
(exit 2, nothing written) unless the user said ``--yes``.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from runtime.errors import UserError

from .bank import Bank
from .priors import PRIORS
from .prompts import ClassPrompts
from .runfolder import Reporter, RunPaths, resolve_device
from .synthesis import bank_plan, synthesis_objective, synthesize
from .teachers import build_teacher
from .units import format_duration


@dataclasses.dataclass(frozen=True)
class Estimate:
    images: int
    shards: int
    seconds: float
    seconds_per_step: float
    negatives: int = 0      # of ``images``: made for the generic "other" prompts

    def line(self, steps: int) -> str:
        neg = f" ({self.negatives} of them negatives for 'other')" if self.negatives else ""
        return (f"{self.images} surrogate images{neg} in {self.shards} shards x {steps} steps: about "
                f"{format_duration(self.seconds)} of synthesis on this machine "
                f"({self.seconds_per_step:.2f} s per step of one shard, measured)")


def estimate_synthesis(recipe, concepts, teacher, device="cpu", offline=False, steps: int = 3) -> Estimate:
    """Time ``steps`` optimisation steps of one shard-sized batch (the first one, warm-up, not counted)
    and scale to the bank: shards x synthesis.steps (+ generator steps)."""
    syn, plan = recipe.synthesis, bank_plan(recipe, [c.label for c in concepts])
    images, shards, neg = plan.total, plan.num_shards, plan.negatives
    k = len(concepts)
    cls = torch.arange(min(syn.shard_size, images)) % k
    gen = torch.Generator().manual_seed(0)
    targets = teacher.text[cls] if teacher.text is not None else ClassPrompts(teacher, recipe.prompts).targets(cls, cls, gen)
    objective = synthesis_objective(recipe, concepts, teacher, device, offline)
    stamps: list[float] = []
    prior = PRIORS.get(syn.prior)
    synthesize(objective, targets, cls, prior.timing_cfg(syn, steps), syn.resolution or teacher.input_size,
               gen, device, on_step=lambda i, loss: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    total = per_step * (shards * prior.steps(syn) + syn.generator_steps)
    return Estimate(images, shards, total, per_step, neg)


def confirm_estimate(resumed, recipe, concepts, reporter: Reporter, yes: bool, offline: bool = False):
    """Before anything is written: print the planned images and the measured time estimate; above
    ``synthesis.confirm_above`` images stop (exit 2) unless ``yes``. ``resumed`` is the run folder being
    resumed, or None. Returns the teacher it built (the run reuses it), or None when the resumed run's
    bank is already complete (nothing left to plan)."""
    if resumed is not None and Bank(RunPaths(resumed).bank).is_complete():
        return None
    device = resolve_device(recipe.device)
    teacher = build_teacher(recipe.teacher, concepts, device, offline, openset=recipe.openset)
    est = estimate_synthesis(recipe, concepts, teacher, device, offline)
    limit, steps = recipe.synthesis.confirm_above, PRIORS.get(recipe.synthesis.prior).steps(recipe.synthesis)
    if limit and est.images > limit and not yes:
        raise UserError(f"{est.line(steps)}: more than synthesis.confirm_above = {limit} images; "
                        f"pass --yes to start, or lower synthesis.images_per_class")
    reporter.log("plan: " + est.line(steps))
    return teacher
