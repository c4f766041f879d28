"""``judge.json``: held-out judges' per-concept agreement with the bank's intended classes (``judge``)."""
from __future__ import annotations

from runtime.atomic import read_json, write_json

from ..bank import Bank
from ..judge import Assignment, assignments, judge_bank, student_teacher_name
from ..runfolder import Run
from ..synthesis import synthesis_networks
from .base import Progress
from .heads import HeadsStage


class JudgeStage:
    name = "judge"
    sharded = False

    @staticmethod
    def assignments(run: Run) -> list[Assignment]:
        return assignments(run.recipe, run.concepts, HeadsStage.heads(run), synthesis_networks(run.recipe, run.concepts),
                           student_teacher_name(run.recipe))

    def done(self, run: Run) -> bool:
        return run.paths.judge.exists() or not self.assignments(run)

    def work(self, run: Run) -> int:
        return 0 if not self.assignments(run) else 1

    def describe(self, run: Run) -> str:
        return "held-out judge " + " + ".join(dict.fromkeys(a.name for a in self.assignments(run)))

    def run(self, run: Run, progress: Progress) -> None:
        rec = run.recipe
        result = judge_bank(rec, run.concepts, HeadsStage.heads(run), Bank(run.paths.bank),
                            synthesis_networks(rec, run.concepts), student_teacher_name(rec), run.device, run.offline)
        write_json(run.paths.judge, result)
        if result["self_judged"]:
            run.warn(f"{', '.join(result['self_judged'])}: judged by the CLIP teacher itself with held-out templates "
                     f"(no offline network knows it): weaker, the teacher grades its own images")
        for label, a in result["per_concept"].items():
            if a < rec.teacher.judge_min:
                hint = "" if run.paths.images.exists() else (
                    "; give the run some real, unlabelled photos of your world (--images DIR): the teacher labels them")
                run.warn(f"{label}: the held-out judge {result['judges'][label]} sees it in only {100 * a:.0f}% of its "
                         f"surrogate images: they may not transfer; the student can fail on real {label}{hint}")
        progress()

    @staticmethod
    def result(run: Run) -> dict | None:
        """The verdict (without the per-image list): what report.json shows."""
        out = read_json(run.paths.judge, None)
        if out is not None:
            out.pop("confirmed", None)
        return out

    @staticmethod
    def confirmed(run: Run) -> set[int] | None:
        """Bank indices the judge saw as their own class, or None when nobody judged."""
        out = read_json(run.paths.judge, None)
        return None if out is None else set(out.get("confirmed", ()))
