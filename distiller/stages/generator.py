"""``generator.pt``: amortised synthesis (``synthesis.generator_steps > 0``), the generator trained and
checkpointed; the synthesize stage samples the bank from it."""
from __future__ import annotations

import torch

from ..bank import Bank
from ..generator import train_generator, trained_steps
from ..runfolder import Run
from ..synthesis import synthesis_objective
from .base import Progress
from .prompts import prompt_source


def synthesis_inputs(run: Run):
    """(prompt source, objective): what synthesis and the generator optimise, built once per stage. The
    global seed is set first, as the objective's competitor student is created from it."""
    source = prompt_source(run)
    torch.manual_seed(run.recipe.seed)
    return source, synthesis_objective(run.recipe, run.concepts, run.teacher(), run.device, run.offline)


def trained_generator(run: Run, source, objective, on_step=None):
    """Train the generator (or resume it, or load it when trained) on ``objective``'s loss."""
    rec = run.recipe
    return train_generator(objective, source, len(run.labels), len(source.style_names), rec.synthesis,
                           run.resolution(), run.paths.generator, rec.seed, run.device, on_step=on_step)


class GeneratorStage:
    name = "generator"
    sharded = False

    def done(self, run: Run) -> bool:
        steps = run.recipe.synthesis.generator_steps
        return steps == 0 or Bank(run.paths.bank).is_complete() or trained_steps(run.paths.generator) >= steps

    def work(self, run: Run) -> int:
        return run.recipe.synthesis.generator_steps

    def describe(self, run: Run) -> str:
        return f"generator ({run.recipe.synthesis.generator_steps} steps)"

    def run(self, run: Run, progress: Progress) -> None:
        progress(trained_steps(run.paths.generator))
        source, objective = synthesis_inputs(run)
        trained_generator(run, source, objective, on_step=lambda step, loss: progress())
