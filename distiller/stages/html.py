"""``report.html``: the page a user looks at (``report_html``), from the other stages' artefacts; the teacher is
timed once for it (``teacher_latency.json``)."""
from __future__ import annotations

from runtime.atomic import read_json, write_bytes, write_json

from ..bench import teacher_baseline
from ..report_html import Page, render
from ..runfolder import Run
from .base import Progress
from .distill import DistillStage
from .export import ExportStage
from .judge import JudgeStage
from .report import read_report


def teacher_latency(run: Run) -> dict | None:
    """The teacher's image tower, exported to ONNX FP32 and timed at batch 1 once (teacher_latency.json)."""
    p = run.paths.teacher_latency
    if not p.exists():
        write_json(p, teacher_baseline(run.paths.root, keep=False))
    return read_json(p)


def write_html(run: Run) -> None:
    report = read_report(run)
    page = Page(run, report, ExportStage.record(report), DistillStage.checkpoints(run).history(), JudgeStage.result(run),
                teacher_latency(run))
    write_bytes(run.paths.html, render(page).encode())


class HtmlReportStage:
    name = "report.html"
    sharded = False

    def done(self, run: Run) -> bool:
        return run.paths.html.exists()

    def work(self, run: Run) -> int:
        return 1

    def describe(self, run: Run) -> str:
        return "report.html"

    def run(self, run: Run, progress: Progress) -> None:
        write_html(run)
        progress()
