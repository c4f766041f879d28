"""The runtime in an app: camera frames end to end, against the loop a user would write in ten minutes.

    python benchmarks/runtime_e2e.py RUN [--real .cache/real_images] [--work .cache/e2e]

RUN is a finished run (a `cpu-imagenet` one for the README's numbers). It prints, from one run:

1. 40 JPEGs of 1280x720 made from the 20 foolbox ImageNet photos (resized, plus their mirror
   images): ms per image for the hand-written loop (Pillow open, bicubic resize, centre crop,
   normalise, one default ONNX Runtime session on student.onnx, one image at a time) and for
   ``Classifier.load(RUN).classify(paths, top_k=1)``, the speed-up, and their top-1 agreement.
2. ms per image for each stage (decode, resize + crop, normalise, infer at batch 1) of the loop's
   exact path and of the runtime's fast path (draft JPEG decoding, reducing gap).
3. Top-1 agreement between the fast and the exact path, the same model file, on every real image
   set of ``benchmarks/real_images.py`` and on the camera frames.
4. ``classify()`` on a 224 px PNG against the bare session: the overhead with each path.
5. Peak RSS of classifying one 10000x10000 JPEG in a fresh process.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def camera_frames(real: Path, out: Path, size=(1280, 720)) -> list[Path]:
    from PIL import Image, ImageOps
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted((real / "imagenet").rglob("*.jpg"))
    if len(photos) < 20:
        raise SystemExit(f"{real}/imagenet has {len(photos)} photos: build it with benchmarks/real_images.py --out {real}")
    paths = []
    for i, p in enumerate(photos[:20]):
        img = Image.open(p).convert("RGB").resize(size, Image.BICUBIC)
        for j, im in enumerate((img, ImageOps.mirror(img))):
            dst = out / f"frame_{i:02d}_{j}.jpg"
            if not dst.exists():
                im.save(dst, quality=90)
            paths.append(dst)
    return paths


def hand_loop(onnx_path: Path, pre):
    """What a user writes: Pillow, torchvision-style resize + crop, numpy normalise, a default session."""
    import onnxruntime as ort
    from PIL import Image
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)

    def classify(path):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = pre.resize / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        w, h = img.size
        left, top = (w - pre.size) // 2, (h - pre.size) // 2
        img = img.crop((left, top, left + pre.size, top + pre.size))
        x = ((np.asarray(img, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
        return int(np.argmax(sess.run(None, {name: np.ascontiguousarray(x)})[0]))
    return classify


def per_image_ms(fn, items, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(items)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return 1e3 * best


def stages(paths, pre, fast: bool, clf) -> dict:
    """ms per image of each stage of one path, images one at a time."""
    from runtime.preprocess import REDUCING_GAP, center_crop, load_image, resize_shorter, to_tensor
    t = {"decode": 0.0, "resize + crop": 0.0, "normalise": 0.0, "infer": 0.0}
    for p in paths:
        t0 = time.perf_counter()
        img = load_image(p, draft_short=2 * pre.resize if fast else 0)
        img.load()
        t1 = time.perf_counter()
        img = center_crop(resize_shorter(img, pre.resize, pre.interpolation, REDUCING_GAP if fast else None), pre.size)
        t2 = time.perf_counter()
        x = to_tensor(img, pre)[None]
        t3 = time.perf_counter()
        clf.logits(x)
        t4 = time.perf_counter()
        for k, a, b in (("decode", t0, t1), ("resize + crop", t1, t2), ("normalise", t2, t3), ("infer", t3, t4)):
            t[k] += b - a
    return {k: 1e3 * v / len(paths) for k, v in t.items()}


def agreement(model: Path, paths) -> tuple[float, int]:
    from runtime import Classifier
    exact, fast = Classifier.load(model, exact=True), Classifier.load(model)
    a = [r[0][0] for r in exact.classify(paths, top_k=1)]
    b = [r[0][0] for r in fast.classify(paths, top_k=1)]
    return float(np.mean([x == y for x, y in zip(a, b)])), len(paths)


RSS_CODE = """
import sys
from runtime import Classifier
def hwm():   # this process's peak RSS (VmHWM is per address space: not inherited from the parent, unlike ru_maxrss)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
clf = Classifier.load(sys.argv[1])
loaded = hwm()
print(clf.classify(sys.argv[2], top_k=1))
print(f"peak RSS {hwm():.0f} MB ({loaded:.0f} MB after loading the model, before the image)")
"""


def huge_jpeg(path: Path) -> Path:
    if not path.exists():
        from PIL import Image, ImageDraw
        img = Image.new("RGB", (10000, 10000), (90, 120, 160))
        d = ImageDraw.Draw(img)
        for i in range(0, 4500, 500):
            d.ellipse((i // 2, i, 10000 - i // 2, 10000 - i), outline=(255 - i // 40, i // 40, 128), width=40)
        img.save(path, quality=85)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--real", type=Path, default=Path(".cache/real_images"))
    ap.add_argument("--work", type=Path, default=Path(".cache/e2e"))
    args = ap.parse_args(argv)
    from runtime import Classifier
    from runtime.classifier import onnx_session
    from runtime.preprocess import list_images, preprocess
    frames = camera_frames(args.real, args.work / "frames")
    clf = Classifier.load(args.run)
    pre = clf.metadata.preprocess
    onnx_fp32 = args.run / "student.onnx"
    loop = hand_loop(onnx_fp32, pre)
    print(f"model: {clf.path} ({clf.backend}, {clf.metadata.precision}); loop: {onnx_fp32} (onnxruntime defaults); "
          f"{len(frames)} JPEGs 1280x720; best of 3 passes")
    loop_ms = per_image_ms(lambda ps: [loop(p) for p in ps], frames)
    ours_ms = per_image_ms(lambda ps: clf.classify(ps, top_k=1), frames)
    old = Classifier.load(args.run, exact=True)
    old_ms = per_image_ms(lambda ps: [old.classify(p, top_k=1) for p in ps], frames)
    labels = clf.labels
    agree = np.mean([labels[loop(p)] == r[0][0] for p, r in zip(frames, clf.classify(frames, top_k=1))])
    print("\n| loop | ms per image | vs hand loop |\n| --- | --- | --- |")
    print(f"| hand-written loop (exact preprocessing, FP32, default session, one at a time) | {loop_ms:.2f} | 1.00x |")
    print(f"| exact path, one image per classify() call | {old_ms:.2f} | {loop_ms / old_ms:.2f}x |")
    print(f"| `classify(paths, top_k=1)` (fast path, decode threads, batches) | {ours_ms:.2f} | {loop_ms / ours_ms:.2f}x |")
    print(f"top-1 agreement of classify() with the hand loop: {100 * agree:.1f}% ({len(frames)} frames)")

    print("\n| stage (ms per image, batch 1) | decode | resize + crop | normalise | infer | total |\n| --- | --- | --- | --- | --- | --- |")
    for name, fast in (("exact path", False), ("fast path", True)):
        s = stages(frames, pre, fast, clf)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in s.values()) + f" | {sum(s.values()):.2f} |")

    print("\n| image set | images | fast vs exact top-1 agreement |\n| --- | --- | --- |")
    total, agreeing = 0, 0.0
    for name in ("vlcs", "pacs", "cifar10", "imagenet"):
        paths = list_images(args.real / name) if (args.real / name).is_dir() else []
        if paths:
            a, n = agreement(clf.path, paths)
            total, agreeing = total + n, agreeing + a * n
            print(f"| {name} | {n} | {100 * a:.1f}% |")
    a, n = agreement(clf.path, frames)
    total, agreeing = total + n, agreeing + a * n
    print(f"| camera frames 1280x720 | {n} | {100 * a:.1f}% |")
    print(f"| all | {total} | {100 * agreeing / total:.2f}% |")

    from PIL import Image
    png = args.work / "224.png"
    Image.open(frames[0]).resize((224, 224), Image.BICUBIC).save(png)
    sess = onnx_session(clf.path) if clf.path.suffix == ".onnx" else None
    x = preprocess(png, pre)[None]
    bare = per_image_ms(lambda xs: [clf.logits(x) for _ in xs], list(range(200)))
    print("\n| classify() on a 224 px PNG | ms | overhead over the bare model call |\n| --- | --- | --- |")
    print(f"| bare model call ({clf.backend}) | {bare:.2f} | - |")
    for name, c in (("exact path", old), ("fast path", clf)):
        ms = per_image_ms(lambda xs: [c.classify(png, top_k=1) for _ in xs], list(range(200)))
        print(f"| {name} | {ms:.2f} | {100 * (ms / bare - 1):.0f}% |")
    del sess

    big = huge_jpeg(args.work / "huge.jpg")
    r = subprocess.run([sys.executable, "-c", RSS_CODE, str(args.run), str(big)], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parent.parent))
    print(f"\n10000x10000 JPEG in a fresh process: {r.stdout.strip().splitlines()[-1] if r.stdout else r.stderr[-500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
