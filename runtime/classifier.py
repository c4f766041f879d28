"""``Classifier``: load an exported model and classify images. numpy, Pillow, onnxruntime/openvino."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import UserError
from .exports import ExportRecord
from .metadata import METADATA_KEY, ModelMetadata
from .openset import OpenSetRule, softmax, with_other_bias
from .preprocess import ImageLike, load_image, preprocess
from .registry import Registry

REPORT_FILE = "report.json"


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help these models)."""
    try:
        pairs = set()
        block: dict[str, str] = {}
        with open("/proc/cpuinfo") as f:
            for line in f.read().splitlines() + [""]:
                if not line.strip():
                    if "processor" in block:
                        pairs.add((block.get("physical id"), block.get("core id", block["processor"])))
                    block = {}
                elif ":" in line:
                    k, v = line.split(":", 1)
                    block[k.strip()] = v.strip()
        cores = len(pairs)
    except OSError:
        cores = 0
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores or available, available))


@dataclass(frozen=True)
class Backend:
    name: str
    suffixes: tuple[str, ...]
    open: Callable  # (path, threads) -> (run(batch)->logits, metadata_json or None)


BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(name: str, suffixes: tuple[str, ...]):
    def deco(fn):
        BACKENDS.register(name, Backend(name, suffixes, fn))
        return fn
    return deco


def backends() -> list[str]:
    return BACKENDS.names()


def model_size_bytes(path: Path) -> int:
    """On-disk size of a model: an OpenVINO .xml counts with its .bin."""
    path = Path(path)
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def verbose() -> bool:
    """Whether third-party tools may talk (``distiller ... --verbose`` sets DISTILLER_VERBOSE=1)."""
    return os.environ.get("DISTILLER_VERBOSE", "") not in ("", "0")


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads = {threads!r}: use a whole number >= 1, or leave it out for one per physical core")


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with our defaults: no thread spinning, one thread per physical core."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not verbose():   # graph-optimiser chatter ("Removing initializer ...") is not the user's business
        opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise UserError(f"{path}: onnxruntime cannot load it ({_first_line(exc)}): re-export it") from None


@register_backend("onnxruntime", (".onnx",))
def _open_onnxruntime(path: Path, threads: int | None):
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    meta = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return (lambda batch: sess.run(None, {name: batch})[0]), meta


OV_CACHE_MB = 200   # OpenVINO's compiled-model cache is pruned to this size, least recently used first


def ov_cache_dir() -> Path | None:
    """Where OpenVINO keeps compiled models (first loads then take milliseconds): ``DISTILLER_OV_CACHE``, else
    ``~/.cache/distiller/openvino``; ``DISTILLER_OV_CACHE=off`` (or empty) disables it."""
    value = os.environ.get("DISTILLER_OV_CACHE")
    if value is not None and value.strip().lower() in ("", "off", "0", "none"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "distiller" / "openvino"


def prune_cache(folder: Path, max_bytes: int) -> None:
    """Delete the least recently used files of ``folder`` until it holds at most ``max_bytes``."""
    files = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            files.append((max(st.st_atime, st.st_mtime), st.st_size, p))
    total = sum(f[1] for f in files)
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size


@register_backend("openvino", (".xml",))
def _open_openvino(path: Path, threads: int | None):
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed: pip install 'distiller[openvino]' or use the .onnx file") from None
    core = ov.Core()
    cache = ov_cache_dir()
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            prune_cache(cache, OV_CACHE_MB * 2**20)
            core.set_property({"CACHE_DIR": str(cache)})
        except OSError:
            pass
    if not path.with_suffix(".bin").is_file():
        raise UserError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing: copy the .xml and .bin together")
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise UserError(f"{path}: OpenVINO cannot read it ({_first_line(exc)}): re-export it or copy the .xml and .bin "
                        "again") from None
    meta = None
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        meta = sidecar.read_text()
    elif model.has_rt_info([METADATA_KEY]):
        meta = model.get_rt_info([METADATA_KEY]).astype(str)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or physical_cores())}
    if meta is not None and ModelMetadata.from_json(meta, source=str(path)).precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"  # CPUs with bf16 would otherwise run FP32 models in bf16
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise UserError(f"{path}: OpenVINO cannot compile it ({_first_line(exc)}): re-export it") from None
    lock = threading.Lock()
    local = threading.local()

    def run(batch):
        req = getattr(local, "req", None)
        if req is None:
            with lock:
                req = local.req = compiled.create_infer_request()
        return req.infer({0: batch})[0].copy()

    return run, meta


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's text, cut at a word, for one-line errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def installed(backend: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(backend) is not None


def read_report(run: str | os.PathLike) -> dict:
    """A run folder's report.json, which names its deployable model and every variant measured."""
    report = Path(run) / REPORT_FILE
    if not report.is_file():
        raise UserError(f"{run}: a folder was given but it has no {REPORT_FILE}: pass a model file or a finished run folder")
    try:
        data = json.loads(report.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("export", {}).get("variants", {}), dict):
            raise ValueError("not a report object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{report} is damaged ({type(exc).__name__}): run `distiller export {run}` to write it again, "
                        "or pass a model file") from None
    return data


def read_export(run: str | os.PathLike) -> ExportRecord:
    """A finished run folder's export record (every variant measured, the deployable pick), as report.json holds it."""
    return ExportRecord.from_json(read_report(run).get("export", {}), str(Path(run) / REPORT_FILE))


def backend_for(path: str | os.PathLike) -> Backend | None:
    """The registered backend that reads this file, by suffix."""
    return next((b for _, b in BACKENDS.items() if Path(path).suffix.lower() in b.suffixes), None)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: use auto, {', '.join(BACKENDS.names())}")


def inside(run: Path, name: str) -> Path:
    """The model file ``name`` a run folder's report names, which must lie inside that folder (no ``..``, no absolute
    path, no symlink pointing out): a run folder is data, and its report may not send the runtime elsewhere."""
    root = Path(run).resolve()
    target = (Path(run) / str(name)).resolve()
    if Path(str(name)).is_absolute() or not target.is_relative_to(root):
        raise UserError(f"{Path(run) / REPORT_FILE} names a model outside the run folder: {name!r}: re-export the "
                        f"run (`distiller export {run}`) or pass a model file")
    return target


def resolve_model_path(path: str | os.PathLike, backend: str = "auto") -> Path:
    """A model file, or a run folder: its deployable file, or where that file's backend is not
    installed (or another backend is asked for), the fastest other eligible variant (the exporter
    marks each variant ``eligible`` when it is within max_drop and fast enough)."""
    check_backend(backend)
    p = Path(path)
    if p.is_dir():
        rep = read_report(p)
        if not rep.get("deployable"):
            raise UserError(f"{p / REPORT_FILE}: names no deployable model: run `distiller export {p}`")
        eligible = ExportRecord.from_json(rep["export"], str(p / REPORT_FILE)).eligible_by_speed() if "export" in rep else []
        files = [rep["deployable"]] + [r.file for r in eligible if r.file != rep["deployable"]]
        for f in files:
            inside(p, f)
        usable = []
        for f in files:
            b = backend_for(f)
            if b is not None and (b.name == backend if backend != "auto" else installed(b.name)):
                usable.append(f)
        if not usable:
            raise UserError(f"{p}: none of its models can run with {backend if backend != 'auto' else 'the installed backends'}: "
                            f"pip install onnxruntime (or openvino)")
        p = p / usable[0]
    if not p.exists():
        raise UserError(f"{p}: no such model file")
    return p


class Classifier:
    """An exported distiller model, ready to classify images.

    >>> clf = Classifier.load("runs/cats-dogs")          # run folder: the deployable variant
    >>> clf.classify("cat.jpg", top_k=2)                 # [("cats", 0.93), ("dogs", 0.07)]
    >>> for result in clf.classify_iter(paths): ...      # streamed, decoded on threads, in input order

    Images are paths, encoded bytes, PIL images or numpy arrays (``channels="bgr"`` for OpenCV
    frames). Preprocessing takes the fast path (JPEG draft decoding, reducing gap) unless the model
    is loaded with ``exact=True``, which reproduces the torchvision eval transform to the bit.
    One Classifier may be shared by threads.
    """

    def __init__(self, run: Callable, metadata: ModelMetadata, path: Path, backend: str, exact: bool = False):
        self._run = run
        self.metadata = metadata
        self.labels = list(metadata.labels)
        self.other_label = metadata.other_label or None    # open-set models answer it for "none of these"
        self.rule: OpenSetRule = metadata.open_set          # when they do (runtime.openset)
        self.other_bias = float(metadata.other_bias)
        self.path = path
        self.backend = backend
        self.exact = exact

    @classmethod
    def load(cls, path, backend: str = "auto", threads: int | None = None, exact: bool = False,
             other_threshold: float | None = None) -> "Classifier":
        """``other_threshold``: an open-set model's threshold, set by the app (on the score its rule names,
        ``clf.rule.score``); it also turns the open-set answer on by default."""
        check_threads(threads)
        p = resolve_model_path(path, backend)
        if backend == "auto":
            chosen = backend_for(p)
            if chosen is None:
                raise UserError(f"{p}: unknown model format {p.suffix!r}: pass an .onnx or OpenVINO .xml file")
        else:
            chosen = BACKENDS.get(backend)
            if p.suffix.lower() not in chosen.suffixes:
                raise UserError(f"{p}: the {backend} backend reads {', '.join(chosen.suffixes)} files")
        run, meta = chosen.open(p, threads)
        if meta is None:
            raise UserError(f"{p}: has no distiller metadata (labels, preprocessing): export it with distiller")
        metadata = ModelMetadata.from_json(meta, source=str(p))
        if other_threshold is not None:
            if not metadata.other_label:
                raise UserError(f"{p}: other_threshold given, but the model is closed-set (no other output): "
                                "leave it out, or export with openset = true")
            rule = metadata.open_set.replace(threshold=other_threshold, on=True, fit={"source": "override"})
            metadata = metadata.replace(open_set=rule)
        return cls(run, metadata, p, chosen.name, exact)

    def prepare(self, image: ImageLike, channels: str = "rgb") -> np.ndarray:
        """One image as the model's CHW float32 input (the fast or the exact path, as loaded)."""
        return preprocess(image, self.metadata.preprocess, fast=not self.exact, channels=channels)

    def preprocess(self, images, channels: str = "rgb") -> np.ndarray:
        return np.stack([self.prepare(im, channels) for im in images])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a preprocessed NCHW float32 batch."""
        return np.asarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Raw outputs [..., outputs] as the model's metadata says to read them: an open-set model's
        ``other_bias`` taken off its other output (a copy; closed-set outputs come back as they are)."""
        return with_other_bias(logits, len(self.labels), self.other_bias if self.other_label else 0.0)

    def probabilities(self, images, channels: str = "rgb") -> np.ndarray:
        return softmax(self.scores(self.logits(self.preprocess(images, channels))))

    def open_set(self, asked: bool | None = None) -> bool:
        """Whether answers may be ``other_label``: asked (``open_set=True``/``False``), else the model's rule says
        (``rule.on``); never for a closed-set model."""
        return bool(self.other_label) and (self.rule.on if asked is None else bool(asked))

    def decide(self, logits: np.ndarray, open_set: bool | None = None) -> np.ndarray:
        """The answer per row of raw outputs [N, outputs], as an index: the best concept, or K for ``other_label``
        where the open-set answer applies (``open_set``) and the rule's score is under its threshold."""
        n = len(self.labels)
        if not self.open_set(open_set):
            return logits[:, :n].argmax(1)
        return self.rule.decide(self.scores(logits)[:, :n + 1], n)

    def _ranked(self, logits: np.ndarray, k: int, open_set: bool | None = None) -> list[tuple[str, float]]:
        """The ranking for one row of raw outputs. Open-set: probabilities from the softmax over the K concepts
        and ``other``; ``other`` first where the rule answers it, else after the best concept at the highest.
        Closed-set (or ``open_set=False``): softmax over the K concept outputs alone."""
        n = len(self.labels)
        if not self.open_set(open_set):
            p = softmax(logits[:n])
            return [(self.labels[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]
        z = self.scores(logits)[:n + 1]
        p = softmax(z)
        order = [int(i) for i in np.argsort(-p, kind="stable") if i != n]
        if self.rule.decide(z[None], n)[0] == n:
            order.insert(0, n)
        else:   # a concept is the answer: other keeps its place by probability, never above the answer
            order.insert(max(1, int((p[:n] >= p[n]).sum())), n)
        names = self.labels + [self.other_label]
        return [(names[i], float(p[i])) for i in order[:k]]

    def classify(self, images: ImageLike | list, top_k: int = 5, channels: str = "rgb", open_set: bool | None = None):
        """(label, probability) pairs, best first; a list of such lists for a list input (decoded on
        threads while the model runs, as ``classify_iter``). An open-set model may answer its
        ``other_label`` ("none of these") where its rule is on (``clf.rule.on``) or ``open_set=True``;
        ``open_set=False`` ranks the concepts alone."""
        k = _check_top_k(top_k, len(self.labels) + int(self.open_set(open_set)))
        if isinstance(images, (list, tuple)):
            return list(self.classify_iter(images, top_k=top_k, channels=channels, open_set=open_set))
        return self._ranked(self.logits(self.preprocess([images], channels))[0], k, open_set)

    def classify_iter(self, images: Iterable[ImageLike], top_k: int = 5, batch_size: int = 16, workers: int | None = None,
                      channels: str = "rgb", errors: str = "raise", open_set: bool | None = None) -> Iterator:
        """Results for ``images`` (any iterable, consumed lazily), in input order. A small thread pool
        decodes and resizes the next images while the model runs the current batch (Pillow releases the
        GIL while it decodes); at most ``batch_size + workers`` images are in flight at any time, so a
        folder of any size runs in bounded memory. ``errors="return"`` yields the ``UserError`` of an
        image that cannot be read in its place instead of raising it."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        k = _check_top_k(top_k, len(self.labels) + int(self.open_set(open_set)))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size = {batch_size!r}: use a whole number >= 1")
        if errors not in ("raise", "return"):
            raise UserError(f"errors = {errors!r}: use raise or return")
        workers = workers or min(4, physical_cores())
        check_threads(workers)
        source = iter(images)

        def prepare(image):
            try:
                return self.prepare(image, channels)
            except UserError as exc:
                return exc

        with ThreadPoolExecutor(workers, thread_name_prefix="distiller-decode") as pool:
            pending: deque = deque()

            def fill(limit: int) -> None:
                while len(pending) < limit:
                    try:
                        image = next(source)
                    except StopIteration:
                        return
                    pending.append(pool.submit(prepare, image))

            fill(batch_size + workers)
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill(workers)   # the next images decode while this batch runs
                arrays = [f.result() for f in batch]
                good = [a for a in arrays if not isinstance(a, UserError)]
                rows = iter(self.logits(np.stack(good))) if good else iter(())
                for a in arrays:
                    if isinstance(a, UserError):
                        if errors == "raise":
                            raise a
                        yield a
                    else:
                        yield self._ranked(next(rows), k, open_set)
                fill(batch_size + workers)


def _check_top_k(top_k, labels: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k = {top_k!r}: use a whole number >= 1")
    return min(top_k, labels)


__all__ = ["Classifier", "softmax", "load_image", "physical_cores", "backends", "register_backend"]
