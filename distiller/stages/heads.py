"""``heads.json``: each concept's head source, decided before anything long runs (a ``fresh`` concept is
warned about at once). Made for every run: the judge scores bridged concepts by the same rows."""
from __future__ import annotations

import dataclasses

from runtime.errors import UserError

from ..bridge import (
    HeadSource,
    class_text_embeddings,
    decide_heads,
    fresh_warning,
    load_heads,
    save_heads,
    wordnet_heads,
)
from ..examples import example_rows
from ..imagenet_concepts import class_names
from ..runfolder import Run
from ..students import pretrained_network, student_spec
from ..teachers import resolve_family
from .base import Progress


class HeadsStage:
    name = "heads"
    sharded = False

    @staticmethod
    def _bridges(run: Run) -> bool:
        """Whether the CLIP text tower is needed: a CLIP teacher, a concept WordNet does not map, head not fresh."""
        return (run.recipe.student.head != "fresh" and resolve_family(run.recipe.teacher.model).has_text_tower
                and any(h is None for h in wordnet_heads(run.concepts)))

    def done(self, run: Run) -> bool:
        return run.paths.heads.exists()

    def work(self, run: Run) -> int:
        return len(run.recipe.teacher.templates) if self._bridges(run) else 1

    def describe(self, run: Run) -> str:
        return "student heads: WordNet, then the CLIP text tower over the 1000 ImageNet classes" if self._bridges(run) \
            else "student heads"

    def run(self, run: Run, progress: Progress) -> None:
        rec, text_emb, class_emb, scale = run.recipe, None, None, 100.0
        if self._bridges(run):
            teacher = run.teacher()
            tower = teacher.text_tower
            class_emb = class_text_embeddings(tower, rec.teacher.model, rec.teacher.pretrained, rec.teacher.templates,
                                              run.device, on_template=progress)
            text_emb, scale = teacher.text, tower.scale
        heads = decide_heads(run.concepts, rec.student.head, text_emb, class_emb, scale, rec.student.bridge_min_similarity)
        save_heads(with_example_rows(run, heads), run.paths.heads)
        names = class_names()
        for h in heads:
            if h.source == "clip":
                top = ", ".join(f"{names[i]} {s:.2f}" for i, s in zip(h.classes[:3], h.similarity[:3]))
                run.reporter.log(f"{h.label}: CLIP bridge to {len(h.classes)} ImageNet class"
                                 f"{'es' if len(h.classes) > 1 else ''} ({top}{', ...' if len(h.classes) > 3 else ''})")
            elif h.source == "examples":
                run.reporter.log(f"{h.label}: head from {h.examples} example image{'s' if h.examples > 1 else ''} (a probe on "
                                 "the student's own features)")
            elif h.source == "fresh" and rec.student.init == "pretrained":
                run.warn(fresh_warning(h, rec.student.bridge_min_similarity, asked=rec.student.head == "fresh"))
        if class_emb is None:
            progress()

    @staticmethod
    def heads(run: Run) -> list[HeadSource]:
        """The run's head sources (what ``student_spec`` and the judge read)."""
        if run.paths.heads.exists():
            return load_heads(run.paths.heads)
        if HeadsStage._bridges(run):
            raise UserError(f"{run.paths.root} has no heads.json yet: run `distiller distill {run.paths.root}`")
        return decide_heads(run.concepts, run.recipe.student.head)


def with_example_rows(run: Run, heads: list[HeadSource]) -> list[HeadSource]:
    """The heads, each concept by example's with its row: a probe on the pretrained student's own features of its
    examples (``examples.example_rows``); a scratch student learns it like a fresh row."""
    todo = [i for i, h in enumerate(heads) if h.source == "examples"]
    if not todo or run.recipe.student.init != "pretrained":
        return heads
    spec = student_spec(run.recipe, run.concepts, heads)
    weight, bias = example_rows(pretrained_network(spec.model).eval(), spec.preprocess,
                                [run.concepts[i].examples for i in todo])
    out = list(heads)
    for j, i in enumerate(todo):
        out[i] = dataclasses.replace(heads[i], row=tuple(float(v) for v in weight[j]), row_bias=float(bias[j]))
    return out
