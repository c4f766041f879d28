"""Open-set rejection on real photos of other things: does "other" work where a closed-set model guesses?

Three checks, each a ``distiller make`` (ImageNet teachers, offline; open-set by default) scored with
``distiller eval --data KNOWN --other-data OTHER`` through the same code:

    foolbox   dogs,birds (teacher Lite0, the issue's command): the 5 dog and bird photos of foolbox's 20
              ImageNet photos as known, the 15 others (objects, two insects) as other
    vlcs      bird,car,dog (teacher Lite2 at 128 px, the cpu-imagenet recipe): VLCS-mini's 146 photos as
              known, its chair and person photos as other
    pacs      dog,elephant,horse (teacher Lite2 at 128 px): PACS-mini's images of them (every domain) as
              known, its guitar, house and person images as other

Per model (the shipped variant, its FP32 student, the teacher, the free baseline), through ``distiller eval``:
known-class balanced accuracy with its default answer (Wilson 95%), the shipped student's closed-set balanced
accuracy on the same images (``open_set=False``), AUROC of known against other, and how often "other" is answered.
Then, per exported variant, what it answers on the photos. Then the operating points (``operating_points``):

- the data-free rules, fixed before any photo was scored (the shipped rule; the other output wins; per score -
  margin, max_softmax, max_logit, energy - a threshold keeping 95% of the run's surrogate images of the classes,
  or rejecting 95% of its statistics images): known balanced accuracy with the rule's answer and its ratio to
  closed-set (bootstrap 95% within classes), known images kept, others answered other (Wilson 95%), the score's
  AUROC and FPR95 (bootstrap 95%; FPR95: others kept at the threshold keeping 95% of these known images: an oracle, the
  score's quality); PACS also on its photo domain alone;
- the teacher's own rule on the same photos;
- ``eval --fit`` on half the photos, scored on the other half, per score, over 100 random halves, against the
  teacher's own score at the same known recall on the same half (checks with enough known photos: VLCS).

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

from distiller.openset import balanced as balanced_accuracy  # noqa: E402
from distiller.openset import describe_rule  # noqa: E402
from runtime.openset import OpenSetRule, conformal_threshold  # noqa: E402

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


def outputs(clf, paths) -> np.ndarray:
    """A runtime model's outputs [N, K + 1] as its rule reads them (other_bias applied)."""
    return clf.scores(np.concatenate([clf.logits(clf.preprocess(paths[i:i + 32])) for i in range(0, len(paths), 32)]))


def surrogates(run: Path, clf) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs on the run's own data-free images: the bank's images the teacher gives a concept
    (surrogates of the classes) and the statistics images held out of calibration (neither: textures)."""
    from distiller.bank import Bank
    from distiller.runfolder import Run
    from distiller.stages.calibration import CalibrationStage
    from distiller.statimages import to_tensor
    from runtime.preprocess import preprocess
    bank, k = Bank(run / "bank"), len(clf.labels)
    imgs, logits = [], []
    for split in ("train", "val"):
        im, lo, _ = bank.load(split)
        imgs.append(im)
        logits.append(lo)
    im, lo = np.concatenate(imgs), np.concatenate(logits)
    concept = lo.argmax(1) < k
    x = np.stack([preprocess(a, clf.metadata.preprocess) for a in im[concept]])
    bank_out = clf.scores(np.concatenate([clf.logits(x[i:i + 32]) for i in range(0, len(x), 32)]))
    _, held = CalibrationStage.store(Run(run, device="cpu", offline=True)).load()
    pre = clf.metadata.preprocess
    stats = to_tensor(held, pre.mean, pre.std)
    return bank_out, clf.scores(np.concatenate([clf.logits(stats[i:i + 32]) for i in range(0, len(stats), 32)]))


SCORES = ("margin", "max_softmax", "max_logit", "energy")


def data_free_rules(clf, bank: np.ndarray, stats: np.ndarray) -> dict:
    """The candidate data-free rules, fixed before any photo is scored: the rule the model shipped with, the
    teacher's own (the other output wins), and per score a threshold keeping 95% of the bank's surrogates of the
    classes (FPR95's convention, with surrogates for the known images) or rejecting 95% of the statistics images."""
    k = len(clf.labels)
    rules = {f"shipped ({clf.rule.score} @ {clf.rule.threshold:.3g})": clf.rule.replace(on=True),
             "margin @ 0 (the other output wins)": OpenSetRule("margin", 0.0)}
    for s in SCORES:
        r = OpenSetRule(s)
        rules[f"{s}, keeps 95% of bank surrogates"] = r.replace(threshold=conformal_threshold(r.known_score(bank, k), 0.95)[0])
        rules[f"{s}, rejects 95% of statistics images"] = r.replace(
            threshold=float(np.quantile(r.known_score(stats, k), 0.95)))
    return rules


def boot(fn, truth: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of ``fn(rows)``, the known images resampled within each class."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(truth == c) for c in np.unique(truth)]
    draws = [fn(np.concatenate([rng.choice(g, len(g)) for g in groups])) for _ in range(reps)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def fpr_interval(score: str, zk, truth, zo, k: int, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of FPR95: the known images resampled within classes, the others on their own."""
    from distiller.openset import fpr_at
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(truth == c) for c in np.unique(truth)]
    draws = [fpr_at(score, zk[np.concatenate([rng.choice(g, len(g)) for g in groups])],
                    zo[rng.choice(len(zo), len(zo))], k) for _ in range(reps)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def rule_table(title: str, rules: dict, zk: np.ndarray, truth: np.ndarray, zo: np.ndarray, k: int) -> list[str]:
    """Per rule: known balanced (the rule's answer), its ratio to closed-set, known kept, others answered other,
    the score's AUROC and FPR95; 95% intervals (bootstrap within classes; Wilson for the others)."""
    from distiller.openset import balanced, fpr_at, operating_point, score_auroc
    out = ["", title, "", "| rule | known balanced [95% CI] | / closed-set [95% CI] | known kept | answers other "
           "[95% CI] | AUROC [95% CI] | FPR95 [95% CI] |", "|---|---|---|---|---|---|---|"]
    closed = zk[:, :k].argmax(1)
    for name, rule in rules.items():
        p = operating_point(rule, zk, truth, zo, k)
        dk = rule.decide(zk, k)
        lo, hi = boot(lambda r: balanced(dk[r], truth[r]), truth)
        rlo, rhi = boot(lambda r: balanced(dk[r], truth[r]) / max(balanced(closed[r], truth[r]), 1e-9), truth)
        a, (alo, ahi) = score_auroc(rule.score, zk, zo, k)
        flo, fhi = fpr_interval(rule.score, zk, truth, zo, k)
        out.append(f"| {name} | {100 * p.known_balanced:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {p.ratio:.3f} "
                   f"[{rlo:.3f}, {rhi:.3f}] | {100 * p.known_kept:.1f} | {100 * p.other_answered:.1f} "
                   f"[{100 * p.other_ci[0]:.1f}, {100 * p.other_ci[1]:.1f}] | {a:.3f} [{alo:.3f}, {ahi:.3f}] | "
                   f"{100 * fpr_at(rule.score, zk, zo, k):.1f} [{100 * flo:.1f}, {100 * fhi:.1f}] |")
    return out


def fitted_splits(title: str, zk, truth, zo, tk, to, k: int, splits: int = 100) -> list[str]:
    """``eval --fit`` on half the photos (known by class, others at random), scored on the other half; per score:
    known kept, known balanced / closed-set, others answered other, and the teacher's own score (the other
    output against the concepts) at the same known kept on the same half. Mean [2.5th, 97.5th percentile] over
    ``splits`` random halves."""
    from distiller.openset import fit_rule, operating_point
    rng = np.random.default_rng(0)
    out = ["", title, "", "| score | known kept | share of halves keeping >= 95% | known balanced / closed-set | "
           "answers other | teacher's score at the same known kept | student - teacher |", "|---|---|---|---|---|---|---|"]
    for s in SCORES:
        rows = []
        for _ in range(splits):
            a = np.concatenate([rng.permutation(np.flatnonzero(truth == c))[: (truth == c).sum() // 2] for c in np.unique(truth)])
            b = np.setdiff1d(np.arange(len(truth)), a)
            oa = rng.permutation(len(zo))[: len(zo) // 2]
            ob = np.setdiff1d(np.arange(len(zo)), oa)
            fit = fit_rule(s, zk[a], truth[a], zo[oa], k, 0.95, "split")
            p = operating_point(fit.rule, zk[b], truth[b], zo[ob], k)
            teacher = OpenSetRule("margin")
            tks = np.sort(teacher.known_score(tk[b], k))
            t = tks[min(len(tks) - 1, int(round((1 - p.known_kept) * len(tks))))]   # keeps the same share
            rej = float((teacher.known_score(to[ob], k) < t).mean())
            rows.append((p.known_kept, p.ratio, p.other_answered, rej))
        r = np.array(rows)

        def cell(col, scale=100.0, fmt=".1f"):
            lo, hi = np.percentile(r[:, col], [2.5, 97.5])
            return f"{scale * r[:, col].mean():{fmt}} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"
        diff = r[:, 2] - r[:, 3]
        dlo, dhi = np.percentile(diff, [2.5, 97.5])
        out.append(f"| {s} | {cell(0)} | {100 * (r[:, 0] >= 0.95).mean():.0f}% | {cell(1, 1.0, '.3f')} | {cell(2)} | "
                   f"{cell(3)} | {100 * diff.mean():+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}] |")
    return out


def operating_points(run: Path, file: str, known: Path, other: Path) -> list[str]:
    """The data-free rules on the photos, for the shipped model, and the fitted point on half splits."""
    from distiller.evaluation import load_image_folder, teacher_predictor
    from distiller.runfolder import Run
    from runtime import Classifier
    from runtime.preprocess import list_images
    clf = Classifier.load(run / file, exact=True)
    data = load_image_folder(known, clf.labels)
    k, truth = len(clf.labels), np.array([s.label for s in data.samples])
    paths, others = [s.path for s in data.samples], list_images(other)
    zk, zo = outputs(clf, paths), outputs(clf, others)
    bank, stats = surrogates(run, clf)
    rules = data_free_rules(clf, bank, stats)
    out = rule_table(f"data-free rules ({name_of(run)}, {file}): {len(paths)} known, {len(others)} other images; "
                     f"thresholds from {len(bank)} bank surrogates / {len(stats)} statistics images", rules, zk, truth, zo, k)
    photo = np.array([p.name.startswith("photo_") for p in paths])
    if name_of(run) == "pacs" and len(np.unique(truth[photo])) > 1:   # the "PACS-mini photo domain"
        out += rule_table(f"the same rules on the photo domain alone ({photo.sum()} known; the same others)",
                          rules, zk[photo], truth[photo], zo, k)
    teach = teacher_predictor(Run(run, device="cpu", offline=True).teacher())
    tk, to = teach(paths), teach(others)
    out += rule_table(f"the teacher's own rule ({name_of(run)})", {"teacher, margin @ 0": OpenSetRule("margin")},
                      tk, truth, to, k)
    if min(np.bincount(truth)) >= 2 * 5 and len(paths) >= 4 * 10:
        out += fitted_splits(f"--fit on half the photos, scored on the other half ({name_of(run)}, {file}; 100 "
                             "random halves: mean [2.5th, 97.5th percentile])", zk, truth, zo, tk, to, k)
    else:
        out += ["", f"--fit on half the photos ({name_of(run)}): not run, {len(paths)} known photos are too few to halve"]
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
    rule = OpenSetRule.from_json(report["export"]["open_set"])
    out = [f"\n{name}: {classes} ({teacher}); {n_known} known, {results['student.onnx']['open_set']['other_images']} other. "
           + describe_rule(rule, "other"), "",
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
    return out + variants_on_photos(run, known, other) + operating_points(run, shipped, known, other)


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
