"""``styles.pt``: learnt prompt styles; sources with nothing to learn are done from the start."""
from __future__ import annotations

from ..bank import Bank
from ..prompts import DEFAULT_STYLES, PromptSource, build_prompt_source, source_class, source_name
from ..runfolder import Run
from ..teachers import resolve_family
from .base import Progress


def _text_tower(run: Run) -> bool:
    return resolve_family(run.recipe.teacher.model).has_text_tower


def prompt_source(run: Run, on_step=None) -> PromptSource:
    """The run's prompt source (its styles learnt, or loaded from ``styles.pt``)."""
    return build_prompt_source(run.teacher(), run.recipe.prompts, run.paths, run.recipe.seed, on_step=on_step)


class PromptsStage:
    name = "prompts"
    sharded = False

    def _source(self, run: Run):
        return source_class(run.recipe.prompts, _text_tower(run))

    def done(self, run: Run) -> bool:
        return (self._source(run).training_steps(run.recipe.prompts) == 0 or run.paths.styles.exists()
                or Bank(run.paths.bank).is_complete())

    def work(self, run: Run) -> int:
        return self._source(run).training_steps(run.recipe.prompts)

    def describe(self, run: Run) -> str:
        cfg = run.recipe.prompts
        styled = f" ({cfg.styles or DEFAULT_STYLES} styles)" if self._source(run).styled else ""
        return f"prompts: {source_name(cfg, _text_tower(run))}{styled}"

    def run(self, run: Run, progress: Progress) -> None:
        prompt_source(run, on_step=lambda style, step: progress())
