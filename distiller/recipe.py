"""Recipes: a typed, frozen tree of settings loaded from TOML and overridden by CLI flags.

Every stage takes its slice (``recipe.synthesis``, ``recipe.distill``...), never globals. The
recipe as used is written back into the run folder, so a run says everything it did.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_DIRS = (Path(__file__).resolve().parent.parent / "recipes", Path(__file__).resolve().parent / "recipes")
DEFAULT_RECIPE = "cpu"


@dataclass(frozen=True)
class TeacherCfg:
    model: str = "ViT-B-32"                     # open_clip name or model-config JSON path
    pretrained: str = "laion2b_s34b_b79k"       # open_clip tag or local weights file
    templates: tuple[str, ...] = ("a photo of a {}.",)
    batch_size: int = 32                        # teacher forward batch when labelling
    input_size: int = 0                         # ImageNet teachers: inference size; 0: the model's own
    judge: str = "auto"                         # held-out network scoring the bank; auto | none | a teacher name
    judge_min: float = 0.5                      # warn for concepts the judge agrees on less often


@dataclass(frozen=True)
class PromptsCfg:
    source: str = "auto"                        # auto (contrastive for CLIP) | contrastive | random | mix | plain
    styles: int = 0                             # number of styles; 0: the source's default (8)
    template: str = "a {style} style of a {cls}"
    style_template: str = "a {style} style of a"
    mix_words: int = 3                          # style words mixed into each Mix-Prompt pseudo-word
    train_steps: int = 100                      # Contrastive-Prompt: Adam steps per style
    lr: float = 0.01
    diversity_weight: float = 1.0
    consistency_weight: float = 1.0
    diversity_temperature: float = 0.1


@dataclass(frozen=True)
class SynthesisCfg:
    images_per_class: int = 64
    shard_size: int = 32                        # images optimised together and written as one shard
    val_every: int = 5                          # every val_every-th shard is validation
    resolution: int = 0                         # stored image size; 0: the teacher's input size
    steps: int = 100
    lr: float = 0.05
    crops: int = 2                              # augmented views per image per step
    crop_scale: tuple[float, float] = (0.4, 1.0)
    rotate_deg: float = 10.0
    noise: float = 0.02
    decay_power: float = 1.0                    # Fourier amplitude falls as 1/f^decay_power
    tv_weight: float = 0.0
    class_weight: float = 0.1                   # CLIP: zero-shot cross-entropy on the image's class
    bn_weight: float = 1.0                      # ImageNet teachers: batch-norm statistics prior
    ensemble: tuple[str, ...] = ()              # more teachers whose synthesis loss is averaged in (same target space)
    adversarial: float = 0.0                    # weight of disagreement with the student as initialised (pretrained)
    generator_steps: int = 0                    # 0: optimise each image; > 0: train a generator this long, sample the bank
    generator_lr: float = 0.001
    generator_diversity: float = 0.0            # mode-seeking term: samples of one class must differ with z


@dataclass(frozen=True)
class StudentCfg:
    model: str = ""                             # timm name; empty: the target's default
    input_size: int = 0                         # 0: the target's default
    init: str = "scratch"                       # scratch | pretrained (the target's offline ImageNet student)
    head: str = "auto"                          # auto | fresh | imagenet (pretrained: own ImageNet rows per concept)


@dataclass(frozen=True)
class DistillCfg:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    temperature: float = 4.0
    relabel: bool = False                       # teacher relabels every augmented view (costly on CPU)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    mixup: float = 0.0                          # mixup alpha; needs relabel
    freeze_bn: bool = False                     # keep batch-norm running statistics (pretrained students)


@dataclass(frozen=True)
class ExportCfg:
    variants: tuple[str, ...] = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8")
    opset: int = 17
    calibration_images: int = 128               # from the train split only
    max_drop: float = 1.0                       # points of top-1 agreement INT8 may lose vs FP32
    min_speedup: float = 1.2                    # INT8 replaces FP32 only when at least this much faster
    latency_runs: int = 50
    threads: int = 0                            # 0: physical cores


@dataclass(frozen=True)
class Recipe:
    name: str = DEFAULT_RECIPE
    description: str = ""
    seed: int = 0
    device: str = "auto"                        # auto | cpu | cuda
    target: str = "cpu"
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    prompts: PromptsCfg = field(default_factory=PromptsCfg)
    synthesis: SynthesisCfg = field(default_factory=SynthesisCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    export: ExportCfg = field(default_factory=ExportCfg)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        import tomli_w
        return tomli_w.dumps(self.to_dict())

    def replace(self, overrides: dict[str, Any]) -> "Recipe":
        """Override dotted keys: ``{"synthesis.steps": 10, "seed": 3}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise UserError(f"unknown recipe key {key!r}")
                node = node[p]
            if leaf not in node:
                raise UserError(f"unknown recipe key {key!r}: {_near(leaf, node)}")
            node[leaf] = value
        return build(Recipe, data, "recipe")


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _near(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=3)
    return ("did you mean " + ", ".join(near)) if near else "known keys: " + ", ".join(options)


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table")
        return build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise UserError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where} must be a whole number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}")
    return value


def build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"unknown setting {where}.{unknown[0]}: {_near(unknown[0], names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def recipe_names() -> list[str]:
    seen = []
    for d in RECIPE_DIRS:
        if d.is_dir():
            seen += [p.stem for p in sorted(d.glob("*.toml")) if p.stem not in seen]
    return seen


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        if not p.exists():
            raise UserError(f"recipe file {p} does not exist: pass a path to a .toml or one of {', '.join(recipe_names())}")
        return p
    for d in RECIPE_DIRS:
        if (d / f"{name_or_path}.toml").exists():
            return d / f"{name_or_path}.toml"
    raise UserError(f"unknown recipe {name_or_path!r}: {_near(name_or_path, recipe_names())}")


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    recipe = build(Recipe, data, "recipe")
    return recipe.replace(overrides or {})


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set synthesis.steps=10`` items as a dict; values read as TOML, else as strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set synthesis.steps=50")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def recipe_from_dict(data: dict) -> Recipe:
    return build(Recipe, data, "recipe")
