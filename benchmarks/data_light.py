"""Data-light distillation: a pool of real, unlabelled photos (``make --images DIR``), scored on a domain it never saw.

VLCS-mini bird/car/dog, teacher EfficientNet-Lite2 at 128 px, leave one domain out: the pool is the
other two domains' photos (unlabelled: their folder names are never read), the test set is the held-out
domain. Rows (students at 128 px, one ``distiller make`` per row and fold):

    a-25 / a-25+bank / a / a+bank   Lite0, fresh head (the proxy for a CLIP teacher's new concepts), a pool of
                                    25 or all photos, without or with the surrogate bank in training
    b                               Lite0, its own ImageNet rows as head, plus KD on the full pool
    c                               scratch MobileNetV3-S on the full pool and the bank

The surrogate bank does not depend on the fold: it is made once (the ``bank`` run, which is also the free
baseline through make: Lite0's own head, no training) and copied into every row's run folder before its
``make``, which then resumes past synthesis. Columns as in ``transfer.py``: balanced accuracy with a
Wilson 95% interval, retention of the teacher's with a paired stratified bootstrap interval, the paired
difference to the free baseline, and minutes of ``make`` on this machine (the bank's one-off minutes are
printed apart). Pooled rows put the three test domains together (146 photos).

    python benchmarks/data_light.py --real .cache/real_images --work runs/data-light
    python benchmarks/data_light.py --rows a,b --folds caltech      # some
    python benchmarks/data_light.py --pacs                          # + the PACS photo -> art/cartoon/sketch row

A finished row is scored again, not remade. Results: WORK/results.json and markdown tables on stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import balanced, correct_vectors, paired_bootstrap  # noqa: E402

TEACHER = "efficientnet-lite2"
CLASSES = "bird,car,dog"
FOLDS = ("caltech", "labelme", "sun")
PACS_CLASSES = "dog,elephant,guitar,horse"
BASE = {"teacher.input_size": 128, "export.variants": ["onnx-fp32"], "export.latency_runs": 20,
        "openset": False}   # closed-set, as measured: these tables score the K-way ranking on photos of the classes
FRESH = {"student.head": "fresh"}
NO_BANK = {"distill.surrogate_weight": 0.0}
KD = {"distill.epochs": 10, "distill.relabel": True}
ROWS = {
    "a-25": ("fresh head, 25 photos", 25, {**FRESH, **NO_BANK}),
    "a-25+bank": ("fresh head, 25 photos + bank", 25, FRESH),
    "a": ("fresh head, all photos", 0, {**FRESH, **NO_BANK}),
    "a+bank": ("fresh head, all photos + bank", 0, FRESH),
    "a-ft": ("fresh head, all photos, LP then 10 epochs of consistent KD", 0, {**FRESH, **NO_BANK, **KD}),
    "a-ft-mixup": ("as a-ft, mixup 0.4 views", 0, {**FRESH, **NO_BANK, **KD, "distill.mixup": 0.4}),
    "b": ("ImageNet head + KD, all photos", 0, {**NO_BANK, **KD, "student.head": "imagenet"}),
    "c": ("scratch MobileNetV3-S, all photos + bank", 0,
          {"student.init": "scratch", "student.head": "fresh", "student.model": "mobilenetv3_small_100",
           "student.input_size": 128, "distill.epochs": 60, "distill.lr": 0.002, "distill.weight_decay": 0.05,
           "distill.temperature": 4.0, "distill.freeze_bn": False, "distill.relabel": True}),
}


def sets_of(extra: dict) -> list[str]:
    out = []
    for k, v in {**BASE, **extra}.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def make(run: Path, classes: str, extra: dict, images: Path | None) -> float:
    cmd = [sys.executable, "-m", "distiller", "make", "--classes", classes, "--teacher", TEACHER, "--offline", "-q",
           "--out", str(run.parent), "--name", run.name] + sets_of(extra) + (["--images", str(images)] if images else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) / 60


def prepare(run: Path, bank_run: Path, classes: str, extra: dict, images: Path | None) -> None:
    """The run folder as `make` would start it (with ``--images`` where given), the bank run's bank copied in."""
    import dataclasses

    from distiller.concepts import parse_concepts
    from distiller.images import scan_images
    from distiller.pipeline import init_run
    from distiller.recipe import load_recipe
    from distiller.teachers import auto_recipe, resolve_paths
    if (run / "recipe.toml").exists():
        return
    rec = load_recipe(auto_recipe(TEACHER), {"teacher.model": TEACHER, **BASE, **extra})
    rec = dataclasses.replace(rec, teacher=resolve_paths(rec.teacher))
    scan = scan_images([images], rec.seed, rec.images.val_fraction) if images is not None else None
    init_run(run, rec, parse_concepts(classes), images=scan)
    copy_bank(run, bank_run)


def copy_bank(run: Path, bank_run: Path) -> None:
    (run / "bank").mkdir(parents=True, exist_ok=True)
    for p in (bank_run / "bank").iterdir():
        if p.name.startswith("shard_") or p.name in ("plan.json", "manifest.jsonl"):
            shutil.copytree(p, run / "bank" / p.name) if p.is_dir() else shutil.copy(p, run / "bank" / p.name)
    for name in ("teacher.json", "judge.json", "samples.png"):
        shutil.copy(bank_run / name, run / name)


def pool(folder: Path, domains, classes: list[str]) -> list[Path]:
    """The photos of ``domains`` (of these classes), to be flattened into one unlabelled folder."""
    return sorted(p for d in domains for c in classes if (folder / d / c).is_dir() for p in (folder / d / c).glob("*") if p.is_file())


def write_pool(files: list[Path], dest: Path) -> Path:
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, tmp / f"{i:04d}{f.suffix.lower()}")   # no folder or class in the name
        tmp.rename(dest)
    return dest


def test_set(folder: Path, domain: str, classes: list[str], dest: Path):
    from distiller.evaluation import load_image_folder
    if not dest.exists():
        for c in classes:
            shutil.copytree(folder / domain / c, dest / c)
    return load_image_folder(dest, classes)


def score(run: Path, data, cache: Path) -> dict:
    c = correct_vectors(run, data, cache)
    c["truth"] = np.array([s.label for s in data.samples])
    return c


def summarise(name: str, vectors: list[dict], minutes: list[float]) -> dict:
    from distiller.evaluation import wilson
    cat = {k: np.concatenate([v[k] for v in vectors]) for k in ("student", "teacher", "baseline")}
    # pooled over folds: classes keep their ids, so strata are (fold, class)
    truth = np.concatenate([v["truth"] + 10 * i for i, v in enumerate(vectors)])
    acc = {k: balanced(v, truth) for k, v in cat.items()}
    n = len(truth)
    ret_ci, _ = paired_bootstrap(cat["student"], cat["teacher"], truth)
    _, diff_ci = paired_bootstrap(cat["student"], cat["baseline"], truth)
    return {"row": name, "n": n, "student": acc["student"], "student_ci": wilson(acc["student"] * n, n),
            "teacher": acc["teacher"], "baseline": acc["baseline"], "retention": acc["student"] / acc["teacher"],
            "retention_ci": ret_ci, "vs_baseline": acc["student"] - acc["baseline"], "vs_baseline_ci": diff_ci,
            "minutes": float(np.mean(minutes))}


def table(rows: list[dict]) -> str:
    lines = ["| row | test | n | balanced acc [95% CI] | teacher | retention [95% CI] | vs free baseline [95% CI] | "
             "min of make |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['row']} | {r['test']} | {r['n']} | {100 * r['student']:.1f} [{100 * r['student_ci'][0]:.1f}, "
                     f"{100 * r['student_ci'][1]:.1f}] | {100 * r['teacher']:.1f} | {100 * r['retention']:.0f}% "
                     f"[{100 * r['retention_ci'][0]:.0f}, {100 * r['retention_ci'][1]:.0f}] | {100 * r['vs_baseline']:+.1f} "
                     f"[{100 * r['vs_baseline_ci'][0]:+.1f}, {100 * r['vs_baseline_ci'][1]:+.1f}] | {r['minutes']:.1f} |")
    return "\n".join(lines)


def run_grid(args, classes: str, folds: dict, rows: list[str], work: Path, results: dict) -> list[dict]:
    """``folds``: name -> (pool files, test folder name). Returns the table rows (per fold and pooled)."""
    labels = classes.split(",")
    bank_run = work / "bank"
    if not (bank_run / "report.json").exists():
        print(f"[{time.strftime('%H:%M:%S')}] bank {classes}", flush=True)
        make(bank_run, classes, {"distill.epochs": 0}, None)
    results[f"{work.name}/bank_minutes"] = stage_minutes(bank_run)
    out = []
    for row in rows:
        what, size, extra = ROWS[row]
        vectors, minutes = [], []
        for fold, (files, test_name) in folds.items():
            key = f"{work.name}/{row}/{fold}"
            run = work / f"{row}-{fold}"
            if not (run / "report.json").exists():
                images = write_pool(files if not size else pool_subset(files, size), work / "pools" / f"{fold}-{size or 'all'}")
                prepare(run, bank_run, classes, extra, images)
                print(f"[{time.strftime('%H:%M:%S')}] make {run.name}", flush=True)
                results[key] = {"wall_minutes": make(run, classes, extra, images)}
            data = test_set(*test_name, labels, work / "tests" / fold) if isinstance(test_name, tuple) else test_name
            v = score(run, data, work / "cache" / fold)
            vectors.append(v)
            minutes.append(stage_minutes(run))
            r = summarise(row, [v], [minutes[-1]])
            out.append({**r, "test": fold})
        if len(folds) > 1:
            out.append({**summarise(row, vectors, minutes), "test": "pooled"})
        print(table(out[-len(folds) - (len(folds) > 1):]), flush=True)
    return out


def stage_minutes(run: Path) -> float:
    """Minutes the row's own stages took (timings.json: labelling, distillation, export, report; not the
    bank, made once and copied in)."""
    return sum(json.loads((run / "timings.json").read_text()).values()) / 60


def pool_subset(files: list[Path], size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), min(size, len(files)), replace=False))]


INT8_VARIANTS = ["onnx-fp32", "onnx-int8", "onnx-int8-perchannel", "openvino-fp32", "openvino-int8", "openvino-int8-acc"]


def int8_table(args, work: Path, fold: str = "labelme") -> str:
    """The same student (Lite0's own head, no KD), its INT8 variants calibrated on the surrogate bank or on the
    fold's real pool, every variant scored on the held-out domain."""
    from distiller.evaluation import evaluate_models
    labels = CLASSES.split(",")
    vlcs = args.real / "vlcs"
    bank_run = work / "bank"
    images = write_pool(pool(vlcs, [d for d in FOLDS if d != fold], labels), work / "pools" / f"{fold}-all")
    data = work / "tests" / fold
    test_set(vlcs, fold, labels, data)
    extra = {"distill.epochs": 0, "export.variants": INT8_VARIANTS, "export.latency_runs": 50}
    cols = {}
    for name, imgs in (("surrogate", None), ("real", images)):
        run = work / f"int8-{name}-{fold}"
        if not (run / "report.json").exists():
            prepare(run, bank_run, CLASSES, extra, imgs)
            print(f"[{time.strftime('%H:%M:%S')}] make {run.name}", flush=True)
            make(run, CLASSES, extra, imgs)
        report = json.loads((run / "report.json").read_text())
        _, results, _ = evaluate_models(run, data, teacher=False, baseline=False)
        cols[name] = (report, results)
    lines = [f"INT8 calibrated on surrogate vs real images; VLCS {fold} (held out), {len(list(data.rglob('*.*')))} photos; "
             "the student is Lite0's own head (no KD), so FP32 is the same model in both", "",
             "| variant | calibrated on surrogate: balanced [95% CI] | vs FP32 (fidelity set) | calibrated on real: balanced "
             "[95% CI] | vs FP32 (fidelity set) |", "|---|---|---|---|---|"]
    for v in INT8_VARIANTS:
        cells = []
        for name in ("surrogate", "real"):
            report, results = cols[name]
            row = report["export"]["variants"].get(v)
            if row is None:
                cells += ["-", "-"]
                continue
            r = results[row["file"]]["rows"][-1]
            ship = " (ships)" if report["export"]["deployable_variant"] == v else ""
            cells += [f"{100 * r['balanced_accuracy']:.1f} [{100 * r['balanced_ci'][0]:.1f}, {100 * r['balanced_ci'][1]:.1f}]{ship}",
                      f"{100 * row['agreement']:.1f}%"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=Path(".cache/real_images"), help="real_images.py --out folder")
    ap.add_argument("--work", type=Path, default=Path("runs/data-light"))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    ap.add_argument("--folds", default=",".join(FOLDS))
    ap.add_argument("--pacs", action="store_true", help="also the cross-domain row: PACS photos -> art, cartoon, sketch")
    ap.add_argument("--int8", action="store_true", help="also INT8 calibrated on surrogate vs real images")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    labels = CLASSES.split(",")
    vlcs = args.real / "vlcs"
    folds = {f: (pool(vlcs, [d for d in FOLDS if d != f], labels), (vlcs, f)) for f in args.folds.split(",")}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    out = run_grid(args, CLASSES, folds, rows, args.work / "vlcs", results)
    results_file.write_text(json.dumps(results, indent=1))
    if args.pacs:
        from distiller.evaluation import load_image_folder
        pl = PACS_CLASSES.split(",")
        pacs = args.real / "pacs"
        dest = args.work / "pacs" / "tests" / "other"
        if not dest.exists():
            for d in ("art_painting", "cartoon", "sketch"):
                for c in pl:
                    if (pacs / d / c).is_dir():
                        shutil.copytree(pacs / d / c, dest / d / c)
        data = load_image_folder(dest, pl)
        pfolds = {"photo->art,cartoon,sketch": (pool(pacs, ["photo"], pl), data)}
        out += run_grid(args, PACS_CLASSES, pfolds, [r for r in rows if r in ("a", "a+bank", "b")], args.work / "pacs", results)
        results_file.write_text(json.dumps(results, indent=1))
    if args.int8:
        int8 = int8_table(args, args.work / "vlcs")
    bank = {k: v for k, v in results.items() if k.endswith("bank_minutes")}
    print("\n" + table(out))
    print("surrogate bank, made once per class set and reused by every row: "
          + ", ".join(f"{k.split('/')[0]} {v:.1f} min" for k, v in bank.items()))
    if args.int8:
        print("\n" + int8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
