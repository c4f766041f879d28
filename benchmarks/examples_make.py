"""The ``--make`` rows of benchmarks/examples.py: ``distiller make`` with a concept by example, paired with the
examples row of the same draw on the same photos. A finished run is scored again, not remade."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from data_light import write_pool  # noqa: E402  (benchmarks/ is on sys.path)
from examples import CLASSES, closed_answers  # noqa: E402
from transfer import balanced  # noqa: E402

K = 5
RUN_NAMES = {"make": "make", "make + --images, fresh head": "make-images"}
FAST = ["--set", "synthesis.images_per_class=2", "--set", "synthesis.shard_size=4", "--set", 'export.variants=["onnx-fp32"]']
ROWS = {"make": [], "make + --images, fresh head": ["--set", 'student.head="fresh"']}   # + --images POOL


def run_make(out: Path, name: str, examples: Path, extra: list[str]) -> tuple[Path, float]:
    run = out / name
    if (run / "report.json").exists():
        return run, json.loads((run / "minutes.json").read_text())["minutes"]
    cmd = [sys.executable, "-m", "distiller", "make", "--classes", f"bird,car,dog,person=@{examples}",
           "--teacher", "efficientnet-lite2", "--out", str(out), "--name", name, "--yes", "--quiet", "--exist-ok",
           *FAST, *extra]
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    minutes = (time.time() - t) / 60
    (run / "minutes.json").write_text(json.dumps({"minutes": minutes}))
    return run, minutes


def shipped_answers(run: Path, paths: list[Path]) -> np.ndarray:
    """The exported model's closed-set answers (the deployable variant, through the runtime)."""
    from runtime import Classifier
    clf = Classifier.load(run, exact=True)
    return np.concatenate([clf.decide(clf.logits(clf.preprocess(paths[i:i + 32])), open_set=False)
                           for i in range(0, len(paths), 32)])


def paired_interval(a: list[np.ndarray], b: list[np.ndarray], truth: np.ndarray, reps: int = 2000) -> tuple:
    """Mean over draws of balanced(a) - balanced(b), and its 95% interval over stratified resamples of the photos."""
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(truth == c) for c in np.unique(truth)]
    diffs = []
    for _ in range(reps):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        diffs.append(np.mean([balanced(x[idx], truth[idx]) - balanced(y[idx], truth[idx]) for x, y in zip(a, b)]))
    point = np.mean([balanced(x, truth) - balanced(y, truth) for x, y in zip(a, b)])
    return point, *np.percentile(diffs, [2.5, 97.5])


def make_table(args, st, root: Path, domains: list[str], feats: dict) -> None:
    named = st.named("bird,car,dog")
    print(f"\nThe pipeline: `distiller make --classes \"bird,car,dog,person=@DIR\" --teacher efficientnet-lite2` "
          f"with k = {K} example photos of people from the other domains, {args.make_draws} draws; closed-set answers "
          "of the exported model; difference of 4-way balanced accuracy to the same draw's examples row, mean over "
          "draws [95% interval, stratified bootstrap over the photos]\n")
    print("| held-out domain | row | person recall | bird/car/dog balanced | 4-way balanced | vs examples row | min per make |")
    print("|---|---|---|---|---|---|---|")
    for held in domains:
        if not (root / held / "person").is_dir():
            continue
        test = [(p, i) for i, c in enumerate(CLASSES) for p in sorted((root / held / c).iterdir())]
        paths, truth = [p for p, _ in test], np.array([i for _, i in test])
        x = np.concatenate([feats[held, c] for c in CLASSES])
        train = [d for d in domains if d != held]
        people = [p for d in train if (root / d / "person").is_dir() for p in sorted((root / d / "person").iterdir())]
        pool = write_pool([p for d in train for c in sorted((root / d).iterdir()) for p in sorted(c.iterdir())],
                         args.make / held / "pool")
        answers = {name: [] for name in ("examples row", *ROWS)}
        minutes = {name: [] for name in ROWS}
        for draw in range(args.make_draws):
            rng = np.random.default_rng([draw, domains.index(held)])
            pick = [people[i] for i in rng.choice(len(people), K, replace=False)]
            w, b = st.example_head([pick])
            answers["examples row"].append(closed_answers(x, w, b, named + [[1000]]))
            out = args.make / held / f"draw{draw}"
            examples = write_pool(pick, out / "examples")
            for name, extra in ROWS.items():
                if name == "make" and draw:   # data-free make: one draw shows it ships the examples row's answers
                    continue
                run, m = run_make(out, RUN_NAMES[name], examples,
                                  extra + (["--images", str(pool)] if "--images" in name else []))
                answers[name].append(shipped_answers(run, paths))
                minutes[name].append(m)
        for name, got in answers.items():
            recall = [np.mean([(a[truth == i] == i).mean() for a in got]) for i in range(len(CLASSES))]
            if name == "examples row":
                vs, mins = "-", "-"
            else:
                d, lo, hi = paired_interval([a == truth for a in got],
                                            [a == truth for a in answers["examples row"][:len(got)]], truth)
                vs, mins = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{np.mean(minutes[name]):.1f}"
            print(f"| {held} | {name} ({len(got)} draw{'s' if len(got) > 1 else ''}) | {100 * recall[3]:.1f} | "
                  f"{100 * np.mean(recall[:3]):.1f} | {100 * np.mean(recall):.1f} | {vs} | {mins} |")
