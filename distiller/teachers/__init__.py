"""Teachers: the networks the student imitates and the synthesizer inverts.

A teacher family registers a ``matches(name) -> bool`` and a ``build(name, concepts, cfg, ...)``.
``resolve_family`` tries the families in registration order. Callers never ask which family a teacher is:
they ask the family's named capabilities (``has_text_tower``, ``scores_imagenet``, ``judge``, ``recipe``),
and nothing outside this package reads a family's private names or tests a model name. Every teacher implements the ``Teacher`` protocol in full: attributes a family has no
use for are ``None`` (an ImageNet classifier has no text tower, CLIP no member classes), never
missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from runtime.registry import Registry

if TYPE_CHECKING:
    import torch

    from runtime.metadata import Preprocess


class TextTower(NamedTuple):
    """A CLIP teacher's text side, for prompt styles: the open_clip model, its tokenizer, the class
    texts the teacher reads ("" for a concept named by its examples alone), the zero-shot logit scale, and
    ``mix_examples``: per-class targets [..., K, D] -> the same with each concept by example's image prototype
    mixed in (its prototype alone without a name), or None without such concepts."""
    model: Any
    tokenizer: Any
    class_texts: tuple[str, ...]
    scale: float
    mix_examples: Callable | None = None


class Teacher(Protocol):
    """What every teacher family offers (images are float [B, 3, H, W] in [0, 1], any size)."""

    input_size: int                               # the size it runs at
    num_classes: int                              # concepts
    outputs: int                                  # logits columns: the concepts, + 1 with openset
    text: "torch.Tensor | None"                   # class text embeddings [K, D] (CLIP), else None
    text_tower: TextTower | None                  # the text encoder for prompt styles, else None
    members: "list[torch.Tensor] | None"          # ImageNet classes per concept (classifiers), else None
    openset: bool                                 # logits end with one more column: "other" (none of the concepts)
    negative_targets: "torch.Tensor | None"       # synthesis targets for the bank's negatives (CLIP + openset), else None

    def logits(self, images: "torch.Tensor") -> "torch.Tensor":
        """Differentiable logits over the concepts [B, K], and "other" last with ``openset`` [B, K + 1]."""

    def synthesis_loss(self, images, targets, classes, cfg) -> "torch.Tensor":
        """Per-image loss the synthesizer minimises [B]."""

    def synthesis_loss_and_logits(self, images, targets, classes, cfg) -> "tuple[torch.Tensor, torch.Tensor]":
        """The same loss and the concept logits of the same forward pass."""

    def eval_preprocess(self) -> "Preprocess":
        """Its eval transform on a file, ending in [0, 1] (the teacher normalises itself)."""

    def warnings(self) -> list[str]:
        """What the user should know about how it covers the concepts."""

    def describe(self) -> dict:
        """What goes into metadata and teacher.json (family, model, weights, input_size, ...)."""


@dataclass(frozen=True)
class TeacherFamily:
    matches: Callable[[str], bool]
    build: Callable
    names: Callable[[], list[str]]   # known model names, for hints
    check: Callable                  # (cfg, offline, concepts) -> None; raises UserError before any work starts
    has_text_tower: bool = True      # class texts read by a text tower (CLIP): prompt styles, the text bridge, negatives
    scores_imagenet: bool = False    # an ImageNet classifier: synthesis aims at ImageNet class indices (ensembles share them)
    judge: Callable = lambda name, used=(): None   # a held-out network (not in ``used``) that scores the bank, or None
    recipe: str = "cpu"              # what `make --recipe auto` uses with this family's teachers
    network_of: Callable[[str], str | None] = lambda arch: None   # teacher name of a student architecture
    resolve_paths: Callable = lambda cfg: cfg     # the [teacher] slice with its file paths made absolute
    learns_examples: bool = False    # learns a concept by example (--classes "label=@DIR"; distiller.examples)
    answers_other: bool = False      # other_decision = auto turns the open-set answer on: the data-free rule kept >= 95%
                                     # of the closed-set known accuracy on the benchmark photos (benchmarks/open_set.py)


TEACHERS: Registry[TeacherFamily] = Registry("teacher family")


def resolve_family(name: str) -> TeacherFamily:
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
    return resolve_family(teacher).recipe if teacher else DEFAULT_RECIPE


def check_teacher(cfg, offline=False, concepts=None) -> None:
    """Fail fast (before a run folder is made) on an unknown teacher, unavailable weights or concepts it cannot cover."""
    resolve_family(cfg.model).check(cfg, offline, concepts)


def network_name(arch: str) -> str:
    """The teacher name of a network a student is built from (tf_efficientnet_lite0 -> efficientnet-lite0)."""
    return next((n for _, fam in TEACHERS.items() if (n := fam.network_of(arch))), arch)


def resolve_paths(cfg):
    """The ``[teacher]`` slice with relative file paths made absolute, so the run works from any folder."""
    return resolve_family(cfg.model).resolve_paths(cfg)


def judge_cfg(cfg, used=()):
    """The ``[teacher]`` slice for the held-out judge ("auto": the family's choice of a network not in
    ``used``, the other networks that shaped the bank), or None."""
    import dataclasses
    if cfg.judge in ("", "none"):
        return None
    name = resolve_family(cfg.model).judge(cfg.model, tuple(used)) if cfg.judge == "auto" else cfg.judge
    if name is None:
        return None
    size = cfg.input_size if not resolve_family(name).has_text_tower else 0
    return dataclasses.replace(cfg, model=name, judge="none", input_size=size)


def build_teacher(cfg, concepts, device="cpu", offline=False, text_embeddings=None, openset=False) -> Teacher:
    """The teacher a recipe's ``[teacher]`` slice names, with its concept head (and an "other" output)."""
    fam = resolve_family(cfg.model)
    return fam.build(cfg, concepts, device=device, offline=offline, text_embeddings=text_embeddings, openset=openset)


# Lookup order: CLIP config path, efficientnet-lite*, timm:, open_clip name.
from runtime.errors import UserError

from ..recipe import DEFAULT_RECIPE
from . import (
    clip,  # noqa: E402,F401  (registers the open_clip families)
    imagenet,  # noqa: E402,F401  (registers the ImageNet-classifier families)
)

clip.register_name_family()
