"""Concepts by example on real photos: ``person`` named by k example photos beside bird, car and dog (WordNet
heads), the student (pretrained EfficientNet-Lite0 @ 128 px, the cpu-imagenet recipe's) scored on a VLCS-mini
domain the examples did not come from.

The cpu-imagenet recipe ships its student as initialised (``distill.epochs = 0``: distillation on surrogate images
made it worse on photos, benchmarks/transfer.py), so what ``make`` ships for these classes is exactly what this
script builds without running ``make``: the WordNet heads and the ``examples`` row (``distiller.examples``, the
same code). Rows, per held-out domain and k (k example photos of people drawn from the other domains, ``--draws``
random draws; mean [2.5th, 97.5th percentile] over draws):

    examples row        the shipped head: WordNet rows + the probe row from k examples
    prototype row       the alternative the issue names: the examples' mean feature as the row's direction, only
                        its scale and bias fitted (same loss, same negatives, same draws)
    labelled reference  the same student's features, a 4-way linear head fitted on every labelled photo of bird,
                        car, dog and person of the training domains (the issue's comparison)
    without person      the 3-class model of the same student (named classes' recall, for what person costs them)

Columns: person recall, the named classes' balanced recall, 4-way balanced accuracy, seconds per fit.

``--pacs``: PACS-mini, dog, elephant, guitar and horse named (WordNet), house and person by the photo domain's one
example each and giraffe by art_painting's (PACS-mini's photo domain has no giraffe), scored on cartoon and sketch;
the reference head is fitted on every labelled photo and painting.

``--make WORK``: the pipeline, ``distiller make --classes "bird,car,dog,person=@DIR" --teacher efficientnet-lite2``
per held-out domain and draw of k = 5 (``--make-draws``), beside that draw's examples row, paired on the same test
photos (difference of 4-way balanced accuracy, mean over draws, with a stratified bootstrap interval over photos):

    make                data-free (its default recipe, the bank cut to 2 images per class: with the student shipped
                        as initialised the bank moves only the open-set threshold, not the closed-set answers scored)
    make + --images, fresh head   the training domains' photos of all five VLCS classes (chairs too) as an
                        unlabelled pool, every row probed on the teacher's labels of it (``student.head = fresh``; the
                        teacher knows person from the examples). A variant that kept the WordNet rows and probed only
                        person's row on the pool lost to the examples row (benchmarks/RESULTS.md) and was reverted.

    python benchmarks/examples.py --real .cache/real_images [--draws 10] [--pacs] [--make WORK --make-draws 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLASSES = ("bird", "car", "dog", "person")


def features(model, pre, paths) -> np.ndarray:
    from distiller.examples import pooled_features
    from runtime.preprocess import preprocess
    return pooled_features(model, np.stack([preprocess(str(p), pre) for p in paths]))


def closed_answers(feats, weight, bias, groups) -> np.ndarray:
    z = feats @ weight.T + bias
    m = z.max(1, keepdims=True)
    lse = [np.log(np.exp(z[:, g] - m).sum(1)) + m[:, 0] for g in groups]
    return np.stack(lse, 1).argmax(1)


def reference_head(x: np.ndarray, y: np.ndarray, steps: int = 500, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A ``classes``-way linear head on labelled features (cross-entropy, classes weighed equally, small L2)."""
    import torch
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    weight = torch.tensor([len(y) / (classes * max(1, (y == c).sum())) for c in range(classes)], dtype=torch.float32)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, weight=weight) + 1e-3 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


def summary(values) -> str:
    v = np.asarray(values) * 100
    lo, hi = np.percentile(v, [2.5, 97.5])
    return f"{v.mean():.1f} [{lo:.1f}, {hi:.1f}]"


class Student:
    """The student of the cpu-imagenet recipe (EfficientNet-Lite0 @ 128 px, its ImageNet rows) and its features."""

    def __init__(self):
        import torch

        from distiller.examples import pseudo_features
        from distiller.teachers.imagenet import lite_model
        from runtime.metadata import Preprocess
        torch.set_num_threads(2)
        self.model = lite_model("efficientnet-lite0").eval()
        self.pre = Preprocess.from_crop_pct(128, 0.875, interpolation="bicubic")
        fc = self.model.get_classifier()
        self.weight, self.bias = fc.weight.detach().numpy(), fc.bias.detach().numpy()
        self.negatives = pseudo_features(self.model)

    def features(self, paths) -> np.ndarray:
        return features(self.model, self.pre, paths)

    def named(self, classes: str) -> list[list[int]]:
        from distiller.concepts import parse_concepts
        from distiller.imagenet_concepts import map_concepts
        return [list(c.classes) for c in map_concepts(parse_concepts(classes))]

    def example_head(self, picks: list[list[Path]]) -> tuple[np.ndarray, np.ndarray]:
        """The shipped head's rows: the ImageNet rows and one probe row per example concept."""
        from distiller.examples import augmented, pooled_features, probe_rows
        pos = [pooled_features(self.model, augmented(p, self.pre)) for p in picks]
        w, b = probe_rows(pos, self.weight, self.bias, self.negatives)
        return np.concatenate([self.weight, w]), np.concatenate([self.bias, b])

    def prototype_head(self, pick: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """The alternative: a row along the examples' mean feature, its scale and bias fitted by ``fit_rows`` on the
        projection onto that direction (the frozen rows and the BatchNorm pseudo-negatives as for the probe)."""
        import torch

        from distiller.examples import augmented, fit_rows, pooled_features
        pos = pooled_features(self.model, augmented(pick, self.pre))
        unit = pos.mean(0) / np.linalg.norm(pos.mean(0))
        frozen = [torch.from_numpy(x @ self.weight.T + self.bias).float() for x in (pos, self.negatives)]
        proj = [torch.from_numpy(x @ unit[:, None]).float() for x in (pos, self.negatives)]
        scale0 = float(frozen[0].max(1).values.mean() / proj[0].mean())   # the examples score like their best row
        w, b = fit_rows(proj[:1], proj[1], frozen, torch.tensor([[scale0]]), torch.zeros(1))
        row = float(w[0, 0]) * unit
        return np.concatenate([self.weight, row[None]]), np.concatenate([self.bias, b.numpy()])


def vlcs_table(args, st: Student, paths: dict, feats: dict, domains: list[str]) -> None:
    named = st.named("bird,car,dog")
    print(f"VLCS-mini, student EfficientNet-Lite0 @ 128 px; person by k example photos from the other domains, "
          f"{args.draws} draws; mean [2.5th, 97.5th percentile] over draws\n")
    print("| held-out domain | k | row | person recall | bird/car/dog balanced | 4-way balanced | s per fit |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for held in domains:
        if (held, "person") not in paths:
            continue
        test = [(feats[held, c], i) for i, c in enumerate(CLASSES)]
        pool = [p for d in domains if d != held and (d, "person") in paths for p in paths[d, "person"]]

        def score(answer) -> tuple[float, float, float]:
            recall = [float((answer(x) == i).mean()) for x, i in test]
            return recall[3], float(np.mean(recall[:3])), float(np.mean(recall))
        base = [float((closed_answers(x, st.weight, st.bias, named) == i).mean()) for x, i in test[:3]]
        train = [(d, c) for d in domains if d != held for c in CLASSES if (d, c) in paths]
        t = time.time()
        rw, rb = reference_head(*labelled(feats, train, CLASSES))
        ref = score(lambda f: (f @ rw.T + rb).argmax(1))
        ref_s = time.time() - t
        for k in (1, 5, 20):
            rows, secs = {"examples row": [], "prototype row": []}, {"examples row": [], "prototype row": []}
            for _ in range(args.draws):
                pick = [pool[i] for i in rng.choice(len(pool), min(k, len(pool)), replace=False)]
                for name, head in (("examples row", lambda: st.example_head([pick])),
                                   ("prototype row", lambda: st.prototype_head(pick))):
                    t = time.time()
                    full_w, full_b = head()
                    secs[name].append(time.time() - t)
                    rows[name].append(score(lambda f: closed_answers(f, full_w, full_b, named + [[1000]])))
            for name, got in rows.items():
                r = np.array(got)
                print(f"| {held} | {k} | {name} | {summary(r[:, 0])} | {summary(r[:, 1])} | {summary(r[:, 2])} | "
                      f"{np.mean(secs[name]):.1f} |")
        print(f"| {held} | all labelled | labelled reference | {100 * ref[0]:.1f} | {100 * ref[1]:.1f} | "
              f"{100 * ref[2]:.1f} | {ref_s:.1f} |")
        print(f"| {held} | - | without person | - | {100 * np.mean(base):.1f} | - | - |")


def labelled(feats: dict, keys: list, classes) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([feats[k] for k in keys])
    y = np.concatenate([np.full(len(feats[k]), classes.index(k[1])) for k in keys])
    return x, y


PACS_NAMED = ("dog", "elephant", "guitar", "horse")
PACS_EXAMPLES = {"house": "photo", "person": "photo", "giraffe": "art_painting"}   # concept -> its example's domain
PACS_TEST = ("cartoon", "sketch")


def pacs_table(args, st: Student) -> None:
    """Three PACS concepts by one example each beside four named ones, on the drawings no example came from."""
    root = args.real / "pacs"
    classes = PACS_NAMED + tuple(PACS_EXAMPLES)
    paths = {(d, c): sorted((root / d / c).iterdir()) for d in sorted(p.name for p in root.iterdir())
             for c in classes if (root / d / c).is_dir()}
    feats = {k: st.features(v) for k, v in paths.items()}
    picks = [paths[dom, c][:1] for c, dom in PACS_EXAMPLES.items()]
    t = time.time()
    w, b = st.example_head(picks)
    secs = time.time() - t
    named = st.named(",".join(PACS_NAMED))
    groups = named + [[1000 + j] for j in range(len(PACS_EXAMPLES))]
    tests = [(k, classes.index(k[1])) for k in paths if k[0] in PACS_TEST]
    truth = np.concatenate([np.full(len(paths[k]), i) for k, i in tests])
    x = np.concatenate([feats[k] for k, _ in tests])
    rw, rb = reference_head(*labelled(feats, [k for k in paths if k[0] in ("photo", "art_painting")], classes),
                            classes=len(classes))
    print(f"\nPACS-mini, student EfficientNet-Lite0 @ 128 px; {', '.join(PACS_EXAMPLES)} by one example each "
          f"({', '.join(f'{c}: {d}' for c, d in PACS_EXAMPLES.items())}), {', '.join(PACS_NAMED)} named; scored on "
          f"{' and '.join(PACS_TEST)} ({len(truth)} images); recall with a Wilson 95% interval\n")
    print("| row | " + " | ".join(f"{c} recall" for c in PACS_EXAMPLES) + " | named balanced | 7-way balanced | s |")
    print("|---|" + "---|" * (len(PACS_EXAMPLES) + 3))
    for name, answers, s in (("examples row", closed_answers(x, w, b, groups), secs),
                             ("labelled reference (photo + art_painting)", (x @ rw.T + rb).argmax(1), None)):
        rec = [wilson((answers[truth == i] == i).sum(), (truth == i).sum()) for i in range(len(classes))]
        named_bal = np.mean([(answers[truth == i] == i).mean() for i in range(len(PACS_NAMED)) if (truth == i).any()])
        all_bal = np.mean([(answers[truth == i] == i).mean() for i in range(len(classes)) if (truth == i).any()])
        print(f"| {name} | " + " | ".join(rec[len(PACS_NAMED):]) + f" | {100 * named_bal:.1f} | {100 * all_bal:.1f} | "
              f"{'-' if s is None else f'{s:.1f}'} |")
    base = closed_answers(x, st.weight, st.bias, named)
    keep = truth < len(PACS_NAMED)
    named_base = np.mean([(base[keep][truth[keep] == i] == i).mean() for i in range(len(PACS_NAMED))])
    print("| without the three | " + " | ".join("-" for _ in PACS_EXAMPLES) + f" | {100 * named_base:.1f} | - | - |")


def wilson(k: int, n: int) -> str:
    if n == 0:
        return "-"
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{k}/{n} [{100 * max(0, centre - half):.0f}, {100 * min(1, centre + half):.0f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=Path(".cache/real_images"))
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--pacs", action="store_true", help="the PACS-mini table too")
    ap.add_argument("--make", type=Path, default=None, metavar="WORK", help="the make rows, their run folders in WORK")
    ap.add_argument("--make-draws", type=int, default=3)
    ap.add_argument("--skip-vlcs", action="store_true", help="only the --pacs / --make tables")
    args = ap.parse_args(argv)
    st = Student()
    root = args.real / "vlcs"
    domains = sorted(d.name for d in root.iterdir())
    paths = {(d, c): sorted((root / d / c).iterdir()) for d in domains for c in CLASSES if (root / d / c).is_dir()}
    feats = {key: st.features(ps) for key, ps in paths.items()}
    if not args.skip_vlcs:
        vlcs_table(args, st, paths, feats, domains)
    if args.pacs:
        pacs_table(args, st)
    if args.make:
        from examples_make import make_table
        make_table(args, st, root, domains, feats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
