"""What the exporter measured, as typed records: one ``VariantRecord`` per model file and the ``ExportRecord``
around them (``export.json``, and ``report.json``'s ``export``). The exporter writes them, and the runtime's
fallbacks, ``distiller bench``, the report and ``eval`` read them, through these classes alone."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import UserError


@dataclass
class Latency:
    """Batch-1 milliseconds of ``runs`` timed calls."""
    p50: float
    p90: float
    p99: float
    mean: float
    runs: int


@dataclass
class VariantRecord:
    """One exported model file: how it was made and what it measured on this machine."""
    file: str                                   # relative to the run folder
    precision: str                              # fp32 | int8
    agreement: float                            # top-1 agreement with the FP32 student on the fidelity images
    latency_ms: Latency
    format: str = ""                            # onnx | openvino
    description: str = ""
    size_mb: float = 0.0
    build_s: float = 0.0
    cosine: float = 1.0                         # mean logit cosine against the FP32 student
    max_abs_diff: float = 0.0
    teacher_agreement: float | None = None      # on the validation images with teacher logits
    backend: str = ""
    agreement_open_set: float | None = None     # open-set models: the K + 1 decision's agreement ...
    agreement_concepts: float | None = None     # ... and the concepts' own ranking's (``agreement`` is the lower)
    agreement_by_source: dict[str, float] | None = None   # ``agreement`` on each fidelity source's images alone
    cosine_by_source: dict[str, float] | None = None      # ``cosine`` likewise
    open_set: dict | None = None                # open-set models: the rule this file carries (runtime.openset)
    drop_points: float = 0.0                    # 100 x (1 - agreement)
    eligible: bool = False                      # within max_drop, judged on enough images and fast enough
    status: str = ""                            # why it was or was not picked, in words

    def to_json(self) -> dict:
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None or k == "teacher_agreement"}

    @classmethod
    def from_json(cls, d: dict) -> "VariantRecord":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["latency_ms"] = Latency(**{k: d["latency_ms"][k] for k in ("p50", "p90", "p99", "mean", "runs")})
        return cls(**kw)


@dataclass(frozen=True)
class ShipRule:
    """When an INT8 variant may replace FP32: stated here, applied by ``exporter.select``.

    An INT8 variant is eligible when (1) its mean logit cosine with FP32 on the photo-like fidelity images (none
    seen by a quantizer; ``cosine_on``: the real validation images, else the statistics images held out, else
    "all") is at least ``min_cosine``; (2) on the images of ``judged_on`` (the fidelity source whose answers
    are the user's: real validation images, or the bank's for a bank-calibrated student; "all": every fidelity
    image; None: no source can resolve it, so (1) alone judges) it loses at most ``max_drop`` points of top-1
    agreement, measured on at least ``min_fidelity_images`` of them; and (3) it is at least ``min_speedup`` times
    faster than the fastest FP32 variant. The fastest eligible variant ships."""
    max_drop: float = 1.0
    min_speedup: float = 1.0
    min_fidelity_images: int = 0
    min_cosine: float = 0.0
    judged_on: str | None = "all"
    cosine_on: str = "all"


@dataclass
class ExportRecord:
    """Every variant of a run, the deployable one, the rule that chose it, and how the fidelity was judged."""
    variants: dict[str, VariantRecord]
    deployable_variant: str
    rule: ShipRule                              # in JSON, its fields sit at the top level (max_drop, ...)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fidelity_images: int | None = None
    calibration_images: int | None = None
    calibration_source: str | None = None       # real | statistics | bank (older runs: real | surrogate)
    fidelity_sources: dict[str, int] | None = None   # fidelity images per source (None: an export made
                                                     # before per-source fidelity: `distiller export RUN` redoes it)
    threshold: dict | None = None               # exports before it: {"value": t, "source": ..., ...} (score "probability")

    @property
    def open_set(self) -> dict | None:
        """The open-set rule the deployable file carries (runtime.openset.OpenSetRule as JSON; None: closed-set, or
        an export made before the rule was recorded)."""
        return self.variants[self.deployable_variant].open_set

    @property
    def deployable(self) -> str:
        """The deployable variant's file."""
        return self.variants[self.deployable_variant].file

    def eligible_by_speed(self) -> list[VariantRecord]:
        """The eligible variants, fastest first (the runtime's fallbacks)."""
        return sorted((r for r in self.variants.values() if r.eligible), key=lambda r: r.latency_ms.p50)

    def to_json(self) -> dict:
        out = {"variants": {n: r.to_json() for n, r in self.variants.items()}, "failed": self.failed,
               "deployable": self.deployable, "deployable_variant": self.deployable_variant, **asdict(self.rule),
               "notes": self.notes}
        for k in ("fidelity_images", "calibration_images", "calibration_source", "fidelity_sources", "open_set", "threshold"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_json(cls, d: dict, source: str = "export.json") -> "ExportRecord":
        try:
            rule = ShipRule(float(d["max_drop"]), float(d.get("min_speedup", 1.0)), int(d.get("min_fidelity_images", 0)),
                            float(d.get("min_cosine", 0.0)), d.get("judged_on", "all"), d.get("cosine_on", "all"))
            return cls({n: VariantRecord.from_json(r) for n, r in d["variants"].items()}, d["deployable_variant"], rule,
                       dict(d.get("failed", {})), list(d.get("notes", [])), d.get("fidelity_images"),
                       d.get("calibration_images"), d.get("calibration_source"), d.get("fidelity_sources"),
                       d.get("threshold"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source}: its export record is damaged ({type(exc).__name__}: {exc}): run `distiller export "
                            f"RUN` again") from None
