"""INT8 without real data: which calibration images and which quantizer settings keep a student's answers.

For a finished run's student (its own heads, closed-set: the argmax over the K concepts) and for the
1000-class network the cpu students start from (EfficientNet-Lite0 at the student's input size), one table
per calibration source x export variant, on the real photos of ``benchmarks/real_images.py`` (VLCS-mini,
PACS-mini, foolbox ImageNet and CIFAR-10; never used to choose a default):

- top-1 agreement of the INT8 model with its FP32 network (K-way for the student, 1000-way for Lite0),
  with a Wilson 95% interval, and the mean logit cosine;
- accuracy on the photos whose folder is a concept (student: K-way; Lite0: the 20 foolbox ImageNet photos'
  own labels), FP32 -> INT8, with a paired bootstrap 95% interval of the change;
- batch-1 p50 latency of the INT8 model and of the FP32 model of the same backend, timed interleaved here;
- the minutes the calibration images took to make.

    python benchmarks/int8.py --run RUN [--sources noise,bank,stats-64,stats-128,stats-256,real]
                              [--variants openvino-int8,onnx-int8-perchannel] [--networks student,lite0]

``stats-N``: N images made from the network itself (``distiller.statimages``, the run recipe's
``[calibration]`` settings); ``real``: the PACS-mini photo domain (its PACS rows are then not held out).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.real_images import imagenet_names

SETS = ("vlcs", "pacs", "imagenet", "cifar10")


@dataclass
class Network:
    name: str
    model: object          # torch, eval mode
    preprocess: object     # runtime Preprocess
    labels: tuple[str, ...]
    k: int                 # outputs compared (the concepts; 1000 for Lite0)


@dataclass
class Photos:
    x: np.ndarray          # NCHW float32, the network's preprocessing
    sets: np.ndarray       # which set each row is from
    truth: np.ndarray      # label index per row, -1: not a concept


def networks(run: Path, wanted: list[str]) -> list[Network]:
    from distiller.distill import load_student
    from distiller.runfolder import Run
    from distiller.stages import DistillStage
    out = []
    r = Run(run)
    spec = DistillStage.spec(r)
    if "student" in wanted:
        out.append(Network("student", load_student(spec, DistillStage.checkpoints(r).best), spec.preprocess,
                           tuple(r.labels), len(r.labels)))
    if "lite0" in wanted:
        from distiller.teachers.imagenet import lite_model
        from runtime.metadata import Preprocess
        model = lite_model("efficientnet-lite0").eval()
        cfg = model.pretrained_cfg
        pre = Preprocess.from_crop_pct(spec.preprocess.size, cfg.get("crop_pct", 0.875), interpolation="bicubic",
                                       mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
        out.append(Network("lite0-1000", model, pre, tuple(imagenet_names()), 1000))
    return out


def load_photos(root: Path, net: Network) -> Photos:
    from PIL import Image

    from distiller.evaluation import match_folder
    from runtime.preprocess import preprocess
    xs, sets, truth = [], [], []
    for name in SETS:
        for f in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
            xs.append(preprocess(np.asarray(Image.open(f).convert("RGB")), net.preprocess))
            sets.append(name)
            label = match_folder(f.parent.name, list(net.labels), {})
            truth.append(label if isinstance(label, int) and (net.k != 1000 or name == "imagenet") else -1)
    return Photos(np.stack(xs), np.array(sets), np.array(truth))


def calibration(source: str, net: Network, run: Path, root: Path, cache: Path, seed: int = 0) -> tuple[np.ndarray, float]:
    """(calibration tensors, minutes they took to make) for one source."""
    from distiller.statimages import to_tensor
    p = net.preprocess
    if source == "noise":
        rng = np.random.default_rng(seed)
        return to_tensor((rng.normal(0.5, 0.2, (64, p.size, p.size, 3)).clip(0, 1) * 255).astype(np.uint8), p.mean, p.std), 0.0
    if source == "bank":
        from distiller.bank import Bank
        from runtime.preprocess import preprocess
        images, _, _ = Bank(run / "bank").load("train")
        return np.stack([preprocess(im, p) for im in images[:64]]), 0.0
    if source == "real":
        from PIL import Image

        from runtime.preprocess import preprocess
        files = sorted((root / "pacs" / "photo").rglob("*.jpg"))
        return np.stack([preprocess(np.asarray(Image.open(f).convert("RGB")), p) for f in files]), 0.0
    if source.startswith("npy:"):   # uint8 HWC images at the input size, made elsewhere
        return to_tensor(np.load(source[4:]), p.mean, p.std), 0.0
    n = int(source.split("-")[1])
    return stat_images(net, n, cache, seed)


def stat_images(net: Network, n: int, cache: Path, seed: int) -> tuple[np.ndarray, float]:
    from distiller.recipe import default_recipe
    from distiller.statimages import make_images, to_tensor
    cfg = default_recipe().calibration
    p = net.preprocess
    file = cache / f"{net.name}-{n}-{cfg.steps}-{cfg.batch}-{cfg.lr}-{seed}.npz"
    if file.exists():
        z = np.load(file)
        return to_tensor(z["images"], p.mean, p.std), float(z["minutes"])
    t0 = time.perf_counter()
    images = make_images(net.model, n, p.size, p.mean, p.std, cfg, seed)
    minutes = (time.perf_counter() - t0) / 60
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, images=images, minutes=minutes)
    return to_tensor(images, p.mean, p.std), minutes


def wilson(k: int, n: int) -> str:
    from distiller.stats import wilson as w
    lo, hi = w(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def paired_change(fp32: np.ndarray, int8: np.ndarray, reps: int = 2000, seed: int = 0) -> str:
    """Accuracy FP32 -> INT8 (per-row hits) and a paired bootstrap 95% interval of the change, in points."""
    if not len(fp32):
        return "-"
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(fp32), (reps, len(fp32)))
    d = 100 * (int8[idx].mean(1) - fp32[idx].mean(1))
    return (f"{100 * fp32.mean():.1f} -> {100 * int8.mean():.1f} "
            f"({100 * (int8.mean() - fp32.mean()):+.1f} [{np.percentile(d, 2.5):+.1f}, {np.percentile(d, 97.5):+.1f}])")


def paired_latency(a, b, x: np.ndarray, rounds: int = 10, per: int = 20) -> tuple[float, float]:
    """p50 ms of two classifiers at batch 1, timed in alternating blocks (one process, same load)."""
    from runtime.timing import timed
    ta, tb = [], []
    one = x[:1]
    for clf, _ in ((a, ta), (b, tb)):
        timed(lambda c=clf: c.logits(one), 1, 10)
    for _ in range(rounds):
        ta.append(timed(lambda: a.logits(one), per, 0))
        tb.append(timed(lambda: b.logits(one), per, 0))
    return float(np.median(np.concatenate(ta))), float(np.median(np.concatenate(tb)))


def logits(clf, x: np.ndarray) -> np.ndarray:
    return np.concatenate([clf.logits(x[i:i + 64]) for i in range(0, len(x), 64)])


def fp32_models(net: Network, work: Path):
    """The network's ONNX and OpenVINO FP32 files (built once per network), and its context's metadata."""
    from exporter import ExportContext
    from exporter.variants import VARIANTS
    from runtime.metadata import ModelMetadata
    meta = ModelMetadata(labels=net.labels, preprocess=net.preprocess, student=net.name,
                         other_label="other" if _outputs(net) > len(net.labels) else "")
    ctx = ExportContext(work, net.model, meta, np.zeros((1, 3, net.preprocess.size, net.preprocess.size), np.float32))
    for name in ("onnx-fp32", "openvino-fp32"):
        ctx.built[name] = VARIANTS.get(name).build(ctx)
    return ctx


def _outputs(net: Network) -> int:
    import torch
    with torch.no_grad():
        return int(net.model(torch.zeros(1, 3, net.preprocess.size, net.preprocess.size)).shape[1])


def table_rows(net: Network, photos: Photos, source: str, calib: np.ndarray, minutes: float, variants: list[str],
               base, work: Path, reference: np.ndarray) -> list[str]:
    from exporter import ExportContext
    from exporter.variants import VARIANTS, cosine
    from runtime.classifier import Classifier
    ctx = ExportContext(work, net.model, base.metadata, calib)
    ctx.built = dict(base.built)
    ref_top = reference[:, :net.k].argmax(1)
    known = photos.truth >= 0
    fp32_hit = (ref_top == photos.truth)[known]
    rows = []
    for name in variants:
        v = VARIANTS.get(name)
        try:
            path = v.build(ctx)
        except Exception as exc:  # noqa: BLE001  (a quantizer that cannot handle this network is a row, not a crash)
            rows.append(f"| {source} | {name} | failed: {type(exc).__name__} | | | | | | | |")
            continue
        clf = Classifier.load(path)
        fp = Classifier.load(base.built["openvino-fp32" if v.format == "openvino" else "onnx-fp32"])
        out = logits(clf, photos.x)
        top = out[:, :net.k].argmax(1)
        agree = int((top == ref_top).sum())
        p_int8, p_fp32 = paired_latency(clf, fp, photos.x)
        rows.append(f"| {source} | {name} | {wilson(agree, len(top))} | {cosine(out, reference):.4f} | "
                    f"{paired_change(fp32_hit, (top == photos.truth)[known])} | {p_int8:.2f} | {p_fp32:.2f} | "
                    f"{p_fp32 / p_int8:.2f}x | {minutes:.1f} | {per_set(photos, top, ref_top)} |")
    return rows


def per_set(photos: Photos, top: np.ndarray, ref_top: np.ndarray) -> str:
    return ", ".join(f"{s} {100 * (top[photos.sets == s] == ref_top[photos.sets == s]).mean():.1f}"
                     for s in SETS if (photos.sets == s).any())


def shipped_check(run: Path, root: Path) -> list[str]:
    """What a run ships against the FP32 model of the same backend in the same folder: closed-set answers
    (``open_set=False``) on the VLCS-mini and foolbox ImageNet photos, and batch-1 ``logits()`` p50, interleaved."""
    from runtime.classifier import Classifier, read_export
    shipped = Classifier.load(run)
    exp = read_export(run)
    fp32 = next(r for r in exp.variants.values() if r.precision == "fp32" and r.format == shipped.metadata.extra.get("format"))
    base = Classifier.load(run / fp32.file)
    files = [f for s in ("vlcs", "imagenet") for f in sorted((root / s).rglob("*")) if f.suffix.lower() in (".jpg", ".png")]
    x = shipped.preprocess([str(f) for f in files])
    k = len(shipped.labels)
    a, b = logits(shipped, x)[:, :k].argmax(1), logits(base, x)[:, :k].argmax(1)
    p_s, p_b = paired_latency(shipped, base, x, rounds=20, per=25)
    return [f"shipped {exp.deployable} (precision {shipped.metadata.precision}) vs {fp32.file}: closed-set answers equal on "
            f"{wilson(int((a == b).sum()), len(a))} % of {len(a)} photos (VLCS-mini + foolbox ImageNet); "
            f"p50 {p_s:.2f} ms vs {p_b:.2f} ms: {p_b / p_s:.2f}x"]


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--photos", type=Path, default=Path(".cache/real_images"))
    ap.add_argument("--cache", type=Path, default=Path(".cache/int8"))
    ap.add_argument("--sources", default="noise,bank,stats-64,stats-128,stats-256,real")
    ap.add_argument("--variants", default="openvino-int8,openvino-int8-mixed,onnx-int8-perchannel")
    ap.add_argument("--networks", default="student,lite0")
    ap.add_argument("--check", action="store_true", help="only compare what RUN ships with its FP32 model")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.check:
        print("\n".join(shipped_check(args.run, args.photos)))
        return 0
    for net in networks(args.run, args.networks.split(",")):
        photos = load_photos(args.photos, net)
        with torch.no_grad():
            reference = np.concatenate([net.model(torch.from_numpy(photos.x[i:i + 64])).numpy()
                                        for i in range(0, len(photos.x), 64)])
        print(f"\n### {net.name}: {net.k}-way top-1 agreement with FP32 on {len(photos.x)} photos "
              f"({', '.join(f'{s} {(photos.sets == s).sum()}' for s in SETS)}); accuracy on the "
              f"{(photos.truth >= 0).sum()} photos of its classes\n")
        print("| calibration | variant | agreement % [95%] | cosine | accuracy FP32 -> INT8 (change [95%]) | "
              "p50 ms | FP32 p50 ms | speedup | calibration min | agreement per set % |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        work = Path(tempfile.mkdtemp(prefix="int8-"))
        try:
            base = fp32_models(net, work / "fp32")
            for source in args.sources.split(","):
                calib, minutes = calibration(source, net, args.run, args.photos, args.cache)
                for row in table_rows(net, photos, source, calib, minutes, args.variants.split(","), base,
                                      work / source, reference):
                    print(row, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
