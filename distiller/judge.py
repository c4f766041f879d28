"""The held-out judge: does a network that took no part in making the bank see each image as its class?

Surrogate images that only convince the network that made them are adversarial textures, not data; a
judge that never took part in synthesis is a cheap proxy for whether they transfer. Who judges a concept:

- ImageNet teachers: another EfficientNet-Lite (``teachers.judge_cfg``), every concept, K-way (a concept by
  example by the row it learns from the same examples, as the teacher does).
- CLIP teachers, concepts whose student head is ImageNet rows (``wordnet`` or ``clip`` in ``bridge``): an
  EfficientNet-Lite that is neither the student's network nor in synthesis (Lite1 for the Lite0 student),
  scoring each concept by the same pooled rows as the student's head. With a single such concept, the
  judge's other choice is every remaining ImageNet class (pooled), so "sees it" is never trivially true.
- CLIP teachers, concepts by example (head ``examples``): the same EfficientNet-Lite, scoring each by a row it
  learns from the concept's example images itself (``teachers.imagenet.learn_examples``), beside the pooled rows.
- CLIP teachers, ``fresh`` concepts: no offline network knows them, so the CLIP teacher itself judges,
  with templates it did not synthesise with. Weaker: the teacher grades its own images.

``judge.json`` holds the verdict per concept, each concept's judge, and which bank images the judge
confirmed (their own class): the distill stage's selection signal when there are no real images.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .students import student_network
from .synthesis import teacher_logits
from .teachers import build_teacher, judge_cfg, network_name, resolve_family
from .teachers.imagenet import pooled_classifier

# CLIP's ImageNet prompt templates beyond the recipe's: the self-judge reads the classes through these
HELD_OUT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "art of the {}.",
                      "a low resolution photo of a {}.", "a close-up photo of a {}.", "a photo of a clean {}.",
                      "a rendition of a {}.")
LITE_JUDGES = ("efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite0")   # preference order


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Who judges which concepts (indices), and how: ``network`` (a teacher over every concept), ``pooled`` (an
    ImageNet classifier through the student's pooled rows) or ``self`` (the CLIP teacher, held-out templates)."""
    kind: str
    name: str
    concepts: tuple[int, ...]


def held_out_templates(templates) -> tuple[str, ...]:
    return tuple(t for t in HELD_OUT_TEMPLATES if t not in templates)


def assignments(recipe, concepts, heads, used=(), student_network: str | None = None) -> list[Assignment]:
    """The judges of a run (empty: ``teacher.judge = none``, or no network is left to judge)."""
    cfg = recipe.teacher
    if cfg.judge in ("", "none"):
        return []
    everyone = tuple(range(len(concepts)))
    if not resolve_family(cfg.model).has_text_tower:        # an ImageNet teacher: as before, one network, K-way
        j = judge_cfg(cfg, used)
        return [] if j is None else [Assignment("network", j.model, everyone)]
    if cfg.judge != "auto" and resolve_family(cfg.judge).has_text_tower:   # another CLIP model, over every concept
        return [Assignment("network", cfg.judge, everyone)]
    pooled = tuple(k for k, h in enumerate(heads) if h.source != "fresh")
    fresh = tuple(k for k in everyone if k not in pooled)
    out = []
    if pooled:
        taken = set(used) | {student_network}
        name = cfg.judge if cfg.judge != "auto" else next((n for n in LITE_JUDGES if n not in taken), None)
        if name is not None:
            out.append(Assignment("pooled", name, pooled))
    if fresh and held_out_templates(cfg.templates):
        out.append(Assignment("self", cfg.model, fresh))
    return out


def judge_names(recipe, concepts, heads, used=(), student_network=None) -> list[str]:
    """The networks ``preflight`` must find (the self-judge is the teacher, checked anyway)."""
    return [a.name for a in assignments(recipe, concepts, heads, used, student_network) if a.kind != "self"]


def _predict(a: Assignment, recipe, concepts, heads, images, device, offline):
    """The judge's choice per image: a concept index, or -1 (its "every other ImageNet class")."""
    cfg = recipe.teacher
    if a.kind == "pooled":
        picked = [heads[k] for k in a.concepts]
        judge = pooled_classifier(a.name, picked, rest=len(picked) < 2, device=device,
                                  examples=[concepts[k].examples for k in a.concepts])
        pred = teacher_logits(judge, images, device=device).argmax(1)
        idx = torch.tensor(a.concepts + (-1,))
        return idx[pred]
    if a.kind == "self":
        cfg = dataclasses.replace(cfg, templates=held_out_templates(cfg.templates), judge="none")
    else:
        cfg = judge_cfg(dataclasses.replace(cfg, judge=a.name))
    judge = build_teacher(cfg, concepts, device, offline, openset=recipe.openset and a.kind == "network")
    return teacher_logits(judge, images, device=device).argmax(1)   # "other" (index K) is never a concept


def judge_bank(recipe, concepts, heads, bank, used=(), student_network=None, device="cpu", offline=False) -> dict | None:
    """The judge's verdict on a complete bank, or None when nobody judges."""
    plan = assignments(recipe, concepts, heads, used, student_network)
    if not plan:
        return None
    imgs, _, recs = bank.load()
    truth = np.array([-1 if r["class"] is None else r["class"] for r in recs])   # negatives have no concept
    pred = np.full(len(recs), -2)
    by = {}
    for a in plan:
        rows = np.flatnonzero(np.isin(truth, a.concepts))
        if len(rows):
            with torch.no_grad():
                pred[rows] = _predict(a, recipe, concepts, heads, torch.from_numpy(imgs[rows]), device, offline).numpy()
        by.update({concepts[k].label: (a.name + (" (held-out templates)" if a.kind == "self" else "")) for k in a.concepts})
    judged = np.isin(truth, [k for a in plan for k in a.concepts])
    per = {concepts[k].label: float((pred[truth == k] == k).mean()) for k in range(len(concepts)) if (truth == k).any()
           and concepts[k].label in by}
    names = list(dict.fromkeys(by.values()))
    return {"judge": " + ".join(names), "judges": by, "per_concept": per,
            "overall": float((pred[judged] == truth[judged]).mean()), "images": int(judged.sum()),
            "min": recipe.teacher.judge_min,
            "self_judged": [concepts[k].label for a in plan if a.kind == "self" for k in a.concepts],
            "confirmed": [int(r["index"]) for r, p, t in zip(recs, pred, truth) if t >= 0 and p == t]}


def student_teacher_name(recipe) -> str | None:
    """The teacher name of a pretrained student's network (efficientnet-lite0), which must not judge; None for scratch."""
    return network_name(student_network(recipe)[0]) if recipe.student.init == "pretrained" else None
