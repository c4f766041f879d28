"""Teachers: the networks the student imitates and the synthesizer inverts.

A teacher family registers a ``matches(name) -> bool`` and a ``build(name, concepts, cfg, ...)``.
``resolve`` tries the families in registration order; nothing downstream asks which family a
teacher is. Every teacher offers:

- ``input_size``, ``mean``, ``std``, ``interpolation``: what it expects;
- ``logits(images)`` over the concepts, images in [0, 1] at ``input_size``, differentiable;
- ``synthesis_loss(images, targets)``: per-image loss the synthesizer minimises;
- ``describe()``: what goes into model metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry


@dataclass(frozen=True)
class TeacherFamily:
    matches: Callable[[str], bool]
    build: Callable
    names: Callable[[], list[str]]   # known model names, for hints
    check: Callable                  # (cfg, offline, concepts) -> None; raises UserError before any work starts
    styles: bool = True              # whether prompt styles (a text tower) apply
    judge: Callable = lambda name, used=(): None   # a held-out network (not in ``used``) that scores the bank, or None
    targets: str = "text"            # what synthesis aims at: text embeddings, or ImageNet class indices (ensembles share these)
    recipe: str = "cpu"              # what `make --recipe auto` uses with this family's teachers


TEACHERS: Registry[TeacherFamily] = Registry("teacher family")


def resolve_family(name: str) -> TeacherFamily:
    from runtime.errors import UserError
    for _, fam in TEACHERS.items():
        if fam.matches(name):
            return fam
    import difflib
    known = [n for _, fam in TEACHERS.items() for n in fam.names()]
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}" if near else "pass an open_clip model name (e.g. ViT-B-32) or a model-config .json path"
    raise UserError(f"unknown teacher {name!r}: {hint}")


def auto_recipe(teacher: str | None) -> str:
    """The recipe for ``--recipe auto``: the teacher family's (``cpu`` without a --teacher)."""
    from ..recipe import DEFAULT_RECIPE
    return resolve_family(teacher).recipe if teacher else DEFAULT_RECIPE


def check_teacher(cfg, offline=False, concepts=None) -> None:
    """Fail fast (before a run folder is made) on an unknown teacher, unavailable weights or concepts it cannot cover."""
    resolve_family(cfg.model).check(cfg, offline, concepts)


def judge_cfg(cfg, used=()):
    """The ``[teacher]`` slice for the held-out judge ("auto": the family's choice of a network not in
    ``used``, the other networks that shaped the bank), or None."""
    import dataclasses
    if cfg.judge in ("", "none"):
        return None
    name = resolve_family(cfg.model).judge(cfg.model, tuple(used)) if cfg.judge == "auto" else cfg.judge
    if name is None:
        return None
    size = cfg.input_size if not resolve_family(name).styles else 0
    return dataclasses.replace(cfg, model=name, judge="none", input_size=size)


def build_teacher(cfg, concepts, device="cpu", offline=False, text_embeddings=None):
    """The teacher a recipe's ``[teacher]`` slice names, with its concept head."""
    fam = resolve_family(cfg.model)
    return fam.build(cfg, concepts, device=device, offline=offline, text_embeddings=text_embeddings)


# Lookup order: CLIP config path, efficientnet-lite*, timm:, open_clip name.
from . import clip  # noqa: E402,F401  (registers the open_clip families)
from . import imagenet  # noqa: E402,F401  (registers the ImageNet-classifier families)

clip.register_name_family()
