"""The stages of a run, in order: one module each, each owning its artefacts in the run folder and offering them
through a small API (no stage re-parses another's files). ``make`` is ``pipeline.run_stages`` over ``STAGES``;
the single-stage commands run a named group of them."""
from __future__ import annotations

from .base import Progress, Stage
from .calibration import CalibrationStage
from .distill import DistillStage
from .export import ExportStage
from .generator import GeneratorStage
from .heads import HeadsStage
from .html import HtmlReportStage
from .judge import JudgeStage
from .label import LabelStage
from .prompts import PromptsStage
from .report import ReportStage
from .synthesize import SynthesizeStage

STAGES: tuple[Stage, ...] = (HeadsStage(), PromptsStage(), GeneratorStage(), SynthesizeStage(), LabelStage(),
                             JudgeStage(), DistillStage(), CalibrationStage(), ExportStage(), ReportStage(), HtmlReportStage())

GROUPS: dict[str, tuple[str, ...]] = {    # what `distiller synthesize|distill|export RUN` runs
    "synthesize": ("heads", "prompts", "generator", "synthesize", "label images"),
    "distill": ("heads", "distill"),      # the student's heads, then distillation
    "export": ("calibration images", "export", "report", "report.html"),
}


def stage_group(name: str) -> tuple[Stage, ...]:
    """The stages of ``GROUPS[name]``, in run order."""
    wanted = GROUPS[name]
    return tuple(s for s in STAGES if s.name in wanted)


__all__ = ["GROUPS", "STAGES", "CalibrationStage", "DistillStage", "ExportStage", "GeneratorStage", "HeadsStage", "HtmlReportStage",
           "JudgeStage", "LabelStage", "Progress", "PromptsStage", "ReportStage", "Stage", "SynthesizeStage", "stage_group"]
