"""Export variants registered by name, measured on this machine, and the deployable pick.

Each variant builds one file from the ones it needs; ``export_all`` builds the recipe's list,
measures each with the runtime itself (top-1 agreement and logit cosine against the PyTorch
student on the same input tensors, agreement with the teacher, batch-1 latency) and marks the
fastest variant that loses at most ``max_drop`` points of agreement as deployable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.classifier import Classifier, model_size_bytes
from runtime.exports import ExportRecord, Latency, VariantRecord
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


def latency_ms(clf: Classifier, sample: np.ndarray, runs: int, warmup: int = 5) -> dict:
    x = sample[:1]
    return latency_stats(timed(lambda: clf.logits(x), runs, warmup))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between logit vectors."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float((num / den).mean())


def measure(path: Path, val: np.ndarray, reference: np.ndarray, teacher: np.ndarray, runs: int, threads: int | None,
            concepts: int | None = None) -> dict:
    """Fidelity against the FP32 reference, agreement with the teacher, latency. ``concepts``: an open-set
    model's K; then agreement is the lower of the K + 1 decision's and the concepts' own ranking's, so a
    variant that keeps "other" but scrambles the concepts (a fidelity set the model calls other) fails."""
    clf = Classifier.load(path, threads=threads)
    out = np.concatenate([clf.logits(val[i:i + 64]) for i in range(0, len(val), 64)])
    known = ~np.isnan(teacher).any(-1)   # rows without teacher logits (train images) only check fidelity
    full = float((out.argmax(-1) == reference.argmax(-1)).mean())
    extra = {}
    if concepts is not None and out.shape[-1] > concepts:
        inner = float((out[:, :concepts].argmax(-1) == reference[:, :concepts].argmax(-1)).mean())
        extra = {"agreement_open_set": full, "agreement_concepts": inner}
        full = min(full, inner)
    return {
        **extra,
        "agreement": full,
        "cosine": cosine(out, reference),
        "max_abs_diff": float(np.abs(out - reference).max()),
        "teacher_agreement": float((out[known].argmax(-1) == teacher[known].argmax(-1)).mean()) if known.any() else None,
        "latency_ms": Latency(**latency_ms(clf, val, runs)),
        "backend": clf.backend,
    }


def export_all(ctx: ExportContext, names, val: np.ndarray, reference: np.ndarray, teacher: np.ndarray,
               max_drop: float, runs: int = 50, threads: int | None = None, on_variant=None,
               min_speedup: float = 1.0, min_fidelity_images: int = 0) -> ExportRecord:
    """Build, measure and rank the variants; returns the export record (report.json's ``export``)."""
    ctx.max_drop = max_drop
    rows: dict[str, VariantRecord] = {}
    failed = {}
    for name in build_order(names):
        v = VARIANTS.get(name)
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
                                   **measure(path, val, reference, teacher, runs, threads,
                                             len(ctx.metadata.labels) if ctx.metadata.other_label else None))
        if on_variant:
            on_variant(name, rows[name])
    deployable, notes = select(rows, max_drop, min_speedup, len(val), min_fidelity_images)
    notes += [f"{n}: failed to build ({why})" for n, why in failed.items()]
    return ExportRecord(rows, deployable, max_drop, min_speedup, min_fidelity_images, failed, notes)


def select(rows: dict[str, VariantRecord], max_drop: float, min_speedup: float = 1.0, fidelity_images: int | None = None,
           min_fidelity_images: int = 0) -> tuple[str, list[str]]:
    """Mark the fastest variant within ``max_drop`` points of agreement as deployable.

    INT8 ships only when its agreement was measured on at least ``min_fidelity_images`` images (one
    disagreement in 8 is 12.5 points: a perfect score on a handful of images says little).

    An INT8 variant replaces FP32 only when it is at least ``min_speedup`` times faster than the
    fastest FP32 variant: a lossy model is not worth a few percent. Every row gets a ``status``
    saying why it was or was not picked; if no INT8 variant qualifies FP32 ships and the notes say so.
    """
    notes, ok = [], []
    fp32 = [n for n, r in rows.items() if r.precision == "fp32"]
    fp32_p50 = min((rows[n].latency_ms.p50 for n in fp32), default=float("inf"))
    for name, r in rows.items():
        drop = 100 * (1 - r.agreement)
        r.drop_points = round(drop, 2)
        speedup = fp32_p50 / r.latency_ms.p50
        if r.precision == "fp32":
            ok.append(name)
        elif drop > max_drop:
            r.status = f"loses {drop:.1f} points of top-1 agreement (max_drop {max_drop})"
        elif fidelity_images is not None and fidelity_images < min_fidelity_images:
            r.status = (f"judged on only {fidelity_images} images the quantizers did not see "
                        f"(export.min_fidelity_images {min_fidelity_images})")
        elif speedup < min_speedup:
            r.status = f"only {speedup:.2f}x faster than FP32 (min_speedup {min_speedup})"
        else:
            ok.append(name)
    best = min(ok, key=lambda n: rows[n].latency_ms.p50)
    p50 = rows[best].latency_ms.p50
    for name, r in rows.items():   # machine-readable: the runtime's fallbacks read this, never ``status``
        r.eligible = name in ok
    for name in ok:
        r = rows[name]
        r.status = "deployable: fastest within max_drop" if name == best else \
            f"slower: p50 {r.latency_ms.p50:.2f} ms vs {p50:.2f} ms"
    int8 = [n for n, r in rows.items() if r.precision == "int8"]
    if int8 and rows[best].precision == "fp32":
        lost = [n for n in int8 if rows[n].drop_points > max_drop]
        why = ("every INT8 variant lost more than max_drop" if len(lost) == len(int8) else
               f"INT8 was judged on only {fidelity_images} bank images the quantizers did not see (export."
               f"min_fidelity_images {min_fidelity_images}: make a bigger bank or give --images)"
               if fidelity_images is not None and fidelity_images < min_fidelity_images else
               f"no INT8 variant within max_drop was {min_speedup}x faster than FP32 on this CPU")
        notes.append(f"shipping FP32 ({best}): {why}")
    for n in int8:
        if rows[n].drop_points > max_drop:
            notes.append(f"{n}: {rows[n].status}: not deployable")
    return best, notes
