"""``report.json``: what every other stage made, in one file (its presence marks a finished run)."""
from __future__ import annotations

from runtime.atomic import write_json
from runtime.classifier import read_report as read_report_file

from .. import __version__
from ..distill import SIGNALS, VAL_KEYS
from ..images import transfer_set_info
from ..runfolder import Run
from .base import Progress
from .distill import DistillStage
from .export import ExportStage, teacher_info
from .heads import HeadsStage
from .judge import JudgeStage


def student_info(run: Run) -> dict:
    """report.json's ``student``: the network, how it started, each concept's head source, and the epoch shipped
    with the signal that chose it."""
    spec, ckpts = DistillStage.spec(run), DistillStage.checkpoints(run)
    history = ckpts.history()
    best = max(history, key=lambda h: h["val_agreement"])   # the epoch best.pt holds (the first best)
    signal = best.get("selected_on", "surrogate")
    student = {"model": spec.model, "input_size": spec.preprocess.size,
               "best_val_agreement": best["val_agreement"], "epochs": ckpts.last_epoch(),
               "init": run.recipe.student.init, "best_epoch": best["epoch"], "selected_on": signal,
               "selection": SIGNALS[signal] + ("; ties go to the student as initialised" if len(history) > 1 else ""),
               "head": {h.label: h.to_json() for h in HeadsStage.heads(run)} if run.recipe.student.init == "pretrained"
               else {c.label: {"source": "fresh", "classes": [], "similarity": None} for c in run.concepts},
               "probed": DistillStage.probes(run)}
    student.update({k: best[k] for k in VAL_KEYS if k in best})
    return student


def read_report(run: Run) -> dict:
    return read_report_file(run.paths.root)


class ReportStage:
    name = "report"
    sharded = False

    def done(self, run: Run) -> bool:
        return run.paths.report.exists()

    def work(self, run: Run) -> int:
        return 1

    def describe(self, run: Run) -> str:
        return "report"

    def run(self, run: Run, progress: Progress) -> None:
        export = ExportStage.result(run)
        report = {
            "distiller_version": __version__,
            "labels": run.labels,
            "teacher": teacher_info(run),
            "student": student_info(run),
            "transfer_set": transfer_set_info(run),
            "recipe": run.recipe.name,
            "judge": JudgeStage.result(run),
            "deployable": export.deployable,
            "export": export.to_json(),
            "timings_s": run.timings(),
        }
        write_json(run.paths.report, report)
        progress()
