"""Does synthesis transfer? Students trained only on surrogate images, scored on real photos.

Teacher T = EfficientNet-Lite2 at 128 px; concepts bird, car, dog; real images: VLCS-mini's 146
photos of them (caltech, labelme, sun), built by ``benchmarks/real_images.py``. Every experiment is
a ``distiller make`` with recipe overrides; experiments marked ``bank_from`` reuse another's bank
(a prefix of its shards for a smaller budget), so they differ only after synthesis.

For each: the student's class-balanced accuracy with a Wilson 95% interval, its retention of the
teacher's (student / teacher, with a paired bootstrap 95% interval: images resampled within each
class, both models scored on the same draw), its paired difference to the free baseline (lite0's
own ImageNet head restricted to the concepts at 128 px: no synthesis, no training), and its cost
in minutes of `make` on this machine's 2 cores (synthesis + judge + distillation; the bank's
share for prefix runs).

    python benchmarks/transfer.py --real .cache/real_images --runs runs/transfer            # all
    python benchmarks/transfer.py --only scratch,pretrained --budgets 16,48                  # some
    python benchmarks/transfer.py --list

Runs resume: a finished run is scored again, not remade. Results: RUNS/results.json and a
markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = "bird,car,dog"
COMMON = {"teacher.model": "efficientnet-lite2", "teacher.input_size": 128, "synthesis.resolution": 128,
          "synthesis.shard_size": 8, "synthesis.val_every": 6, "synthesis.steps": 80,
          "export.variants": ["onnx-fp32", "openvino-fp32", "openvino-int8"], "export.latency_runs": 50}
SCRATCH = {"student.init": "scratch", "student.head": "fresh", "student.model": "mobilenetv3_small_100",
           "student.input_size": 128, "distill.epochs": 60, "distill.lr": 0.002, "distill.batch_size": 32,
           "distill.temperature": 4.0, "distill.weight_decay": 0.05, "distill.crop_scale": [0.5, 1.0]}
PRETRAINED = {"student.init": "pretrained", "student.model": "tf_efficientnet_lite0", "student.input_size": 128,
              "distill.epochs": 15, "distill.lr": 0.0003, "distill.batch_size": 32, "distill.temperature": 2.0,
              "distill.weight_decay": 0.01, "distill.crop_scale": [0.5, 1.0], "distill.freeze_bn": True}


@dataclass(frozen=True)
class Experiment:
    name: str
    idea: str
    sets: dict = field(default_factory=dict)
    recipe: str = "cpu-imagenet"
    per_class: int = 48               # images per class in its own bank (or the prefix taken)
    bank_from: str | None = None      # reuse this experiment's bank
    common: bool = True               # False: the recipe as shipped plus only ``sets``
    control: str | None = None        # a run of the same student at a similar cost without this idea: paired difference


# Ranked shortlist: cheapest idea first; each row says what it changes.
EXPERIMENTS = [
    Experiment("scratch", "the cpu recipe's scratch mobilenetv3_small@128; Fourier image, robust views, BN prior",
               {"distill.epochs": 60}, recipe="cpu"),
    Experiment("scratch-relabel-mixup", "same bank; teacher-in-the-loop KD: T relabels every mixed (mixup 0.4) view",
               {**SCRATCH, "distill.relabel": True, "distill.mixup": 0.4}, bank_from="scratch"),
    Experiment("scratch-long", "2x synthesis steps (160) per image, half the images: same cost as scratch-48",
               {"distill.epochs": 60, "synthesis.steps": 160}, recipe="cpu", per_class=24),
    Experiment("scratch-fast", "quantity over quality: 20 synthesis steps per image, 4x the images of scratch-24",
               {"distill.epochs": 60, "synthesis.steps": 20}, recipe="cpu", per_class=96),
    Experiment("pretrained-fresh", "pretrained lite0@128 backbone, fresh concept head",
               {**PRETRAINED, "student.head": "fresh", "distill.epochs": 30, "distill.lr": 0.001}, bank_from="scratch"),
    Experiment("pretrained", "pretrained lite0@128, its own ImageNet rows as concept head (= free baseline at step 0)",
               {**PRETRAINED, "student.head": "imagenet"}, bank_from="scratch"),
    Experiment("pretrained-gentle", "pretrained + imagenet head, 5 epochs at lr 1e-4",
               {**PRETRAINED, "student.head": "imagenet", "distill.epochs": 5, "distill.lr": 0.0001}, bank_from="scratch"),
    Experiment("pretrained-0", "pretrained + imagenet head, no distillation: the free baseline through make and export",
               {**PRETRAINED, "student.head": "imagenet", "distill.epochs": 0}, bank_from="scratch"),
    Experiment("pretrained-bn-drift", "pretrained + imagenet head, batch-norm statistics updated on surrogate images",
               {**PRETRAINED, "student.head": "imagenet", "distill.freeze_bn": False}, bank_from="scratch"),
    Experiment("pretrained-relabel-mixup", "pretrained + imagenet head; T relabels mixup views",
               {**PRETRAINED, "student.head": "imagenet", "distill.relabel": True, "distill.mixup": 0.4}, bank_from="scratch"),
    Experiment("cpu-imagenet-kd", "the cpu-imagenet recipe with KD (15 epochs, lr 3e-4) on its own bank",
               {"teacher.model": "efficientnet-lite2", "distill.epochs": 15}, per_class=32, common=False),
    Experiment("cpu-imagenet", "the cpu-imagenet recipe as shipped", {"teacher.model": "efficientnet-lite2"},
               per_class=16, common=False),
    Experiment("scratch-kd", "scratch mobilenetv3_small@128, plain KD (the SCRATCH settings) on the scratch bank",
               SCRATCH, bank_from="scratch"),
    Experiment("ensemble", "teacher ensemble: lite2 + lite1 in the synthesis loss (judge lite0); pretrained + imagenet head, KD",
               {**PRETRAINED, "student.head": "imagenet", "synthesis.ensemble": ["efficientnet-lite1"]}, per_class=24,
               control="pretrained-24"),
    Experiment("ensemble-scratch", "the ensemble bank; scratch mobilenetv3_small@128, plain KD",
               {**SCRATCH, "synthesis.ensemble": ["efficientnet-lite1"]}, bank_from="ensemble", per_class=24,
               control="scratch-kd-24"),
    Experiment("adversarial", "DeepInversion Adaptive: + 0.5 x (1 - JS(lite2, student as initialised)) (judge lite1); "
               "pretrained + imagenet head, KD", {**PRETRAINED, "student.head": "imagenet", "synthesis.adversarial": 0.5},
               per_class=24, control="pretrained-24"),
    Experiment("generator", "amortised: a conditional generator trained 1200 steps on the synthesis objective (concept "
               "cross-entropy + BN prior, robust views), 96 images per class sampled; pretrained + imagenet head, KD",
               {**PRETRAINED, "student.head": "imagenet", "synthesis.generator_steps": 1200}, per_class=96,
               control="pretrained-24"),
    Experiment("generator-scratch", "the generator bank; scratch mobilenetv3_small@128, plain KD",
               {**SCRATCH, "synthesis.generator_steps": 1200}, bank_from="generator", per_class=96,
               control="scratch-kd-24"),
    Experiment("generator-diverse", "the generator + MSGAN's mode-seeking term (weight 0.1): without it, one image "
               "per class", {**PRETRAINED, "student.head": "imagenet", "synthesis.generator_steps": 1200,
                             "synthesis.generator_diversity": 0.1}, per_class=96, control="pretrained-24"),
    Experiment("generator-diverse-scratch", "the diverse generator's bank; scratch mobilenetv3_small@128, plain KD",
               {**SCRATCH, "synthesis.generator_steps": 1200, "synthesis.generator_diversity": 0.1},
               bank_from="generator-diverse", per_class=96, control="scratch-kd-24"),
]


# The image prior (synthesis.prior) at equal CPU minutes: the same teacher forward passes (80 steps x 2 views per
# image at 128 px: the pixels prior hands its 64-px phase up to the teacher's 128 px), each scored by the fresh-head
# Lite0 student (the CLIP proxy: a head learnt from the bank alone) and by the held-out judge.
FRESH = {**PRETRAINED, "student.head": "fresh", "distill.epochs": 30, "distill.lr": 0.001}
PRIOR_ROWS = [
    Experiment("prior-fourier", "fourier prior (the default): 1/f spectra, crops, flips, rotations; KL BN prior",
               {**FRESH, "synthesis.prior": "fourier"}, recipe="cpu", per_class=16),
    Experiment("prior-pixels", "DeepInversion's pixels: jitter + flips, L2 BN prior (first layer x10), Adam (0.5, 0.9) "
               "lr 0.25, warm-up + cosine", {**FRESH, "synthesis.prior": "pixels"}, recipe="cpu", per_class=16,
               control="prior-fourier-16"),
    Experiment("prior-pixels-multires", "the same at 64 px for 54 steps, then handed up to 128 px for 26 (DeepInversion's "
               "2:1)", {**FRESH, "synthesis.prior": "pixels", "synthesis.resolutions": [64, 128],
                        "synthesis.resolution_steps": [54, 26]}, recipe="cpu", per_class=16, control="prior-fourier-16"),
]
EXPERIMENTS += PRIOR_ROWS


CLOSED_SET = {"openset": False}   # these tables score the K-way ranking on photos of the classes; open_set.py scores "other"


def run_sets(exp: Experiment, per_class: int) -> dict:
    if not exp.common:
        return {**CLOSED_SET, **exp.sets, "synthesis.images_per_class": per_class}
    return {**COMMON, **CLOSED_SET, **exp.sets, "synthesis.images_per_class": per_class}


def make_cmd(exp: Experiment, run: Path, per_class: int) -> list[str]:
    sets = run_sets(exp, per_class)
    cmd = [sys.executable, "-m", "distiller", "make", "--classes", CLASSES, "--recipe", exp.recipe, "--offline", "-q",
           "--out", str(run.parent), "--name", run.name]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return cmd


def seed_bank(src: Path, dst: Path, per_class: int) -> None:
    """Copy the first shards of ``src``'s bank that a ``per_class`` budget needs (same seeds, same images)."""
    import dataclasses

    from distiller.bank import Bank
    plan = Bank(src / "bank").plan()
    sub = dataclasses.replace(plan, images_per_class=per_class)
    if sub.num_shards > plan.num_shards:
        raise SystemExit(f"{src} has {plan.images_per_class} images per class, fewer than {per_class}")
    (dst / "bank").mkdir(parents=True, exist_ok=True)
    for i in range(sub.num_shards):
        if not (dst / "bank" / f"shard_{i:05d}").exists():
            shutil.copytree(src / "bank" / f"shard_{i:05d}", dst / "bank" / f"shard_{i:05d}")
    Bank(dst / "bank").start(sub)
    Bank(dst / "bank").write_manifest()
    shutil.copy(src / "teacher.json", dst / "teacher.json")
    share = sub.num_shards / plan.num_shards
    t = json.loads((src / "timings.json").read_text())
    (dst / "bank_cost.json").write_text(json.dumps({"from": src.name, "share": share,
                                                    "synthesize": t.get("synthesize", 0) * share}))


def cost_minutes(run: Path) -> dict:
    t = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    bank = json.loads((run / "bank_cost.json").read_text()) if (run / "bank_cost.json").exists() else None
    syn = bank["synthesize"] if bank else t.get("synthesize", 0)
    train = syn + t.get("judge", 0) + t.get("distill", 0)
    return {"synthesize": syn / 60, "distill": t.get("distill", 0) / 60, "to_student": train / 60,
            "with_export": (train + t.get("export", 0)) / 60}


def ensure_run(exp: Experiment, runs: Path, per_class: int) -> Path:
    run = runs / f"{exp.name}-{per_class}"
    if (run / "report.json").exists():
        return run
    if exp.bank_from:
        base = next(e for e in EXPERIMENTS if e.name == exp.bank_from)
        src = ensure_run(base, runs, max(per_class, base.per_class))
        if not (run / "recipe.toml").exists():   # the run folder first, as make would write it, then the bank
            from distiller.concepts import parse_concepts
            from distiller.pipeline import init_run
            from distiller.recipe import load_recipe
            init_run(run, load_recipe(exp.recipe, run_sets(exp, per_class)), parse_concepts(CLASSES))
        seed_bank(src, run, per_class)
    print(f"[{time.strftime('%H:%M:%S')}] make {run.name}", flush=True)
    subprocess.run(make_cmd(exp, run, per_class), check=True)
    return run


# --- scoring ---------------------------------------------------------------------------------

def correct_vectors(run: Path, data, cache: Path) -> dict[str, np.ndarray]:
    """Per-image correctness of the student (deployable), its teacher and the free baseline."""
    import torch

    from distiller.evaluation import FREE_BASELINE, baseline_predictor, runtime_predictor, teacher_predictor
    from distiller.runfolder import Run
    from runtime import Classifier
    torch.set_num_threads(2)
    truth = np.array([s.label for s in data.samples])
    paths = [s.path for s in data.samples]

    def predict(fn):
        return np.concatenate([fn(paths[i:i + 32]) for i in range(0, len(paths), 32)]).argmax(1) == truth

    out = {"student": predict(runtime_predictor(Classifier.load(run, exact=True)))}
    r = Run(run, device="cpu")   # the run's teacher, built as the pipeline builds it
    cache.mkdir(parents=True, exist_ok=True)
    for key, file, make in (
            ("teacher", f"teacher-{r.recipe.teacher.model}-{r.recipe.teacher.input_size}.npy",
             lambda: teacher_predictor(r.teacher())),
            ("baseline", "baseline-{}-{}.npy".format(*FREE_BASELINE), lambda: baseline_predictor(r.concepts))):
        if not (cache / file).exists():
            np.save(cache / file, predict(make()))
        out[key] = np.load(cache / file)
    return out


def balanced(correct: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([correct[truth == c].mean() for c in np.unique(truth)]))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, truth: np.ndarray, reps: int = 2000, seed: int = 0):
    """95% intervals of balanced(a) / balanced(b) and balanced(a) - balanced(b) over stratified resamples."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(truth == c) for c in np.unique(truth)]
    ratios, diffs = [], []
    for _ in range(reps):
        idx = [rng.choice(g, len(g)) for g in groups]
        ra = np.mean([a[i].mean() for i in idx])
        rb = np.mean([b[i].mean() for i in idx])
        ratios.append(ra / rb if rb else np.nan)
        diffs.append(ra - rb)
    return tuple(np.nanpercentile(ratios, [2.5, 97.5])), tuple(np.percentile(diffs, [2.5, 97.5]))


def score_run(run: Path, data, cache: Path, control: Path | None = None) -> dict:
    from distiller.evaluation import wilson
    truth = np.array([s.label for s in data.samples])
    c = correct_vectors(run, data, cache)
    vs_control = None
    if control is not None and (control / "report.json").exists():
        ctl = correct_vectors(control, data, cache)["student"]
        _, ci = paired_bootstrap(c["student"], ctl, truth)
        vs_control = {"run": control.name, "diff": balanced(c["student"], truth) - balanced(ctl, truth), "ci": ci}
    n = len(truth)
    acc = {k: balanced(v, truth) for k, v in c.items()}
    ret_ci, _ = paired_bootstrap(c["student"], c["teacher"], truth)
    _, diff_ci = paired_bootstrap(c["student"], c["baseline"], truth)
    report = json.loads((run / "report.json").read_text())
    dep = report["deployable"]
    variant = next((k for k, v in report["export"]["variants"].items() if v.get("file") == dep), dep)
    lat = report["export"]["variants"].get(variant, {}).get("latency_ms") or {}
    judge = report.get("judge") or {}
    return {"run": run.name, "n": n, "student": acc["student"], "student_ci": wilson(acc["student"] * n, n),
            "teacher": acc["teacher"], "baseline": acc["baseline"],
            "retention": acc["student"] / acc["teacher"], "retention_ci": ret_ci,
            "vs_baseline": acc["student"] - acc["baseline"], "vs_baseline_ci": diff_ci,
            "per_class": {lab: float(c["student"][truth == k].mean()) for k, lab in enumerate(data.labels)},
            "judge": judge.get("per_concept"), "cost_min": cost_minutes(run),
            "student_model": f"{report['student']['model']}@{report['student']['input_size']}",
            "deployable": variant, "latency_ms": lat.get("p50"), "vs_control": vs_control}


def table(rows: list[dict]) -> str:
    head = ("| run | student | balanced acc [95% CI] | retention [95% CI] | vs free baseline [95% CI] | "
            "bird / car / dog | minutes to student |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        pc = " / ".join(f"{100 * v:.0f}" for v in r["per_class"].values())
        lines.append(f"| {r['run']} | {r['student_model']} | {100 * r['student']:.1f} [{100 * r['student_ci'][0]:.1f}, "
                     f"{100 * r['student_ci'][1]:.1f}] | {100 * r['retention']:.0f}% [{100 * r['retention_ci'][0]:.0f}, "
                     f"{100 * r['retention_ci'][1]:.0f}] | {100 * r['vs_baseline']:+.1f} [{100 * r['vs_baseline_ci'][0]:+.1f}, "
                     f"{100 * r['vs_baseline_ci'][1]:+.1f}] | {pc} | {r['cost_min']['to_student']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=Path(".cache/real_images"), help="real_images.py --out folder")
    ap.add_argument("--runs", type=Path, default=Path("runs/transfer"))
    ap.add_argument("--only", help="comma-separated experiment names")
    ap.add_argument("--budgets", help="images per class, comma-separated (prefixes of bank_from banks)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for e in EXPERIMENTS:
            print(f"{e.name:26s} {e.idea}")
        return 0
    from distiller.concepts import parse_concepts
    from distiller.evaluation import load_image_folder
    labels = [c.label for c in parse_concepts(CLASSES)]
    data = load_image_folder(args.real / "vlcs", labels)
    chosen = [e for e in EXPERIMENTS if not args.only or e.name in args.only.split(",")]
    results_file = args.runs / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for exp in chosen:
        budgets = [int(b) for b in args.budgets.split(",")] if args.budgets and exp.bank_from else [exp.per_class]
        for k in budgets:
            run = ensure_run(exp, args.runs, k)
            control = args.runs / exp.control if exp.control else None
            results[run.name] = {"experiment": exp.name, "idea": exp.idea, "per_class": k,
                                 **score_run(run, data, args.runs / "cache", control)}
            args.runs.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=1))
    rows = [results[k] for k in results]
    first = rows[0] if rows else None
    if first:
        print(f"VLCS-mini bird/car/dog, {first['n']} photos; teacher lite2@128 {100 * first['teacher']:.1f}, "
              f"free baseline lite0@128 {100 * first['baseline']:.1f} (balanced)")
    print(table(rows))
    print(curve(rows))
    for r in rows:
        v = r.get("vs_control")
        if v:
            print(f"{r['run']} - {v['run']} (paired: the same student, similar cost, without the idea): {100 * v['diff']:+.1f} "
                  f"[{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}] points")
    return 0


def curve(rows: list[dict]) -> str:
    """Retention against minutes to a student, per experiment with several budgets (the free
    baseline is the 0-minute point: it needs no synthesis)."""
    lines = []
    for name in dict.fromkeys(r["experiment"] for r in rows):
        pts = sorted((r["cost_min"]["to_student"], r["retention"], r["per_class"]) for r in rows if r["experiment"] == name)
        if len(pts) < 2:
            continue
        base = rows[0]["baseline"] / rows[0]["teacher"]
        lines.append(f"{name}: retention vs minutes: free baseline 0 min {100 * base:.0f}%, "
                     + ", ".join(f"{m:.1f} min {100 * r:.0f}%" for m, r, _ in pts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
