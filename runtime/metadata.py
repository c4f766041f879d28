"""The metadata schema embedded in every exported model.

ONNX files carry it as the ``distiller`` metadata property, OpenVINO IR in ``rt_info`` and a
sidecar ``<model>.json``. The exporter imports this module to write it; nothing here imports
the exporter, the training side or torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .openset import OpenSetRule

METADATA_KEY = "distiller"
SCHEMA_VERSION = 4   # 2: open-set models (other_label, threshold); 3: other_bias; 4: open_set (the rule: score,
                     # threshold, on). Version 1 loads as closed-set, 2 with other_bias 0, 2 and 3 with the rule they
                     # applied (score "probability", their threshold, on)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (open_clip's PreprocessCfg, made explicit).

    Resize the shorter side to ``resize`` with ``interpolation``, centre-crop ``size`` x ``size``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` per RGB channel, layout NCHW float32.
    """

    size: int
    resize: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        if self.resize < self.size:
            raise UserError(f"preprocess resize {self.resize} is smaller than the crop {self.size}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, **kw) -> "Preprocess":
        return cls(size=size, resize=int(size / crop_pct), **kw)


@dataclass(frozen=True)
class ModelMetadata:
    labels: tuple[str, ...]
    preprocess: Preprocess
    student: str = ""
    teacher: dict = field(default_factory=dict)
    precision: str = "fp32"
    recipe: dict = field(default_factory=dict)
    package_version: str = ""
    created: str = ""
    extra: dict = field(default_factory=dict)
    other_label: str = ""        # open-set: the name of the model's extra last output ("" : closed-set, K outputs)
    open_set: OpenSetRule = field(default_factory=OpenSetRule)   # open-set: when other_label is answered
    other_bias: float = 0.0      # open-set: log-odds taken off the other output before softmax and decision
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) < 2:
            raise UserError("model metadata lists fewer than 2 labels: re-export the model")
        if self.other_label and self.other_label in self.labels:
            raise UserError(f"the open-set label {self.other_label!r} is also a concept: rename it (make --other-label NAME)")
        if not math.isfinite(float(self.other_bias)):
            raise UserError(f"model metadata other_bias {self.other_bias} is not a finite number: re-export the model")
        if isinstance(self.open_set, dict):
            object.__setattr__(self, "open_set", OpenSetRule.from_json(self.open_set))

    @property
    def outputs(self) -> int:
        """The model's output width: the concepts, plus one for ``other_label`` in an open-set model."""
        return len(self.labels) + (1 if self.other_label else 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def replace(self, **changes) -> "ModelMetadata":
        data = asdict(self)
        data.update(changes)
        data["open_set"] = changes.get("open_set", self.open_set)
        data["preprocess"] = Preprocess(**data["preprocess"]) if isinstance(data["preprocess"], dict) else data["preprocess"]
        return ModelMetadata(**data)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelMetadata":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise UserError(f"{source}: its distiller metadata is not valid JSON ({exc}): re-export it") from None
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UserError(
                f"{source}: metadata schema version {version!r} is newer than this runtime understands "
                f"({SCHEMA_VERSION}): upgrade distiller"
            )
        if version < 4 and data.get("other_label"):   # the rule schema 2 and 3 applied, written as a rule
            data["open_set"] = {"score": "probability", "threshold": data.pop("threshold", 0.0), "on": True,
                                "fit": data.pop("threshold_fit", {})}
        for legacy in ("threshold", "threshold_fit"):   # closed-set models of schema 2 and 3 carried them unused
            data.pop(legacy, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        extra = dict(data.pop("extra", {}) or {})
        for key in unknown:
            extra[key] = data.pop(key)
        try:
            pre = Preprocess(**data.pop("preprocess"))
            rule = OpenSetRule.from_json(data.pop("open_set"), source) if "open_set" in data else OpenSetRule()
            return cls(preprocess=pre, extra=extra, open_set=rule, **data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{source}: its distiller metadata is incomplete ({exc}): re-export it") from None
