"""Recipes: a typed, frozen tree of settings loaded from TOML and overridden by CLI flags.

Every stage takes its slice (``recipe.synthesis``, ``recipe.distill``...), never globals. The
recipe as used is written back into the run folder, so a run says everything it did.

The types and bounds live here; every default lives in one place, the base recipe ``recipes/cpu.toml``,
beneath every other recipe (its ``base`` chain ends there, a recipe file without one gets it too). Fixed
choices are ``Literal`` types checked at load with a did-you-mean; choices that are extension points (the
prior, the prompt source, the target, export variants) are checked against their registries by ``preflight``.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from runtime.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_DIRS = (Path(__file__).resolve().parent / "recipes",)   # shipped in the wheel (package data)
DEFAULT_RECIPE = "cpu"


def num(*, min=None, max=None, above=None):
    """A numeric setting with its bounds, declared beside it (checked when a recipe is built, before
    anything is written): ``min``/``max`` inclusive, ``above`` exclusive. Tuples are checked per item."""
    return field(metadata={"bounds": (min, max, above)})


Device = Literal["auto", "cpu", "cuda"]
BnForm = Literal["kl", "l2"]
StudentInit = Literal["pretrained", "scratch"]
HeadChoice = Literal["auto", "fresh", "imagenet"]
CalibrationSource = Literal["auto", "statistics", "bank", "real"]
OtherDecision = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TeacherCfg:
    model: str                                  # open_clip name or model-config JSON path
    pretrained: str                             # open_clip tag or local weights file
    templates: tuple[str, ...]
    batch_size: int = num(min=1)                # teacher forward batch when labelling
    input_size: int = num(min=0, max=1024)      # ImageNet teachers: inference size; 0: the model's own
    judge: str                                  # held-out network scoring the bank; auto | none | a teacher name
    judge_min: float = num(min=0.0)             # warn for concepts the judge agrees on less often (above 1: always)
    other_prompts: tuple[str, ...]              # CLIP: what "other" reads


@dataclass(frozen=True)
class PromptsCfg:
    source: str                                 # auto (contrastive for CLIP) | contrastive | random | mix | plain
    styles: int = num(min=0, max=4096)          # number of styles; 0: the source's default (8)
    template: str
    style_template: str
    mix_words: int = num(min=1)                 # style words mixed into each Mix-Prompt pseudo-word
    train_steps: int = num(min=0)               # Contrastive-Prompt: Adam steps per style
    lr: float = num(above=0.0)
    diversity_weight: float = num(min=0.0)
    consistency_weight: float = num(min=0.0)
    diversity_temperature: float = num(above=0.0)


@dataclass(frozen=True)
class PixelsCfg:
    """``synthesis.prior = "pixels"``: DeepInversion's ImageNet recipe (NVlabs imagenet_inversion.py, setting 0)."""
    lr: float = num(above=0.0)                  # Adam on pixels in ImageNet-normalised units
    betas: tuple[float, float] = num(min=0.0, max=0.999)
    warmup: float = num(min=0.0, max=1.0)       # share of each phase warming up, then cosine to 0 (100 of 2000)
    jitter: float = num(min=0.0, max=0.5)       # random roll, share of the side (30 px of 224)
    flip: bool
    bn_weight: float = num(min=0.0)             # r_feature: the BN statistics prior's weight
    bn_form: BnForm                             # l2 (DeepInversion: ||mean gap|| + ||variance gap||) | kl
    first_bn_weight: float = num(min=0.0)       # the first BN layer's term, times this
    tv_l2: float = num(min=0.0)                 # L2 total variation (4 directions)
    l2: float = num(min=0.0)                    # L2 norm of the image


@dataclass(frozen=True)
class VqganCfg:
    """``synthesis.prior = "vqgan"``: VQGAN-CLIP's latent optimisation."""
    lr: float = num(above=0.0)                  # Adam on the latents
    quantize: bool                              # straight-through nearest-codebook step before decoding


@dataclass(frozen=True)
class SynthesisCfg:
    images_per_class: int = num(min=1)
    shard_size: int = num(min=1)                # images optimised together and written as one shard
    val_every: int = num(min=2)                 # every val_every-th shard is validation
    resolution: int = num(min=0, max=1024)      # stored image size; 0: the teacher's input size
    prior: str                                  # how an image is parametrised: fourier | pixels | vqgan (priors.py)
    prior_weights: str                          # vqgan: a diffusers VQModel, hub id (ORG/NAME[/SUBFOLDER]) or folder
    steps: int = num(min=1)
    resolutions: tuple[int, ...]                # pixels: coarse to fine, e.g. [64, 128]; (): the bank's resolution
    resolution_steps: tuple[int, ...]           # pixels: steps at each of resolutions (they replace steps)
    lr: float = num(above=0.0)                  # fourier: Adam on the spectra
    crops: int = num(min=1)                     # augmented views per image per step
    crop_scale: tuple[float, float] = num(above=0.0, max=1.0)
    rotate_deg: float = num(min=0.0, max=180.0)
    noise: float = num(min=0.0)
    decay_power: float = num(min=0.0)           # Fourier amplitude falls as 1/f^decay_power
    tv_weight: float = num(min=0.0)
    class_weight: float = num(min=0.0)          # CLIP: zero-shot cross-entropy on the image's class
    bn_weight: float = num(min=0.0)             # ImageNet teachers: batch-norm statistics prior (pixels: its own)
    bn_form: BnForm                             # kl (per-channel Gaussian KL, scale-free) | l2 (DeepInversion's)
    first_bn_weight: float = num(min=0.0)       # the first BN layer's term, times this
    ensemble: tuple[str, ...]                   # more teachers whose synthesis loss is averaged in (same target space)
    adversarial: float = num(min=0.0)           # weight of disagreement with the student as initialised (pretrained)
    generator_steps: int = num(min=0)           # 0: optimise each image; > 0: train a generator this long, sample the bank
    generator_lr: float = num(above=0.0)
    generator_diversity: float = num(min=0.0)   # mode-seeking term: samples of one class must differ with z
    negative_share: float = num(min=0.0, max=0.5)   # CLIP + openset: bank share made for teacher.other_prompts
    confirm_above: int = num(min=0)             # more planned images than this need `make --yes` (0: never ask)
    pixels: PixelsCfg
    vqgan: VqganCfg


@dataclass(frozen=True)
class StudentCfg:
    model: str                                  # timm name; empty: the target's default
    input_size: int = num(min=0, max=1024)      # 0: the target's default
    init: StudentInit                           # pretrained (the target's offline ImageNet student) | scratch
    head: HeadChoice                            # auto | fresh | imagenet (pretrained: own ImageNet rows per concept)
    bridge_min_similarity: float = num(min=-1.0, max=1.0)   # CLIP bridge: least cosine to an ImageNet class


@dataclass(frozen=True)
class DistillCfg:
    epochs: int = num(min=0)
    batch_size: int = num(min=1)
    lr: float = num(min=0.0)                    # 0: the student stays as initialised (a test of the pipeline)
    weight_decay: float = num(min=0.0)
    warmup_epochs: int = num(min=0)
    temperature: float = num(above=0.0)
    relabel: bool                               # teacher relabels every augmented view (costly on CPU)
    crop_scale: tuple[float, float] = num(above=0.0, max=1.0)
    mixup: float = num(min=0.0)                 # mixup alpha; needs relabel
    freeze_bn: bool                             # keep batch-norm running statistics (pretrained students)
    real_weight: float = num(min=0.0)           # loss weight of the real images (--images); 0: drop them
    surrogate_weight: float = num(min=0.0)      # loss weight of the surrogate bank; 0: drop it
    probe_steps: int = num(min=0)               # fresh heads on pretrained students: fit the head on frozen
                                                # features first (linear probe), then fine-tune; 0: no probe
    probe_temperature: float = num(above=0.0)   # the probe matches the teacher's probabilities at this T
    probe_weight_decay: tuple[float, ...] = num(min=0.0)   # chosen by 5-fold CV when several


@dataclass(frozen=True)
class ImagesCfg:
    val_fraction: float = num(min=0.0, max=0.9) # the real images held back (fixed per image by seed)
    shard_size: int = num(min=1)                # images the teacher labels per atomic shard


@dataclass(frozen=True)
class CalibrationCfg:
    source: CalibrationSource                   # what INT8 calibrates on (auto: real, else statistics, else bank)
    holdout: int = num(min=0, max=4096)         # more statistics images, never calibrated on: the fidelity check's
    steps: int = num(min=1, max=10000)          # Adam steps per batch of statistics images
    batch: int = num(min=2, max=256)            # images optimised together (BN statistics are batch statistics)
    lr: float = num(above=0.0, max=10.0)        # on pixels in [0, 1]
    jitter: float = num(min=0.0, max=0.5)       # random roll of up to this share of the side, per step
    form: BnForm                                # the BN gap: kl (per-channel Gaussian KL) | l2 (ZeroQ's)


@dataclass(frozen=True)
class ExportCfg:
    variants: tuple[str, ...]
    opset: int = num(min=13, max=21)
    calibration_images: int = num(min=1)        # from the train split only
    max_drop: float = num(min=0.0, max=100.0)   # points of top-1 agreement INT8 may lose vs FP32
    min_cosine: float = num(min=0.0, max=1.0)   # mean logit cosine with FP32 INT8 must keep on the fidelity images
    min_speedup: float = num(min=0.0)           # INT8 replaces FP32 only when at least this much faster
    min_fidelity_images: int = num(min=0)       # INT8 ships only when judged on at least this many unseen images
    latency_runs: int = num(min=1)
    threads: int = num(min=0)                   # 0: physical cores


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    seed: int = num(min=0, max=2**63 - 1)
    device: Device                              # auto | cpu | cuda
    target: str
    openset: bool                               # models have an extra last output, other_label: "none of these"
    other_label: str
    other_decision: OtherDecision               # whether classify() answers other by default (auto: the teacher family's)
    other_bias: float = num(min=-20.0, max=20.0)   # log-odds taken off the other output before deciding: > 0 answers other less
    teacher: TeacherCfg
    prompts: PromptsCfg
    synthesis: SynthesisCfg
    student: StudentCfg
    distill: DistillCfg
    images: ImagesCfg
    calibration: CalibrationCfg
    export: ExportCfg

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
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UserError(f"{where} = {value!r}: {hint}use {', '.join(choices[:-1])} or {choices[-1]}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table")
        return build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]                        # one value where a list of any length is asked for
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


def _check_bounds(value, bounds, where: str) -> None:
    lo, hi, above = bounds
    for v in value if isinstance(value, tuple) else (value,):
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above):
            parts = ([f"> {above}"] if above is not None else []) + ([f">= {lo}"] if lo is not None else []) \
                + ([f"<= {hi}"] if hi is not None else [])
            shown = list(value) if isinstance(value, tuple) else value
            raise UserError(f"{where} = {shown} is out of range: use a value {' and '.join(parts)}")


def build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"unknown setting {where}.{unknown[0]}: {_near(unknown[0], names)}")
    missing = [k for k in names if k not in data]
    if missing:
        raise UserError(f"{where}.{missing[0]} is not set: the base recipe ({DEFAULT_RECIPE}.toml) sets every key")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    for f in fields(cls):
        if "bounds" in f.metadata and f.name in kwargs:
            _check_bounds(kwargs[f.name], f.metadata["bounds"], f"{where}.{f.name}")
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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe file as a plain dict, its ``base`` recipe (by name or path) merged beneath it."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML ({exc}): fix the file") from None
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"recipe {path}: base must be a recipe name or path, got {base!r}")
    if str(path.resolve()) in _seen:
        raise UserError(f"recipe {path}: its bases form a loop ({' -> '.join(_seen)}): fix the base keys")
    if "/" in base or base.endswith(".toml"):   # a path: relative to this recipe's folder
        base = str(path.parent / base)
    parent = read_recipe(base, _seen + (str(path.resolve()),))
    parent.pop("description", None)
    return _merge(parent, data)


@lru_cache(maxsize=None)
def _base_toml() -> str:
    return find_recipe(DEFAULT_RECIPE).read_text()


def with_defaults(data: dict) -> dict:
    """``data`` over the base recipe's settings: every key a recipe leaves out has the base's value."""
    base = tomllib.loads(_base_toml())
    base["description"] = ""
    return _merge(base, data)


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None) -> Recipe:
    """A recipe by name or path (with its base), overridden by dotted keys, every bound checked."""
    recipe = build(Recipe, with_defaults(read_recipe(name_or_path)), "recipe")
    return recipe.replace(overrides or {})


def default_recipe() -> Recipe:
    """The base recipe (``cpu``): every default setting."""
    return load_recipe(DEFAULT_RECIPE)


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
    """A recipe as a run folder wrote it (keys added since come from the base recipe)."""
    return build(Recipe, with_defaults(data), "recipe")
