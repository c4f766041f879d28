"""Open-set rejection on real photos of other things: does "other" work where a closed-set model guesses?

Three checks, each a ``distiller make`` (ImageNet teachers, offline; open-set by default) scored with
``distiller eval --data KNOWN --other-data OTHER`` through the same code:

    foolbox   dogs,birds (teacher Lite0, the issue's command): the 5 dog and bird photos of foolbox's 20
              ImageNet photos as known, the 15 others (objects, two insects) as other
    vlcs      bird,car,dog (teacher Lite2 at 128 px, the cpu-imagenet recipe): VLCS-mini's 146 photos as
              known, its chair and person photos as other
    pacs      dog,elephant,horse (teacher Lite2 at 128 px): PACS-mini's images of them (every domain) as
              known, its guitar, house and person images as other

Per model (the shipped variant, its FP32 student, the teacher, the free baseline): known-class balanced
accuracy with its open-set answer (Wilson 95%), the shipped student's closed-set balanced accuracy on the
same images (``open_set=False``), AUROC of known against other (the best class's probability; bootstrap
95%), and how often "other" is answered on the other images (Wilson 95%). Then the ``other_bias`` sweep:
the shipped model and the teacher read with other_bias = 0, 1, ... (the runtime's own decision, from the
same outputs; no retraining): what a user who sets it gets on known and on other images.

    python benchmarks/open_set.py --real .cache/real_images --work runs/open-set [--only foolbox]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.calibration import balanced_accuracy  # noqa: E402

FOOLBOX_KNOWN = {"bull mastiff": "dogs", "dalmatian": "dogs", "bald eagle": "birds", "goose": "birds", "spoonbill": "birds"}
CHECKS = {
    "foolbox": ("dogs,birds", "efficientnet-lite0", ["synthesis.images_per_class=8", "synthesis.steps=10"]),
    "vlcs": ("bird,car,dog", "efficientnet-lite2", []),
    "pacs": ("dog,elephant,horse", "efficientnet-lite2", []),
}


def build_sets(name: str, real: Path, dest: Path) -> tuple[Path, Path]:
    """(known ImageFolder tree, flat folder of other images) for one check, copied from real_images.py's trees."""
    known, other = dest / "known", dest / "other"
    if known.exists():
        return known, other
    other.mkdir(parents=True)

    def put(src: Path, label: str | None, tag: str):
        if label is None:
            shutil.copy(src, other / f"{tag}_{src.name}")
        else:
            (known / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, known / label / f"{tag}_{src.name}")
    if name == "foolbox":
        for d in sorted((real / "imagenet").iterdir()):
            for f in sorted(d.iterdir()):
                put(f, FOOLBOX_KNOWN.get(d.name), d.name.replace(" ", "_"))
    else:
        labels = CHECKS[name][0].split(",")
        root = real / name
        for dom in sorted(root.iterdir()):
            for c in sorted(dom.iterdir()):
                if name == "pacs" and c.name not in labels + ["guitar", "house", "person"]:
                    continue   # giraffe: neither known nor in the "other" list
                for f in sorted(c.iterdir()):
                    put(f, c.name if c.name in labels else None, f"{dom.name}_{c.name}")
    return known, other


def make(run: Path, classes: str, teacher: str, sets: list[str]) -> None:
    if (run / "report.json").exists():
        return
    cmd = [sys.executable, "-m", "distiller", "make", "--classes", classes, "--teacher", teacher, "--recipe",
           "cpu-imagenet", "--offline", "-q", "--out", str(run.parent), "--name", run.name]   # open-set by default
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def closed_set_balanced(run: Path, file: str, known: Path) -> float:
    from distiller.evaluation import load_image_folder
    from runtime import Classifier
    clf = Classifier.load(run / file, exact=True)
    data = load_image_folder(known, clf.labels)
    pred = np.array([clf.labels.index(clf.classify(s.path, top_k=1, open_set=False)[0][0]) for s in data.samples])
    truth = np.array([s.label for s in data.samples])
    return balanced_accuracy(pred, truth)


BIASES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)


def bias_sweep(run: Path, file: str, known: Path, other: Path) -> list[str]:
    """Known balanced accuracy and the share answered other, per other_bias, for ``file`` and the teacher."""
    from distiller.evaluation import Dataset, load_image_folder, teacher_predictor, wilson
    from distiller.runfolder import Run
    from runtime import Classifier
    from runtime.classifier import with_other_bias
    from runtime.preprocess import list_images
    clf = Classifier.load(run / file, exact=True)
    data: Dataset = load_image_folder(known, clf.labels)
    k, truth = len(clf.labels), np.array([s.label for s in data.samples])
    paths = [s.path for s in data.samples]
    others = list_images(other)
    raw = {file: (clf.logits(clf.preprocess(paths)), clf.logits(clf.preprocess(others)))}
    teach = teacher_predictor(Run(run, device="cpu", offline=True).teacher())
    raw["teacher"] = (teach(paths), teach(others))
    out = ["", f"other_bias sweep ({name_of(run)}): known balanced accuracy / answers other [95% CI]", "",
           "| other_bias | " + " | ".join(raw) + " |", "|---" * (len(raw) + 1) + "|"]
    for b in BIASES:
        cells = []
        for who, (zk, zo) in raw.items():
            if who == "teacher":
                dk, do = with_other_bias(zk, k, b).argmax(1), with_other_bias(zo, k, b).argmax(1)
            else:
                read = Classifier(clf._run, clf.metadata.replace(other_bias=b), clf.path, clf.backend, exact=True)
                dk, do = read.decide(zk), read.decide(zo)
            bal = balanced_accuracy(dk, truth)
            hit = int((do == k).sum())
            lo, hi = wilson(hit, len(do))
            cells.append(f"{100 * bal:.1f} / {100 * hit / len(do):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        out.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return out


def variants_on_photos(run: Path, known: Path, other: Path) -> list[str]:
    """Per exported variant: its bank fidelity (what the selection saw) against what it answers on the
    photos (known kept, others answered other, answers equal to the FP32 student's)."""
    from distiller.evaluation import load_image_folder
    from runtime import Classifier
    from runtime.preprocess import list_images
    export = json.loads((run / "export.json").read_text())
    ref = Classifier.load(run / "student.onnx", exact=True)
    data = load_image_folder(known, ref.labels)
    truth, k = np.array([s.label for s in data.samples]), len(ref.labels)
    xk, xo = ref.preprocess([s.path for s in data.samples]), ref.preprocess(list_images(other))
    rk, ro = ref.decide(ref.logits(xk)), ref.decide(ref.logits(xo))
    out = ["", f"variants ({name_of(run)}): bank fidelity on {export['fidelity_images']} images the quantizers did not "
           f"see ({export.get('calibration_images', '?')} calibration) against the photos", "",
           "| variant | bank fidelity | status | known kept (balanced) | others answered other | answers = FP32 |",
           "|---|---|---|---|---|---|"]
    for name, v in export["variants"].items():
        c = Classifier.load(run / v["file"], exact=True)
        dk, do = c.decide(c.logits(xk)), c.decide(c.logits(xo))
        bal = balanced_accuracy(dk, truth)
        same = np.concatenate([dk == rk, do == ro]).mean()
        out.append(f"| {name} | {100 * v['agreement']:.1f} | {v['status'].split(':')[0]} | {100 * bal:.1f} | "
                   f"{100 * (do == k).mean():.1f} | {100 * same:.1f} |")
    return out


def name_of(run: Path) -> str:
    return run.parent.name


def check(name: str, args) -> list[str]:
    from distiller.evaluation import evaluate_models
    classes, teacher, sets = CHECKS[name]
    known, other = build_sets(name, args.real, args.work / name / "data")
    run = args.work / name / "run"
    make(run, classes, teacher, sets)
    report = json.loads((run / "report.json").read_text())
    _, results, _ = evaluate_models(run, known, other_data=other)
    shipped = report["deployable"]
    rows = {f"shipped ({shipped})": results[shipped], "FP32 student (student.onnx)": results["student.onnx"],
            "teacher": results["teacher"]}
    rows.update({k: v for k, v in results.items() if k.startswith("free baseline")})
    n_known = results["student.onnx"]["rows"][-1]["n"]
    out = [f"\n{name}: {classes} ({teacher}); {n_known} known, {results['student.onnx']['open_set']['other_images']} other; "
           f"threshold {report['export']['threshold']['value']:.3f} ({report['export']['threshold']['source']})", "",
           "| model | known balanced [95% CI] | closed-set balanced | AUROC [95% CI] | answers other [95% CI] |",
           "|---|---|---|---|---|"]
    for label, r in rows.items():
        k, o = r["rows"][-1], r["open_set"]
        closed = ""
        if label.startswith("shipped"):
            closed = f"{100 * closed_set_balanced(run, shipped, known):.1f}"
        elif label.startswith("FP32"):
            closed = f"{100 * closed_set_balanced(run, 'student.onnx', known):.1f}"
        out.append(f"| {label} | {100 * k['balanced_accuracy']:.1f} [{100 * k['balanced_ci'][0]:.1f}, {100 * k['balanced_ci'][1]:.1f}] "
                   f"| {closed} | {o['auroc']:.3f} [{o['auroc_ci'][0]:.3f}, {o['auroc_ci'][1]:.3f}] | "
                   f"{100 * o['other_accuracy']:.1f} [{100 * o['other_ci'][0]:.1f}, {100 * o['other_ci'][1]:.1f}] |")
    return out + variants_on_photos(run, known, other) + bias_sweep(run, shipped, known, other)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=Path(".cache/real_images"), help="real_images.py --out folder")
    ap.add_argument("--work", type=Path, default=Path("runs/open-set"))
    ap.add_argument("--only", help="comma-separated: " + ", ".join(CHECKS))
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(2)
    for name in (args.only.split(",") if args.only else CHECKS):
        print("\n".join(check(name, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
