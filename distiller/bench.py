"""`distiller bench`: latency, throughput and agreement of exported models on this machine.

numpy and the runtime only (the teacher baseline needs torch and is skipped without it), so it
runs on the edge device itself; ``select`` rewrites the run's deployable variant for that device.
"""
from __future__ import annotations

import dataclasses
import platform
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from exporter.variants import select
from runtime.atomic import atomic_path, write_json
from runtime.classifier import Classifier, model_size_bytes, onnx_session, physical_cores, read_export, read_report
from runtime.errors import UserError
from runtime.exports import ExportRecord, Latency
from runtime.preprocess import list_images, preprocess
from runtime.timing import latency_stats, timed

from .bank import Bank
from .runfolder import Run, RunPaths


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnxruntime", "openvino"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _size_mb(path: Path) -> float:
    return round(model_size_bytes(path) / 2**20, 3)


def val_images(run: Path, limit: int = 256) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The run's validation bank images (uint8 HWC) and the teacher's logits on them."""
    imgs, logits, _ = Bank(RunPaths(run).bank).load("val")
    return list(imgs[:limit]), logits[:limit]


def bench_models(models: dict[str, Path], images: list[np.ndarray], teacher_logits: np.ndarray | None = None,
                 threads: int | None = None, runs: int = 100, warmup: int = 10, batch: int = 32,
                 include_preprocess: bool = False, on_model=None) -> dict:
    """Measure each model; agreement is against the first FP32 model on identical inputs."""
    threads = threads or physical_cores()
    rows, reference = {}, None
    skipped = {}
    for name, path in models.items():
        try:
            clf = Classifier.load(path, threads=threads)
        except UserError as exc:  # e.g. OpenVINO files on a runtime-only install
            skipped[name] = str(exc)
            continue
        x = clf.preprocess(images)
        logits = np.concatenate([clf.logits(x[i:i + 64]) for i in range(0, len(x), 64)])
        if reference is None and clf.metadata.precision == "fp32":
            reference = logits
        one = x[:1]
        if include_preprocess:
            big = _photo_like(images[0], 224)
            lat = timed(lambda: clf.classify(big, top_k=1), runs, warmup)
        else:
            lat = timed(lambda: clf.logits(one), runs, warmup)
        xb = np.repeat(x, max(1, -(-batch // len(x))), axis=0)[:batch]
        tb = timed(lambda: clf.logits(xb), max(3, runs // 10), 2)
        rows[name] = {
            "file": str(path), "format": clf.backend, "precision": clf.metadata.precision, "size_mb": _size_mb(Path(path)),
            "latency_ms": latency_stats(lat), "throughput_ips": round(batch / (np.median(tb) / 1e3), 1), "batch": batch,
            "_logits": logits,
        }
        if on_model:
            on_model(name)
    for r in rows.values():
        lg = r.pop("_logits")
        r["agreement"] = float((lg.argmax(-1) == reference.argmax(-1)).mean()) if reference is not None else None
        r["teacher_agreement"] = float((lg.argmax(-1) == teacher_logits.argmax(-1)).mean()) if teacher_logits is not None else None
    return {"models": rows, "skipped": skipped, "threads": threads, "runs": runs, "warmup": warmup, "images": len(images),
            "include_preprocess": include_preprocess, "cpu": cpu_model(), "versions": versions()}


def _photo_like(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def bench_run(run: Path, threads=None, runs=100, warmup=10, batch=32, include_preprocess=False, on_model=None) -> dict:
    exp = read_export(run)
    models = {name: run / v.file for name, v in exp.variants.items()}
    images, teacher = val_images(run)
    return bench_models(models, images, teacher, threads, runs, warmup, batch, include_preprocess, on_model)


def classify_overhead(path: Path, image: np.ndarray, threads=None, runs=200, warmup=20) -> dict:
    """``classify`` on a 224 px image against a bare session run on the preprocessed tensor."""
    clf = Classifier.load(path, threads=threads)
    big = _photo_like(image, 224)
    x = preprocess(big, clf.metadata.preprocess)[None]
    bare = timed(lambda: clf.logits(x), runs, warmup)
    full = timed(lambda: clf.classify(big, top_k=1), runs, warmup)
    return {"bare_p50": float(np.median(bare)), "classify_p50": float(np.median(full)),
            "overhead": float(np.median(full) / np.median(bare) - 1)}


def select_for_device(run: Path, result: dict) -> dict:
    """Rewrite the run's report.json so ``deployable`` is the fastest variant within max_drop on
    this machine, using the latencies just measured (agreement stays as measured at export)."""
    path = RunPaths(run).report
    report = read_report(run)
    exp = ExportRecord.from_json(report["export"], str(path))
    measured = {name: r for name, r in exp.variants.items() if name in result["models"]}
    if not measured:
        raise UserError(f"{run}: no variant could be measured on this machine: install onnxruntime or openvino")
    for name, r in measured.items():
        lat = {**vars(r.latency_ms), **result["models"][name]["latency_ms"]}
        r.latency_ms = Latency(**{k: lat[k] for k in ("p50", "p90", "p99", "mean", "runs")})
    best, notes = select(measured, exp.rule, exp.fidelity_sources or
                         ({"all": exp.fidelity_images} if exp.fidelity_images is not None else None))
    for name, r in exp.variants.items():
        if name not in measured:
            r.status = f"not measured on this machine: {result.get('skipped', {}).get(name, 'not benched')}"
            r.eligible = False
    exp.deployable_variant, exp.notes = best, notes
    report["export"] = exp.to_json()
    report["deployable"] = exp.deployable
    report["selected_on"] = {"cpu": result["cpu"], "threads": result["threads"],
                             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, report)
    return report


def teacher_baseline(run: Path, threads=None, runs=30, warmup=3, input_size: int | None = None, keep: bool = True) -> dict | None:
    """The teacher's image tower exported to ONNX FP32 and timed like the students (needs torch).
    ``input_size`` (ImageNet teachers; 0: the network's own size) times it at another size than the run's.
    ``keep``: leave the ONNX file in the run folder for the next bench (a CLIP tower is hundreds of MB)."""
    try:
        import torch
    except ImportError:
        return None
    r = Run(run, device="cpu")
    if input_size is None:
        onnx_path = r.paths.teacher_onnx
        teacher = r.teacher()
    else:
        from .teachers import build_teacher  # torch: lazy, for the runtime-only install
        teacher = build_teacher(dataclasses.replace(r.recipe.teacher, input_size=input_size), r.concepts,
                                openset=r.recipe.openset)
        onnx_path = r.paths.teacher_onnx_at(teacher.input_size)
    created = not onnx_path.exists()
    if created:

        class Tower(torch.nn.Module):
            def __init__(self, t):
                super().__init__()
                self.t = t

            def forward(self, x):
                return self.t.logits(x)
        x = torch.zeros(1, 3, teacher.input_size, teacher.input_size)
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)   # the fused attention kernel has no ONNX export
        try:
            with warnings.catch_warnings(), atomic_path(onnx_path) as tmp:
                warnings.simplefilter("ignore")
                torch.onnx.export(Tower(teacher).eval(), (x,), str(tmp), dynamo=False, opset_version=17,
                                  input_names=["images"], output_names=["logits"])
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
    sess = onnx_session(onnx_path, threads)
    x = np.random.default_rng(0).random((1, 3, teacher.input_size, teacher.input_size), dtype=np.float32)
    lat = timed(lambda: sess.run(None, {"images": x}), runs, warmup)
    size = _size_mb(onnx_path)
    if created and not keep:
        del sess
        onnx_path.unlink()
    return {"file": str(onnx_path), "model": r.recipe.teacher.model, "input_size": teacher.input_size, "size_mb": size,
            "latency_ms": latency_stats(lat)}


def end_to_end(model: Path, folder: Path, threads=None, batch: int = 32, workers: int | None = None) -> dict:
    """Images per second of ``classify_iter`` over every image under ``folder`` (decode, resize, model:
    what an app sees), beside the model alone on the same preprocessed batch size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--e2e {folder}: not a folder of images")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"--e2e {folder}: no images in it (jpg, png, webp, bmp, tiff, gif)")
    clf = Classifier.load(model, threads=threads)
    workers = workers or min(4, physical_cores())
    list(clf.classify_iter(paths[:batch], top_k=1, batch_size=batch, workers=workers, errors="return"))   # warm-up
    t0 = time.perf_counter()
    results = list(clf.classify_iter(paths, top_k=1, batch_size=batch, workers=workers, errors="return"))
    seconds = time.perf_counter() - t0
    skipped = sum(isinstance(r, UserError) for r in results)
    x = next((clf.prepare(p)[None] for p, r in zip(paths, results) if not isinstance(r, UserError)), None)
    if x is None:
        raise UserError(f"--e2e {folder}: none of its images could be read")
    xb = np.repeat(x, batch, axis=0)
    model_s = float(np.median(timed(lambda: clf.logits(xb), 5, 1))) / 1e3
    return {"folder": str(folder), "model": str(clf.path), "images": len(paths), "skipped": skipped, "batch": batch,
            "workers": workers, "e2e_ips": len(paths) / seconds, "ms_per_image": 1e3 * seconds / len(paths),
            "model_ips": batch / model_s}
