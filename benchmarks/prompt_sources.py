"""Compare the prompt sources (plain, mix, random, contrastive) on one CLIP teacher.

Per source: style diversity (mean pairwise cosine of "a [S] style of a" features; lower is more
diverse), class consistency (share of styled class prompts classified as their class among the
plain class embeddings), the diversity of synthesised images (mean pairwise cosine of their
CLIP image embeddings within a class), and the time to build the styles. With ``--data DIR``
(an ImageFolder tree, as for `distiller eval`) it also runs `make` per source and reports the
deployable student's per-domain accuracy, so the paper's ablation can be rerun wherever real
CLIP weights exist.

    python benchmarks/prompt_sources.py --teacher ViT-B-32 --pretrained PATH_OR_TAG --classes cat,dog
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from distiller.concepts import parse_concepts  # noqa: E402
from distiller.prompts import build_prompt_source, class_consistency, style_diversity  # noqa: E402
from distiller.recipe import load_recipe  # noqa: E402
from distiller.synthesis import synthesize  # noqa: E402
from distiller.teachers import build_teacher  # noqa: E402

SOURCES = ("plain", "mix", "random", "contrastive")


def image_diversity(teacher, images_u8: torch.Tensor, classes: torch.Tensor) -> float:
    with torch.no_grad():
        f = teacher.image_features(images_u8.permute(0, 3, 1, 2).float() / 255)
    vals = []
    for c in classes.unique():
        g = F.normalize(f[classes == c], dim=-1)
        n = len(g)
        if n > 1:
            s = g @ g.t()
            vals.append(float((s.sum() - s.diagonal().sum()) / (n * (n - 1))))
    return sum(vals) / len(vals)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--pretrained", default="laion2b_s34b_b79k")
    ap.add_argument("--classes", default="cat,dog")
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--styles", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--images-per-class", type=int, default=8, help="images synthesised per class for image diversity")
    ap.add_argument("--steps", type=int, default=20, help="synthesis steps for image diversity (0 skips it)")
    ap.add_argument("--data", type=Path, help="ImageFolder tree: also train a student per source and score it")
    ap.add_argument("--labels-map", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-prompts"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rec = load_recipe(args.recipe, {"teacher.model": args.teacher, "teacher.pretrained": args.pretrained, "device": "cpu",
                                    "prompts.styles": args.styles, "prompts.train_steps": args.train_steps,
                                    "openset": False})   # closed-set: the scores are the K-way ranking
    concepts = parse_concepts(args.classes)
    teacher = build_teacher(rec.teacher, concepts)
    rows = []
    for name in SOURCES:
        t0 = time.perf_counter()
        src = build_prompt_source(teacher, dataclasses.replace(rec.prompts, source=name), None, rec.seed)
        build_s = time.perf_counter() - t0
        row = {"source": name, "styles": src.num_styles, "build_s": round(build_s, 2)}
        if name != "plain":
            pseudo = src.draw(src.num_styles, torch.Generator().manual_seed(rec.seed)) if name == "random" else None
            row["style_cosine"] = round(style_diversity(src, pseudo), 4)
            row["class_consistency"] = round(class_consistency(src, pseudo), 4)
        if args.steps:
            k = len(concepts)
            n = args.images_per_class * k
            cls = torch.arange(n) % k
            sty = (torch.arange(n) // k) % src.num_styles
            gen = torch.Generator().manual_seed(rec.seed)
            t0 = time.perf_counter()
            imgs, _ = synthesize(teacher, src.targets(cls, sty, gen), cls, dataclasses.replace(rec.synthesis, steps=args.steps),
                                 teacher.input_size, gen)
            row["image_cosine"] = round(image_diversity(teacher, imgs, cls), 4)
            row["synth_s_per_image"] = round((time.perf_counter() - t0) / n, 2)
        if args.data:
            row["eval"] = train_and_score(args, rec, concepts, name)
        rows.append(row)

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    t = Table(title=f"prompt sources: teacher {args.teacher} ({args.pretrained}), classes {args.classes}", title_justify="left")
    for c in ("source", "styles", "style cosine", "class consistency", "image cosine", "build s", "synth s/img"):
        t.add_column(c, justify="left" if c == "source" else "right")
    for r in rows:
        t.add_row(r["source"], str(r["styles"]), _f(r.get("style_cosine")), _f(r.get("class_consistency")),
                  _f(r.get("image_cosine")), f"{r['build_s']:.2f}", _f(r.get("synth_s_per_image"), 2))
    Console().print(t)
    for r in rows:
        for dom in r.get("eval", {}).get("rows", []):
            lo, hi = dom["balanced_ci"]
            print(f"{r['source']:12s} {dom['domain']:10s} n={dom['n']:4d} balanced {100 * dom['balanced_accuracy']:.1f} "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    return 0


def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def train_and_score(args, rec, concepts, source: str) -> dict:
    from distiller.evaluation import evaluate, load_image_folder, read_labels_map, runtime_predictor
    from distiller.pipeline import make
    from runtime import Classifier
    run = args.out / source
    r = dataclasses.replace(rec, prompts=dataclasses.replace(rec.prompts, source=source))
    make(run, r, concepts, exist_ok=False)
    clf = Classifier.load(run, exact=True)
    data = load_image_folder(args.data, clf.labels, read_labels_map(args.labels_map))
    return evaluate(runtime_predictor(clf), data)


if __name__ == "__main__":
    sys.exit(main())
