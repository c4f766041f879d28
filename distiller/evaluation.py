"""Accuracy on real labelled images: one ImageFolder loader and one scorer for every command.

Layouts: ``DIR/<label>/*`` or ``DIR/<domain>/<label>/*``. Folder names match labels exactly,
case-insensitively, by singular/plural, or through a labels map (``folder=label`` lines or a
JSON object; ``folder=-`` skips a folder). Results per domain: n, accuracy and class-balanced
accuracy, each with a Wilson 95% interval. numpy only: works with the runtime-only install.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from runtime import Classifier
from runtime.atomic import write_json
from runtime.classifier import backend_for, installed, read_export
from runtime.errors import UserError
from runtime.openset import OpenSetRule, with_other_bias
from runtime.preprocess import list_images, preprocess

from .examples import example_hashes
from .images import read_image_set
from .openset import rejection
from .recipe import default_recipe
from .runfolder import Run, RunPaths
from .stats import wilson

SKIP = "-"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    domain: str


@dataclass
class Dataset:
    root: Path
    labels: list[str]
    samples: list[Sample]
    skipped_folders: list[str] = field(default_factory=list)

    @property
    def domains(self) -> list[str]:
        return sorted({s.domain for s in self.samples})


def read_labels_map(path: str | Path | None) -> dict[str, str]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"labels map {p} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise UserError(f"labels map {p}: line {line!r} is not folder=label")
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _variants(word: str) -> set[str]:
    w = word.lower().strip()
    out = {w}
    if w.endswith("s"):
        out.add(w[:-1])
    else:
        out.add(w + "s")
    return out


def match_folder(name: str, labels: list[str], labels_map: dict[str, str]) -> int | None | str:
    """Label index for a folder name, None when nothing matches, SKIP when the map says so."""
    if name in labels_map:
        target = labels_map[name]
        if target == SKIP:
            return SKIP
        if target not in labels:
            raise UserError(f"labels map sends {name!r} to {target!r}, which is not a label of the model ({', '.join(labels)})")
        return labels.index(target)
    if name in labels:
        return labels.index(name)
    for i, lab in enumerate(labels):
        if _variants(name) & _variants(lab):
            return i
    return None


def load_image_folder(root: str | Path, labels: list[str], labels_map: dict[str, str] | None = None) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root} is not a folder: pass an ImageFolder tree (DIR/label/* or DIR/domain/label/*)")
    labels_map = labels_map or {}
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    matched = {p.name: match_folder(p.name, labels, labels_map) for p in tops}
    flat = any(isinstance(v, int) for v in matched.values())
    samples, skipped = [], []

    def add(folder: Path, label: int | None | str, domain: str):
        if label is None or label == SKIP:
            skipped.append(str(folder.relative_to(root)))
            return
        samples.extend(Sample(p, label, domain) for p in list_images(folder))

    if flat:
        for p in tops:
            add(p, matched[p.name], "all")
    else:
        for dom in tops:
            for p in sorted(q for q in dom.iterdir() if q.is_dir() and not q.name.startswith(".")):
                add(p, match_folder(p.name, labels, labels_map), dom.name)
    if not samples:
        hint = f"folders {', '.join(skipped[:6])} match no label ({', '.join(labels)})" if skipped else "no images found"
        raise UserError(f"--data {root}: {hint}: name folders after the labels or pass --labels-map FILE (folder=label)")
    return Dataset(root, list(labels), samples, skipped)


def score(pred: np.ndarray, truth: np.ndarray, domains: list[str]) -> list[dict]:
    """Per domain (and 'all' when there are several): n, accuracy, balanced accuracy, intervals."""
    doms = np.asarray(domains)
    names = sorted(set(domains))
    rows = []
    for d in names + (["all"] if len(names) > 1 else []):
        m = np.ones(len(pred), bool) if d == "all" else doms == d
        p, t = pred[m], truth[m]
        n = int(m.sum())
        correct = int((p == t).sum())
        per_class = {int(c): (int((p[t == c] == c).sum()), int((t == c).sum())) for c in np.unique(t)}
        recalls = [hit / total for hit, total in per_class.values()]
        bal = float(np.mean(recalls)) if recalls else 0.0
        rows.append({"domain": d, "n": n, "classes": len(recalls), "accuracy": correct / max(n, 1),
                     "accuracy_ci": wilson(correct, n), "balanced_accuracy": bal, "balanced_ci": wilson(bal * n, n),
                     "per_class": {str(c): {"recall": hit / total, "n": total, "ci": wilson(hit, total)}
                                   for c, (hit, total) in per_class.items()}})
    return rows


def evaluate(predict: Callable[[list[Path]], np.ndarray], data: Dataset, batch_size: int = 32,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Score ``predict`` (paths -> logits [N, K]; a row of NaN for an unreadable image) on ``data``."""
    preds, kept, unreadable = [], [], []
    for i in range(0, len(data.samples), batch_size):
        chunk = data.samples[i:i + batch_size]
        logits = predict([s.path for s in chunk])
        for s, row in zip(chunk, logits):
            if np.isnan(row).any():
                unreadable.append(str(s.path))
            else:
                preds.append(int(np.argmax(row)))
                kept.append(s)
        if on_batch:
            on_batch(len(chunk))
    if not kept:
        raise UserError(f"--data {data.root}: none of the images could be read")
    rows = score(np.array(preds), np.array([s.label for s in kept]), [s.domain for s in kept])
    return {"rows": rows, "unreadable": unreadable, "skipped_folders": data.skipped_folders}


def batch_predictor(prepare: Callable[[Path], np.ndarray], run: Callable[[np.ndarray], np.ndarray],
                    num_classes: int) -> Callable[[list[Path]], np.ndarray]:
    """paths -> logits [N, K]: ``prepare`` each image (CHW array), ``run`` the stack; an image that
    cannot be read (UserError) gives a row of NaN, which ``evaluate`` counts as unreadable."""
    def predict(paths):
        out = np.full((len(paths), num_classes), np.nan, dtype=np.float32)
        arrays, idx = [], []
        for i, p in enumerate(paths):
            try:
                arrays.append(prepare(p))
                idx.append(i)
            except UserError:
                pass
        if arrays:
            out[idx] = run(np.stack(arrays))
        return out
    return predict


def runtime_predictor(clf) -> Callable[[list[Path]], np.ndarray]:
    """A runtime Classifier as a paths -> logits function."""
    def decisions(x: np.ndarray) -> np.ndarray:   # one-hot answers: the argmax is what classify() answers
        out = np.zeros((len(x), clf.metadata.outputs), np.float32)
        out[np.arange(len(x)), clf.decide(clf.logits(x))] = 1.0
        return out
    return batch_predictor(lambda p: clf.preprocess([p])[0], decisions, clf.metadata.outputs)


def teacher_predictor(teacher, device="cpu") -> Callable[[list[Path]], np.ndarray]:
    """The torch teacher as a paths -> logits function, with its own eval preprocessing."""
    import torch

    pre = teacher.eval_preprocess()   # ends in [0, 1]: the teacher normalises itself

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return teacher.logits(torch.from_numpy(x).to(device)).float().cpu().numpy()
    return batch_predictor(lambda p: preprocess(p, pre), run, teacher.outputs)


FREE_BASELINE = ("efficientnet-lite0", 128)   # the smallest offline ImageNet net, at the cpu student's size


def baseline_predictor(concepts, device="cpu", openset=False) -> Callable[[list[Path]], np.ndarray]:
    """The free baseline: EfficientNet-Lite0's own ImageNet head restricted to the concepts (logsumexp
    over each concept's member classes; with ``openset``, "other" over every other class) at 128 px. No
    synthesis, no training: what a student must beat."""
    from .teachers import build_teacher  # torch: lazy, for the runtime-only install
    model, size = FREE_BASELINE
    cfg = dataclasses.replace(default_recipe().teacher, model=model, input_size=size)
    return teacher_predictor(build_teacher(cfg, concepts, device, openset=openset), device)


def run_variants(run: Path) -> tuple[list[Path], list[str]]:
    """Every exported model file of a finished run that an installed backend can run, and notes on
    the ones skipped (a runtime-only install has ONNX Runtime, not OpenVINO)."""
    files, notes = [], []
    for v in read_export(run).variants.values():
        b = backend_for(v.file)
        if b is not None and installed(b.name):
            files.append(run / v.file)
        else:
            notes.append(f"{v.file} not scored: {b.name if b else 'its backend'} is not installed")
    if not files:
        raise UserError(f"{run}: none of its models can run with the installed backends: pip install onnxruntime")
    return files, notes


def evaluate_models(path: Path, data: Path, labels_map: dict[str, str] | None = None, teacher: bool = True,
                    baseline: bool = True, offline: bool = False, other_data: Path | None = None) -> tuple[Dataset, dict, list[str]]:
    """Score a model file, or every variant of a run folder plus (train install) its teacher and the
    free baseline, on an ImageFolder tree. Returns (dataset, {name: evaluate(...)}, notes)."""
    path = Path(path)
    files, notes = run_variants(path) if path.is_dir() else ([path], [])
    clfs = {str(f.relative_to(path) if path.is_dir() else f): Classifier.load(f, exact=True) for f in files}
    dataset = load_image_folder(data, next(iter(clfs.values())).labels, labels_map)
    results = {name: evaluate(runtime_predictor(c), dataset) for name, c in clfs.items()}
    others = other_images(other_data)
    k = len(dataset.labels)
    for name, c in clfs.items():
        if others is not None:
            logits = batch_predictor(lambda p, c=c: c.preprocess([p])[0], c.logits, c.metadata.outputs)
            results[name]["open_set"] = _rejection(logits, c.scores, lambda z, c=c: c.decide(z, open_set=True), dataset,
                                                   others, k, c.rule)
    if not path.is_dir() or not (teacher or baseline):
        return dataset, results, notes
    try:
        import torch  # noqa: F401
    except ImportError:
        return dataset, results, ["teacher and free baseline not scored: torch is not installed (runtime-only install)"]
    run = Run(path, device="cpu", offline=offline)
    bias = run.recipe.other_bias if run.recipe.openset else 0.0

    def read(z):   # the teacher and the free baseline are read with the shipped model's other_bias
        return with_other_bias(z, k, bias)

    def argmax(z):
        return read(z).argmax(1)

    def biased(pred):
        return lambda paths: read(pred(paths))
    if teacher:
        pred = teacher_predictor(run.teacher(), run.device)
        results["teacher"] = evaluate(biased(pred), dataset)
        if others is not None:
            results["teacher"]["open_set"] = _rejection(pred, read, argmax, dataset, others, k, TEACHER_RULE)
    if baseline:
        try:
            pred = baseline_predictor(run.concepts, openset=run.recipe.openset)
        except UserError as exc:
            notes.append(f"free baseline not scored: {exc}")
        else:
            name = f"free baseline ({FREE_BASELINE[0]} head @ {FREE_BASELINE[1]}px)"
            results[name] = evaluate(biased(pred), dataset)
            if others is not None:
                results[name]["open_set"] = _rejection(pred, read, argmax, dataset, others, k, TEACHER_RULE)
    return dataset, results, notes


def other_images(folder: Path | None) -> list[Path] | None:
    """``--other-data``: every image under the folder (its folder names are not read)."""
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise UserError(f"--other-data {folder}: no such folder: pass a folder of images of none of the classes")
    paths = list_images(Path(folder))
    if not paths:
        raise UserError(f"--other-data {folder}: no images in it: pass a folder of images of none of the classes")
    return paths


def readable_outputs(logits_of, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``logits_of`` (paths -> raw outputs, a NaN row for an image that cannot be read) over ``paths``, 32 at a
    time: the readable images' outputs, and which images those are."""
    z = np.concatenate([logits_of(paths[i:i + 32]) for i in range(0, len(paths), 32)])
    readable = ~np.isnan(z).any(1)
    return z[readable], readable


TEACHER_RULE = OpenSetRule("margin", 0.0)   # the teacher's and the free baseline's own: the other output wins


def _rejection(logits_of, read, decide, dataset: Dataset, others: list[Path], k: int, rule: OpenSetRule) -> dict:
    """Known-vs-other scores of one model: ``logits_of`` paths -> raw outputs, ``read`` raw outputs -> the
    outputs its rule reads (other_bias applied), ``decide`` raw outputs -> answers (the open-set answer, on or not
    by default), ``rule`` the score ranked for the AUROC."""
    known = readable_outputs(logits_of, [s.path for s in dataset.samples])[0]
    other = readable_outputs(logits_of, others)[0]
    return rejection(read(known), read(other), decide(other) if len(other) else np.zeros(0, int), k, rule)


def training_overlap(run: Path, dataset: Dataset) -> list[str]:
    """The scored images that the run trained on (its ``--images`` and its concepts' example images, by content
    hash): a score on them is not an accuracy. Empty for model files and runs without either."""
    if not Path(run).is_dir():
        return []
    images = read_image_set(RunPaths(run).images)
    seen = (images.hashes() if images is not None else set()) | set(example_hashes(run))
    if not seen:
        return []
    return [str(s.path) for s in dataset.samples if hashlib.sha256(s.path.read_bytes()).hexdigest() in seen]


def content_hash(dataset: Dataset) -> str:
    """sha256 over every scored file's relative path and bytes: which images an eval saw, exactly."""
    h = hashlib.sha256()
    for sample in sorted(dataset.samples, key=lambda x: str(x.path)):
        h.update(str(sample.path.relative_to(dataset.root)).encode() + b"\0")
        h.update(hashlib.sha256(sample.path.read_bytes()).digest())
    return h.hexdigest()


def save_eval(run: Path, dataset: Dataset, results: dict, notes: list[str], overlap: list[str] = (),
              fits: dict | None = None) -> Path:
    """``eval.json`` in the run folder (read by ``distiller report``): the data folder, its content hash,
    the labels and every model's per-domain, per-class scores. A later eval on other data replaces it."""
    path = RunPaths(run).eval
    write_json(path, {"data": str(Path(dataset.root).resolve()), "content_hash": content_hash(dataset),
                      "images": len(dataset.samples), "labels": dataset.labels, "domains": dataset.domains,
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results,
                      "notes": notes, "training_overlap": len(overlap), "open_set_fit": fits or {}})
    return path
