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

from distiller.registry import Registry
from runtime.classifier import Classifier
from runtime.metadata import ModelMetadata

from . import quantize
from .onnx_export import export_onnx


@dataclass
class ExportContext:
    out_dir: Path
    model: object                      # torch student, eval mode
    metadata: ModelMetadata
    calibration: np.ndarray            # preprocessed train images, NCHW float32
    opset: int = 17
    built: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    file: str
    format: str
    precision: str
    needs: tuple[str, ...]
    build: Callable[[ExportContext], Path]


VARIANTS: Registry[Variant] = Registry("export variant")


def _meta(ctx, precision, fmt):
    return ctx.metadata.replace(precision=precision, extra={**ctx.metadata.extra, "format": fmt})


VARIANTS.register("onnx-fp32", Variant("student.onnx", "onnx", "fp32", (), lambda c: export_onnx(
    c.model, c.metadata.preprocess.size, c.out_dir / "student.onnx", _meta(c, "fp32", "onnx"), c.opset)))
VARIANTS.register("onnx-int8", Variant("student.int8.onnx", "onnx", "int8", ("onnx-fp32",), lambda c: quantize.quantize_onnx(
    c.built["onnx-fp32"], c.out_dir / "student.int8.onnx", c.calibration, _meta(c, "int8", "onnx"))))
VARIANTS.register("onnx-int8-perchannel", Variant("student.int8pc.onnx", "onnx", "int8", ("onnx-fp32",), lambda c: quantize.quantize_onnx(
    c.built["onnx-fp32"], c.out_dir / "student.int8pc.onnx", c.calibration, _meta(c, "int8", "onnx"), per_channel=True)))
VARIANTS.register("openvino-fp32", Variant("openvino/student.xml", "openvino", "fp32", ("onnx-fp32",), lambda c: quantize.onnx_to_openvino(
    c.built["onnx-fp32"], c.out_dir / "openvino" / "student.xml", _meta(c, "fp32", "openvino"))))
VARIANTS.register("openvino-int8", Variant("openvino/student.int8.xml", "openvino", "int8", ("openvino-fp32",), lambda c: quantize.quantize_openvino(
    c.built["openvino-fp32"], c.out_dir / "openvino" / "student.int8.xml", c.calibration, _meta(c, "int8", "openvino"))))


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
    for _ in range(warmup):
        clf.logits(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        clf.logits(x)
        times.append((time.perf_counter() - t) * 1e3)
    t = np.array(times)
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99)), "runs": runs}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between logit vectors."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float((num / den).mean())


def measure(path: Path, val: np.ndarray, reference: np.ndarray, teacher: np.ndarray, runs: int, threads: int | None) -> dict:
    clf = Classifier.load(path, threads=threads)
    out = np.concatenate([clf.logits(val[i:i + 64]) for i in range(0, len(val), 64)])
    return {
        "agreement": float((out.argmax(-1) == reference.argmax(-1)).mean()),
        "cosine": cosine(out, reference),
        "max_abs_diff": float(np.abs(out - reference).max()),
        "teacher_agreement": float((out.argmax(-1) == teacher.argmax(-1)).mean()),
        "latency_ms": latency_ms(clf, val, runs),
        "backend": clf.backend,
    }


def export_all(ctx: ExportContext, names, val: np.ndarray, reference: np.ndarray, teacher: np.ndarray,
               max_drop: float, runs: int = 50, threads: int | None = None, on_variant=None) -> dict:
    """Build, measure and rank the variants; returns the export part of report.json."""
    rows = {}
    for name in build_order(names):
        v = VARIANTS.get(name)
        t0 = time.perf_counter()
        path = v.build(ctx)
        ctx.built[name] = path
        row = {"file": v.file, "format": v.format, "precision": v.precision,
               "size_mb": round(_size(path) / 2**20, 3), "build_s": round(time.perf_counter() - t0, 2)}
        row.update(measure(path, val, reference, teacher, runs, threads))
        rows[name] = row
        if on_variant:
            on_variant(name, row)
    deployable, notes = select(rows, max_drop)
    return {"variants": rows, "deployable": rows[deployable]["file"], "deployable_variant": deployable,
            "max_drop": max_drop, "notes": notes}


def select(rows: dict, max_drop: float) -> tuple[str, list[str]]:
    """Fastest variant within ``max_drop`` points of agreement; FP32 ONNX is always eligible."""
    notes, ok = [], []
    for name, r in rows.items():
        drop = 100 * (1 - r["agreement"])
        if drop <= max_drop:
            ok.append(name)
        else:
            notes.append(f"{name} loses {drop:.1f} points of top-1 agreement with FP32 (max_drop {max_drop}): not deployable")
    if not ok:
        ok = [n for n, r in rows.items() if r["precision"] == "fp32"] or list(rows)
    best = min(ok, key=lambda n: rows[n]["latency_ms"]["p50"])
    if rows[best]["precision"] == "fp32" and any(r["precision"] == "int8" for r in rows.values()):
        notes.append(f"shipping FP32 ({best}): no INT8 variant was both within max_drop and faster on this CPU")
    return best, notes


def _size(path: Path) -> int:
    path = Path(path)
    if path.suffix == ".xml":
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return path.stat().st_size
