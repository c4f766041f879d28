"""Concepts by example: a class named by a few pictures (``--classes "person=@photos/person/,car,dog"``).

The run folder keeps a copy of each concept's example images (``examples/<n>/<sha>.<ext>``, ``examples.json``
records where each came from), so the teacher, the judge and the student read the same files on every resume.

A network with an ImageNet classifier learns the concept as one more classifier row (``probe_rows``): the row is
fitted with the network's own 1000 rows frozen, by cross-entropy over all of them, to win on the examples' pooled
features (light augmentation: flips, crops) and to lose on pseudo-features drawn from the network's last
BatchNorm statistics (what a generic image's features look like to it: no image needed). An L2 penalty on the
row (``L2``, chosen on the VLCS sun domain, benchmarks/examples.py) keeps it from claiming every image. The
teacher scores the concept by that row as it scores a named concept by its ImageNet rows ("other" included),
synthesis targets it as a class index, and the student's head for it starts as the same probe on its own
features (head source ``examples``)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from runtime.atomic import atomic_path, read_json, write_json
from runtime.errors import UserError
from runtime.metadata import Preprocess
from runtime.preprocess import preprocess

from .concepts import Concept
from .images import ImageSet, scan_images

MAX_EXAMPLES = 100
EXAMPLES_FILE = "examples.json"
L2 = 0.03                 # the row's L2 penalty (benchmarks/examples.py: chosen on VLCS sun, reported on caltech)
PSEUDO_IMAGES = 2000      # pseudo-features drawn from the last BatchNorm's statistics
PSEUDO_POSITIONS = 16     # spatial positions averaged into one pseudo-feature (a 4 x 4 final feature map)
PROBE_STEPS = 400


def scan_examples(concepts: list[Concept]) -> dict[str, ImageSet]:
    """Each example concept's usable images (the ``--images`` scanner: formats, EXIF, duplicates, bad files skipped
    with reasons): 1 to ``MAX_EXAMPLES``, else one UserError before anything is written."""
    sets = {}
    for c in concepts:
        if not c.examples:
            continue
        found = scan_images(list(c.examples), seed=0, val_fraction=0.0, flag=f"{c.label}=@", files=True)
        if len(found.files) > MAX_EXAMPLES:
            raise UserError(f"{c.label}=@{c.examples[0]}: {len(found.files)} example images: give at most {MAX_EXAMPLES} "
                            "(a few well-chosen ones; a larger unlabelled pool goes to --images DIR)")
        sets[c.label] = found
    return sets


def scanned_concepts(concepts: list[Concept], sets: dict[str, ImageSet]) -> list[Concept]:
    """The concepts with each example concept's usable files where they are (before the run folder keeps them)."""
    return [replace(c, examples=tuple(f["path"] for f in sets[c.label].files)) if c.label in sets else c
            for c in concepts]


def stored_concepts(root: Path, concepts: list[Concept], sets: dict[str, ImageSet]) -> list[Concept]:
    """The concepts as the run folder keeps them: each example concept's images are its copies there."""
    out = []
    for i, c in enumerate(concepts):
        if c.label in sets:
            c = replace(c, examples=tuple(str(_copy_path(root, i, f)) for f in sets[c.label].files))
        out.append(c)
    return out


def _copy_path(root: Path, index: int, f: dict) -> Path:
    return Path(root).absolute() / "examples" / str(index) / (f["sha256"][:16] + Path(f["path"]).suffix.lower())


def store_examples(root: Path, concepts: list[Concept], sets: dict[str, ImageSet]) -> None:
    """Copy the example images into the run folder (once) and record them in ``examples.json``."""
    record = {}
    for i, c in enumerate(concepts):
        if c.label not in sets:
            continue
        for f in sets[c.label].files:
            dest = _copy_path(root, i, f)
            if not dest.exists():
                with atomic_path(dest) as tmp:
                    shutil.copyfile(f["path"], tmp)
        record[c.label] = {**sets[c.label].to_json(),
                           "stored": [str(_copy_path(root, i, f).relative_to(Path(root).absolute())) for f in sets[c.label].files]}
    if record:
        write_json(Path(root) / EXAMPLES_FILE, record)


def example_hashes(root: Path) -> dict[str, str]:
    """sha256 -> concept of every example image a run folder holds (empty for a run without)."""
    data = read_json(Path(root) / EXAMPLES_FILE) or {}
    return {f["sha256"]: label for label, rec in data.items() for f in rec["files"]}


# --- a new classifier row from examples ------------------------------------------------------------------------

def augmented(paths, pre: Preprocess) -> np.ndarray:
    """Each example as the network's input, and its mirror image and a centre crop of it: light augmentation."""
    tighter = Preprocess(pre.size, max(pre.size, int(pre.resize * 1.15)), pre.interpolation, pre.mean, pre.std)
    x = np.stack([preprocess(str(p), pre) for p in paths])
    crops = np.stack([preprocess(str(p), tighter) for p in paths])
    return np.concatenate([x, x[..., ::-1], crops, crops[..., ::-1]]).astype(np.float32)


def pooled_features(model, x: np.ndarray) -> np.ndarray:
    """A timm classifier's pooled pre-logit features of a preprocessed batch."""
    import torch
    with torch.no_grad():
        rows = [model.forward_head(model.forward_features(torch.from_numpy(np.ascontiguousarray(x[i:i + 32]))),
                                   pre_logits=True).numpy() for i in range(0, len(x), 32)]
    return np.concatenate(rows)


def pseudo_features(model, n: int = PSEUDO_IMAGES, seed: int = 0) -> np.ndarray:
    """Features a generic image has, to this network: per channel, its last BatchNorm's output N(beta, gamma^2)
    through the activation after it, averaged over ``PSEUDO_POSITIONS`` positions (global pooling)."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        raise UserError(f"{type(model).__name__} has no BatchNorm layer: a concept by example needs a network with one")
    bn = bns[-1]
    act = getattr(bn, "act", None) or torch.nn.ReLU()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pre = bn.bias.detach()[None, None] + bn.weight.detach().abs()[None, None] * torch.randn(
            n, PSEUDO_POSITIONS, bn.num_features, generator=gen)
        return act(pre).mean(1).numpy()


def probe_rows(positives: list[np.ndarray], weight: np.ndarray, bias: np.ndarray, negatives: np.ndarray,
               l2: float = L2, steps: int = PROBE_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """New rows (one per entry of ``positives``, features [n_j, D]) beside a frozen classifier (``weight`` [C, D],
    ``bias`` [C]): ``fit_rows`` from zero rows, the frozen logits of each image being its features through the
    classifier."""
    import torch
    w0, b0 = torch.from_numpy(weight).float(), torch.from_numpy(bias).float()
    pos = [torch.from_numpy(p).float() for p in positives]
    neg = torch.from_numpy(negatives).float()
    frozen = [x @ w0.T + b0 for x in pos + [neg]]
    w, b = fit_rows(pos, neg, frozen, torch.zeros(len(pos), w0.shape[1]), torch.zeros(len(pos)), l2, steps)
    return w.numpy(), b.numpy()


def fit_rows(pos: list, neg, frozen: list, w_init, b_init, l2: float = L2, steps: int = PROBE_STEPS):
    """New linear rows on features (``pos``: each new concept's examples [n_j, F]; ``neg``: generic images [m, F])
    beside frozen rows whose logits on the same images are ``frozen`` (one [n, C] per entry of ``pos``, then the
    negatives'): cross-entropy over all C + E rows, each concept's examples to its row and each negative to its own
    best frozen row, the examples and the negatives weighing the same (each concept's examples too), plus ``l2`` x
    the squared distance of the rows from ``w_init``. Deterministic (full batch, Adam). Returns (w [E, F], b [E])."""
    import torch
    torch.manual_seed(0)
    e = len(pos)
    # the frozen rows enter the cross-entropy only through their logsumexp (and a negative's own best row, its
    # target): computed once, so a step costs O(images x new rows)
    lse = [torch.logsumexp(f, 1, keepdim=True) for f in frozen]
    neg_target = frozen[-1].max(1).values
    w = w_init.clone().float().requires_grad_(True)
    b = b_init.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=0.01)

    def log_norm(i: int, new) -> "torch.Tensor":
        return torch.logsumexp(torch.cat([lse[i], new], 1), 1)
    with torch.enable_grad():   # callers may build a teacher under no_grad
        for _ in range(steps):
            loss = l2 * ((w - w_init) ** 2).sum()
            for j, p in enumerate(pos):
                new = p @ w.T + b
                loss = loss + (log_norm(j, new) - new[:, j]).mean() / e
            loss = loss + (log_norm(e, neg @ w.T + b) - neg_target).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def generic_images(n: int, size: int, seed: int = 0):
    """``n`` images [n, 3, size, size] in [0, 1] with a natural image's falling spectrum (amplitude ~ 1/f^1.5: blobs
    and edges at every scale), random phases, mostly luminance with some colour: what a network without BatchNorm
    statistics (a CLIP) is shown as generic images, the negatives of a concept by example."""
    import torch
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    amp = torch.sqrt(fx ** 2 + fy ** 2).clamp(min=1.0 / size) ** -1.5
    phase = torch.rand(n, 3, size, size // 2 + 1, generator=g) * 2 * torch.pi
    x = torch.fft.irfft2(amp * torch.exp(1j * phase), s=(size, size))
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    luma, chroma = x[:, :1], x[:, 1:] * 0.35
    rgb = torch.cat([luma + chroma[:, :1], luma - chroma[:, :1] - chroma[:, 1:], luma + chroma[:, 1:]], 1)
    return (rgb * 0.18 + torch.rand(n, 3, 1, 1, generator=g) * 0.4 + 0.3).clamp(0, 1)


def example_rows(model, pre: Preprocess, examples: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows for concepts defined by ``examples`` (paths per concept) on a timm classifier ``model`` whose input is
    made by ``pre``: ``probe_rows`` on its pooled features."""
    fc = model.get_classifier()
    pos = [pooled_features(model, augmented(paths, pre)) for paths in examples]
    return probe_rows(pos, fc.weight.detach().numpy(), fc.bias.detach().numpy(), pseudo_features(model))


def extend_classifier(model, weight: np.ndarray, bias: np.ndarray) -> None:
    """Append rows to a timm classifier's final linear layer (its logits gain one column per row)."""
    import torch
    fc = model.get_classifier()
    new = torch.nn.Linear(fc.in_features, fc.out_features + len(weight))
    with torch.no_grad():
        new.weight.copy_(torch.cat([fc.weight, torch.from_numpy(weight).to(fc.weight)]))
        new.bias.copy_(torch.cat([fc.bias, torch.from_numpy(bias).to(fc.bias)]))
    for name in ("classifier", "fc", "head"):
        if getattr(model, name, None) is fc:
            setattr(model, name, new)
            break
    else:
        raise UserError(f"{type(model).__name__}: cannot find its classifier layer to add a concept by example")
    model.num_classes = new.out_features
