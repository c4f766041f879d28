"""Export variants registered by name, measured on this machine, and the deployable pick.

Each variant builds one file from the ones it needs; ``export_all`` builds the recipe's list,
measures each with the runtime itself on a ``FidelitySet`` no quantizer saw (top-1 agreement and
logit cosine against the PyTorch student on the same input tensors, overall and per source;
agreement with the teacher; batch-1 latency) and marks the fastest variant that the
``runtime.exports.ShipRule`` allows as deployable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.classifier import Classifier, model_size_bytes
from runtime.exports import ExportRecord, Latency, ShipRule, VariantRecord
from runtime.metadata import ModelMetadata
from runtime.registry import Registry
from runtime.timing import latency_stats, timed

from . import quantize
from .onnx_export import export_onnx


@dataclass
class ExportContext:
    out_dir: Path
    model: object                      # torch student, eval mode
    metadata: ModelMetadata
    calibration: np.ndarray            # preprocessed train images, NCHW float32
    opset: int = 17
    max_drop: float = 1.0              # points of top-1 agreement
    built: dict = field(default_factory=dict)
    _tune_reference: np.ndarray | None = field(default=None, repr=False)

    def tune_reference(self) -> np.ndarray:
        """FP32 outputs on ``calibration``, which accuracy control tunes on; computed once, when first needed."""
        if self._tune_reference is None:
            import torch
            with torch.no_grad():
                self._tune_reference = self.model(torch.from_numpy(self.calibration)).numpy()
        return self._tune_reference


@dataclass(frozen=True)
class Variant:
    file: str
    format: str
    precision: str
    needs: tuple[str, ...]
    build: Callable[[ExportContext], Path]
    description: str = ""


VARIANTS: Registry[Variant] = Registry("export variant")


def _meta(ctx, precision, fmt, **extra):
    return ctx.metadata.replace(precision=precision, extra={**ctx.metadata.extra, "format": fmt, **extra})


VARIANTS.register("onnx-fp32", Variant("student.onnx", "onnx", "fp32", (), lambda c: export_onnx(
    c.model, c.metadata.preprocess.size, c.out_dir / "student.onnx", _meta(c, "fp32", "onnx"), c.opset),
    "ONNX FP32, dynamic batch"))
VARIANTS.register("openvino-fp32", Variant("openvino/student.xml", "openvino", "fp32", ("onnx-fp32",), lambda c: quantize.onnx_to_openvino(
    c.built["onnx-fp32"], c.out_dir / "openvino" / "student.xml", _meta(c, "fp32", "openvino")),
    "OpenVINO IR FP32 (run pinned to f32)"))

# ONNX Runtime static INT8: the settings worth trying on a CPU; the default is QDQ, U8 activations,
# S8 weights, per-tensor, MinMax calibration.
ORT_INT8 = {
    "onnx-int8": ("student.int8.onnx", {}, "QDQ U8S8 per-tensor MinMax"),
    "onnx-int8-qop": ("student.int8-qop.onnx", {"format": "QOperator"}, "QOperator U8S8"),
    "onnx-int8-s8s8": ("student.int8-s8s8.onnx", {"activations": "S8"}, "QDQ S8S8"),
    "onnx-int8-u8u8": ("student.int8-u8u8.onnx", {"weights": "U8"}, "QDQ U8U8"),
    "onnx-int8-perchannel": ("student.int8-pc.onnx", {"per_channel": True}, "QDQ U8S8 per-channel weights"),
    "onnx-int8-skip-ends": ("student.int8-ends.onnx", {"skip_ends": True}, "QDQ, first and last layer FP32"),
    "onnx-int8-entropy": ("student.int8-entropy.onnx", {"calibration": "Entropy"}, "QDQ, entropy calibration"),
    "onnx-int8-percentile": ("student.int8-pct.onnx", {"calibration": "Percentile"}, "QDQ, 99.999th percentile calibration"),
}
for _name, (_file, _opts, _desc) in ORT_INT8.items():
    VARIANTS.register(_name, Variant(_file, "onnx", "int8", ("onnx-fp32",), lambda c, f=_file, o=_opts: quantize.quantize_onnx(
        c.built["onnx-fp32"], c.out_dir / f, c.calibration, _meta(c, "int8", "onnx", quantization=o), **o), _desc))

OV_INT8 = {
    "openvino-int8": ("student.int8.xml", {}, "NNCF performance preset"),
    "openvino-int8-mixed": ("student.int8-mixed.xml", {"preset": "mixed"}, "NNCF mixed preset (asymmetric activations)"),
    "openvino-int8-skip-ends": ("student.int8-ends.xml", {"skip_ends": True}, "NNCF, first and last layer FP32"),
    "openvino-int8-acc": ("student.int8-acc.xml", {"accuracy_control": True}, "NNCF with accuracy control (max_drop)"),
}


def _ov_int8(c: ExportContext, file: str, opts: dict) -> Path:
    # tuned on the calibration images, never on the fidelity images ``export_all`` judges it on
    extra = {"validation": (c.calibration, c.tune_reference()), "max_drop": c.max_drop / 100} if opts.get("accuracy_control") else {}
    return quantize.quantize_openvino(c.built["openvino-fp32"], c.out_dir / "openvino" / file, c.calibration,
                                      _meta(c, "int8", "openvino", quantization=opts), **opts, **extra)


for _name, (_file, _opts, _desc) in OV_INT8.items():
    VARIANTS.register(_name, Variant(f"openvino/{_file}", "openvino", "int8", ("openvino-fp32",),
                                     lambda c, f=_file, o=_opts: _ov_int8(c, f, o), _desc))


def build_order(names) -> list[str]:
    order: list[str] = []

    def visit(n):
        v = VARIANTS.get(n)
        for dep in v.needs:
            visit(dep)
        if n not in order:
            order.append(n)
    for n in names:
        visit(n)
    return order


def interleaved_latency(paths: dict[str, Path], sample: np.ndarray, runs: int, threads: int | None,
                        block: int = 10) -> dict[str, Latency]:
    """Batch-1 latency of every variant, timed in turns (``block`` calls each, round after round, ``runs`` in all
    per variant), so that they all see the same load: a machine that slows down for a minute slows every variant,
    and INT8's speedup over FP32 does not depend on which was timed when (measured sequentially on a shared 2-core
    machine, the same OpenVINO INT8 and FP32 pair read 1.08x on one run and 1.73x on the next)."""
    x = sample[:1]
    models = {name: Classifier.load(path, threads=threads) for name, path in paths.items()}
    for clf in models.values():
        timed(lambda c=clf: c.logits(x), 1, 5)
    samples: dict[str, list] = {name: [] for name in models}
    for _ in range(max(1, -(-runs // block))):
        for name, clf in models.items():
            samples[name].append(timed(lambda c=clf: c.logits(x), block, 0))
    return {name: Latency(**latency_stats(np.concatenate(t)[:runs])) for name, t in samples.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between logit vectors."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float((num / den).mean())


@dataclass
class FidelitySet:
    """The images INT8 variants are judged on, none of them seen by a quantizer, and what is known about them."""
    images: np.ndarray          # NCHW float32
    reference: np.ndarray       # the FP32 student's outputs on them
    teacher: np.ndarray         # the teacher's logits (NaN rows: none, e.g. statistics images)
    sources: np.ndarray         # per row, where the image is from (real | statistics | bank)

    def __len__(self) -> int:
        return len(self.images)

    def counts(self) -> dict[str, int]:
        names, n = np.unique(self.sources, return_counts=True)
        return {str(a): int(b) for a, b in zip(names, n)}


def agreement(out: np.ndarray, reference: np.ndarray, concepts: int | None) -> tuple[float, dict]:
    """Top-1 agreement with the FP32 reference. ``concepts``: an open-set model's K; then agreement is the lower
    of the K + 1 decision's and the concepts' own ranking's, so a variant that keeps "other" but scrambles the
    concepts (a fidelity set the model calls other) fails."""
    full = float((out.argmax(-1) == reference.argmax(-1)).mean())
    if concepts is None or out.shape[-1] <= concepts:
        return full, {}
    inner = float((out[:, :concepts].argmax(-1) == reference[:, :concepts].argmax(-1)).mean())
    return min(full, inner), {"agreement_open_set": full, "agreement_concepts": inner}


def measure(path: Path, fid: FidelitySet, threads: int | None, concepts: int | None = None) -> dict:
    """Fidelity against the FP32 reference (over all the fidelity images, and per source) and agreement with the
    teacher; latency is timed afterwards for every variant together (``interleaved_latency``)."""
    clf = Classifier.load(path, threads=threads)
    out = np.concatenate([clf.logits(fid.images[i:i + 64]) for i in range(0, len(fid), 64)])
    known = ~np.isnan(fid.teacher).any(-1)   # rows without teacher logits only check fidelity
    full, extra = agreement(out, fid.reference, concepts)
    rows = {name: fid.sources == name for name in fid.counts()}
    by_source = {name: round(agreement(out[r], fid.reference[r], concepts)[0], 4) for name, r in rows.items()}
    return {
        **extra,
        "agreement": full,
        "agreement_by_source": by_source,
        "cosine_by_source": {name: round(cosine(out[r], fid.reference[r]), 5) for name, r in rows.items()},
        "cosine": cosine(out, fid.reference),
        "max_abs_diff": float(np.abs(out - fid.reference).max()),
        "teacher_agreement": float((out[known].argmax(-1) == fid.teacher[known].argmax(-1)).mean()) if known.any() else None,
        "latency_ms": Latency(0.0, 0.0, 0.0, 0.0, 0),   # timed with every other variant (interleaved_latency)
        "backend": clf.backend,
    }


def export_all(ctx: ExportContext, names, fid: FidelitySet, rule: ShipRule, runs: int = 50,
               threads: int | None = None, on_variant=None, done: dict[str, VariantRecord] | None = None) -> ExportRecord:
    """Build, measure and rank the variants; returns the export record (report.json's ``export``). ``done``: variants
    an interrupted export already built and judged (their files exist): their fidelity is kept, not measured again.
    Latency is measured last, for every variant together (``interleaved_latency``), so a resumed export and an
    uninterrupted one time their variants the same way. ``on_variant(name, record)`` after each variant judged here."""
    ctx.max_drop = rule.max_drop
    rows: dict[str, VariantRecord] = {}
    failed = {}
    for name in build_order(names):
        v = VARIANTS.get(name)
        if done and name in done and (ctx.out_dir / done[name].file).exists():
            rows[name], ctx.built[name] = done[name], ctx.out_dir / done[name].file
            continue
        if any(dep in failed for dep in v.needs):
            failed[name] = f"needs {', '.join(d for d in v.needs if d in failed)}, which failed"
            continue
        t0 = time.perf_counter()
        try:
            path = v.build(ctx)
        except Exception as exc:  # an INT8 candidate the quantizer cannot handle is a finding, not a crash
            if v.precision == "fp32":
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            continue
        ctx.built[name] = path
        rows[name] = VariantRecord(file=v.file, format=v.format, precision=v.precision, description=v.description,
                                   size_mb=round(model_size_bytes(path) / 2**20, 3),
                                   build_s=round(time.perf_counter() - t0, 2),
                                   **measure(path, fid, threads,
                                             len(ctx.metadata.labels) if ctx.metadata.other_label else None))
        if on_variant:
            on_variant(name, rows[name])
    for name, lat in interleaved_latency({n: ctx.built[n] for n in rows}, fid.images, runs, threads).items():
        rows[name].latency_ms = lat
    deployable, notes = select(rows, rule, fid.counts())
    notes += [f"{n}: failed to build ({why})" for n, why in failed.items()]
    return ExportRecord(rows, deployable, rule, failed, notes, fidelity_images=len(fid), fidelity_sources=fid.counts())


# why an INT8 variant may not ship: its fidelity, too few images to judge it, or too little speed
LOST, FEW, SLOW = "lost", "few", "slow"


def _ineligible(r: VariantRecord, rule: ShipRule, judged: int | None, speedup: float) -> tuple[str, str]:
    """(reason, why in words) an INT8 row may not ship under ``rule``, ("", "") when it may; sets ``drop_points``."""
    agreement = r.agreement if rule.judged_on in (None, "all") else (r.agreement_by_source or {}).get(rule.judged_on, 0.0)
    drop = 100 * (1 - agreement)
    r.drop_points = round(drop, 2) if rule.judged_on is not None else 0.0
    on = "" if rule.judged_on in (None, "all") else f" on the {rule.judged_on} images"
    cos = r.cosine if rule.cosine_on == "all" else (r.cosine_by_source or {}).get(rule.cosine_on, 0.0)
    if cos < rule.min_cosine:
        where = "" if rule.cosine_on == "all" else f" on the {rule.cosine_on} images"
        return LOST, f"keeps a logit cosine of {cos:.4f} with FP32{where} (min_cosine {rule.min_cosine})"
    if rule.judged_on is not None and drop > rule.max_drop:
        return LOST, f"loses {drop:.1f} points of top-1 agreement{on} (max_drop {rule.max_drop})"
    if rule.judged_on is not None and judged is not None and judged < rule.min_fidelity_images:
        return FEW, (f"judged on only {judged} images{on} the quantizers did not see "
                     f"(export.min_fidelity_images {rule.min_fidelity_images})")
    if speedup < rule.min_speedup:
        return SLOW, f"only {speedup:.2f}x faster than FP32 (min_speedup {rule.min_speedup})"
    return "", ""


def select(rows: dict[str, VariantRecord], rule: ShipRule, fidelity: dict[str, int] | None = None) -> tuple[str, list[str]]:
    """Mark the fastest variant that ``rule`` lets ship as deployable (``runtime.exports.ShipRule`` states the
    rule). ``fidelity``: the fidelity images per source. Every row gets a ``status`` saying why it was or was not
    picked; if no INT8 variant qualifies FP32 ships and the notes say so."""
    notes, ok = [], []
    fp32_p50 = min((r.latency_ms.p50 for r in rows.values() if r.precision == "fp32"), default=float("inf"))
    judged = None if fidelity is None else (sum(fidelity.values()) if rule.judged_on == "all" else fidelity.get(rule.judged_on, 0))
    reasons = {}
    for name, r in rows.items():
        reasons[name], r.status = ("", "") if r.precision == "fp32" else _ineligible(r, rule, judged, fp32_p50 / r.latency_ms.p50)
        if r.precision == "fp32" and rule.judged_on is not None:
            r.drop_points = round(100 * (1 - r.agreement), 2)
        if not reasons[name]:
            ok.append(name)
    best = min(ok, key=lambda n: rows[n].latency_ms.p50)
    p50 = rows[best].latency_ms.p50
    for name, r in rows.items():   # machine-readable: the runtime's fallbacks read this, never ``status``
        r.eligible = name in ok
        if name in ok:
            r.status = "deployable: the fastest the ship rule allows" if name == best else \
                f"slower: p50 {r.latency_ms.p50:.2f} ms vs {p50:.2f} ms"
    int8 = [n for n, r in rows.items() if r.precision == "int8"]
    if int8 and rows[best].precision == "fp32":
        notes.append(f"shipping FP32 ({best}): " + _why_fp32([reasons[n] for n in int8], rule, judged))
    notes += [f"{n}: {rows[n].status}: not deployable" for n in int8 if reasons[n] == LOST]
    return best, notes


def _why_fp32(reasons: list[str], rule: ShipRule, judged: int | None) -> str:
    if all(r == LOST for r in reasons):
        return "every INT8 variant lost more than the ship rule allows (max_drop, min_cosine)"
    if FEW in reasons:
        return (f"INT8 was judged on only {judged} images the quantizers did not see (export.min_fidelity_images "
                f"{rule.min_fidelity_images}: make a bigger bank or give --images)")
    return f"no INT8 variant the ship rule allows was {rule.min_speedup}x faster than FP32 on this CPU"
