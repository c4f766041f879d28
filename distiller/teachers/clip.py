"""CLIP teachers through open_clip: model-config JSON paths and open_clip model names."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.errors import UserError
from runtime.metadata import Preprocess

from ..examples import augmented, fit_rows, generic_images
from ..hub import hub_reachable
from . import TEACHERS, TeacherFamily, TextTower

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _open_clip(offline: bool = False):
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"   # before open_clip / huggingface_hub read it
    import open_clip
    return open_clip


@lru_cache(maxsize=None)
def _model_names() -> tuple[str, ...]:
    return tuple(_open_clip().list_models())


def _is_config(name: str) -> bool:
    return name.endswith(".json")


def _is_model_name(name: str) -> bool:
    return name in _model_names()


class ClipTeacher(torch.nn.Module):
    """Zero-shot CLIP head over the concepts: logits = exp(logit_scale) * cosine(image, class text)."""

    members = None   # no ImageNet classes: CLIP reads the class text

    def __init__(self, model, model_name: str, weights: str, text_embeddings: torch.Tensor, templates, tokenizer,
                 class_texts, other_embedding: torch.Tensor | None = None, other_prompts: torch.Tensor | None = None,
                 examples: "ExampleRows | None" = None):
        super().__init__()
        self.examples = examples
        self.openset = other_embedding is not None
        self.model = model.eval().requires_grad_(False)
        self.model_name, self.weights, self.templates = model_name, weights, tuple(templates)
        pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        size = pp.get("size", model.visual.image_size)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = pp.get("interpolation", "bicubic")
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        # the head: the concepts' embeddings, and with openset the generic prompts' ensemble last ("other")
        head = self.text if other_embedding is None else torch.cat([self.text, F.normalize(other_embedding.float().view(1, -1), dim=-1)])
        self.register_buffer("head", head)
        # synthesis targets for the bank's negatives: each generic prompt's own embedding
        self.negative_targets = None if other_embedding is None else other_prompts
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1))
        self.scale = float(model.logit_scale.exp().clamp(max=100))
        self.text_tower = TextTower(self.model, tokenizer, tuple(class_texts), self.scale,
                                    None if examples is None else examples.mix)

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    @property
    def outputs(self) -> int:
        return self.head.shape[0]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = (images - self._mean) / self._std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.image_features(images))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The zero-shot logits of normalised image features; a concept by example scored by its calibrated row
        (pooled with its text's logit when it has a name too)."""
        z = self.scale * feats @ self.head.t()
        return z if self.examples is None else self.examples.apply(z, self.scale * feats)

    def synthesis_loss_and_logits(self, images, targets, classes, cfg):
        """Per image: 1 - cosine to its target (prompt) embedding, plus ``cfg.class_weight`` x the
        cross-entropy of the zero-shot head against its class (keeps styled images on-class); and
        the zero-shot logits of the same forward pass."""
        feats = self.image_features(images)
        logits = self.head_logits(feats)
        loss = 1 - (feats * F.normalize(targets.float(), dim=-1)).sum(-1)
        if cfg.class_weight:
            loss = loss + cfg.class_weight * F.cross_entropy(logits, classes, reduction="none")
        return loss, logits

    def synthesis_loss(self, images, targets, classes, cfg) -> torch.Tensor:
        return self.synthesis_loss_and_logits(images, targets, classes, cfg)[0]

    def eval_preprocess(self) -> Preprocess:
        """open_clip's eval transform: resize the shorter side to the crop, centre crop."""
        return Preprocess(size=self.input_size, resize=self.input_size, interpolation=self.interpolation,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def warnings(self) -> list[str]:
        if self.text.device.type == "cpu" and self.model_name in _model_names():   # a real CLIP, not a test config
            return ["CLIP synthesis on CPU is a pipeline try-out: images of useful quality need a GPU (--recipe gpu)"]
        return []

    def describe(self) -> dict:
        return {"family": "open_clip", "model": self.model_name, "weights": self.weights,
                "input_size": self.input_size, "templates": list(self.templates)}


@torch.no_grad()
def encode_each(model, tokenizer, prompts, device="cpu") -> torch.Tensor:
    """Each prompt's normalised embedding: [P, D]."""
    tokens = tokenizer(list(prompts)).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def encode_class_texts(model, tokenizer, concepts, templates, device="cpu") -> torch.Tensor:
    """Per concept, the normalised mean of its template embeddings: [K, D] (zeros for a concept without text, named
    by its examples alone)."""
    out = []
    for c in concepts:
        tokens = tokenizer([t.format(c.text) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1) if c.text else torch.zeros_like(emb))
    return torch.stack(out)


def _looks_like_file(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES) or Path(pretrained).exists()


def _cached(open_clip, name: str, tag: str) -> bool:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        parts = hub.split("/")
        repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
        names = [f"{sub}/{f}" if sub else f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in names)
    url = cfg.get("url", "")
    return bool(url) and (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)).exists()


def resolve_weights(name: str, pretrained: str, offline: bool = False):
    """(open_clip module, model name) after checking that the weights can be had; registers config JSONs."""
    open_clip = _open_clip(offline or os.environ.get("HF_HUB_OFFLINE") == "1")
    if _is_config(name):
        path = Path(name)
        check_config(path)
        open_clip.add_model_config(path)
        name = path.stem
    if _looks_like_file(pretrained):
        check_weights_file(Path(pretrained))
        return open_clip, name
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        hint = f"known tags: {', '.join(tags)}" if tags else "it has no published weights"
        raise UserError(f"no pretrained weights {pretrained!r} for {name} ({hint}): pass --pretrained FILE or a known tag")
    if not _cached(open_clip, name, pretrained):
        if offline or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            raise UserError(
                f"teacher weights {name}/{pretrained} are not in the local cache and the hub cannot be reached: "
                f"pass --pretrained FILE with a downloaded open_clip checkpoint, or use an offline teacher: "
                f"--teacher efficientnet-lite2"
            )
    return open_clip, name


CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def check_config(path: Path) -> None:
    """An open_clip model-config JSON: a readable object with embed_dim, vision_cfg and text_cfg."""
    if not path.is_file():
        raise UserError(f"teacher config {path} does not exist: pass an open_clip model-config .json or model name")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"teacher config {path} is not valid JSON ({type(exc).__name__}): pass an open_clip "
                        "model-config .json") from None
    missing = [k for k in CONFIG_KEYS if not isinstance(data, dict) or k not in data]
    if missing or not isinstance(data.get("vision_cfg"), dict) or not isinstance(data.get("text_cfg"), dict):
        raise UserError(f"teacher config {path} is not an open_clip model config (it needs {', '.join(CONFIG_KEYS)}; "
                        f"missing: {', '.join(missing) or 'tables'}): pass an open_clip model-config .json")


def check_weights_file(path: Path) -> None:
    """A local weights file that torch (or safetensors) can open; mapped, not read, so it costs no time."""
    if not path.is_file():
        raise UserError(f"teacher weights file {path} does not exist: check --pretrained PATH")
    why = "it is empty" if path.stat().st_size == 0 else None
    if why is None:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(path), framework="pt"):
                    pass
            else:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:   # pickle, zip and safetensors each raise their own types
            why = f"{type(exc).__name__}: it is truncated or not a checkpoint"
    if why:
        raise UserError(f"teacher weights file {path} cannot be read ({why}): pass an open_clip checkpoint "
                        "(.pt, .bin or .safetensors) with --pretrained")


def resolve_clip_paths(cfg):
    """A config JSON and a local weights file as absolute paths (the run is read from other folders too)."""
    import dataclasses
    model = str(Path(cfg.model).resolve()) if _is_config(cfg.model) else cfg.model
    weights = str(Path(cfg.pretrained).resolve()) if _looks_like_file(cfg.pretrained) else cfg.pretrained
    return dataclasses.replace(cfg, model=model, pretrained=weights)


def check_clip(cfg, offline=False, concepts=None) -> None:
    if cfg.input_size:
        raise UserError("teacher.input_size applies to ImageNet-classifier teachers; a CLIP teacher runs at its own size: "
                        "set it to 0")
    resolve_weights(cfg.model, cfg.pretrained, offline)


def load_open_clip(name: str, pretrained: str, device="cpu", offline: bool = False):
    """An open_clip model and its tokenizer. ``name`` is a model name or a config JSON path."""
    open_clip, name = resolve_weights(name, pretrained, offline)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as exc:  # state-dict mismatch: wrong file for this architecture
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        first = first if len(first) <= 160 else first[:157].rsplit(" ", 1)[0] + " ..."
        raise UserError(f"weights {pretrained} do not fit teacher {name} ({first}): pass the checkpoint made for "
                        f"this model") from None
    return model, open_clip.get_tokenizer(name), name


def build_clip_teacher(cfg, concepts, device="cpu", offline=False, text_embeddings=None, openset=False) -> ClipTeacher:
    model, tokenizer, name = load_open_clip(cfg.model, cfg.pretrained, device=device, offline=offline)
    model.eval()
    fresh = text_embeddings is None
    if fresh:
        text_embeddings = encode_class_texts(model, tokenizer, concepts, cfg.templates, device)
    other = each = None
    if openset:
        if not cfg.other_prompts:
            raise UserError("openset = true with a CLIP teacher needs teacher.other_prompts (generic prompts for "
                            "'none of these'): list some, or set openset = false")
        each = encode_each(model, tokenizer, cfg.other_prompts, device)
        other = F.normalize(each.mean(0), dim=-1)
    args = (model, name, cfg.pretrained, text_embeddings.to(device), cfg.templates, tokenizer, [c.text for c in concepts],
            other, each if openset else None)
    teacher = ClipTeacher(*args).to(device)
    if not any(c.examples for c in concepts):
        return teacher
    rows = fit_example_rows(teacher, concepts)
    if fresh:   # the class targets: a concept by example's prototype, mixed with its text's embedding if it has one
        text_embeddings = rows.mix(text_embeddings.to(device))
    return ClipTeacher(*args[:3], text_embeddings, *args[4:], examples=rows).to(device)


class ExampleRows(torch.nn.Module):
    """Concepts by example on a CLIP teacher. Each is the normalised mean of its examples' image embeddings (flips and
    crops included): a prototype. Image embeddings sit in another cone than text embeddings (the modality gap), so a
    prototype's cosine cannot be read on the text rows' scale: each concept's logit is a calibrated linear map of the
    scaled cosines to the prototypes, ``weight @ (scale * cos) + bias``, fitted (``examples.fit_rows``) to win on its
    examples and to lose on generic images (``examples.generic_images``) against the frozen text rows. A concept with
    a name too is the logsumexp of its text's logit and that row (either may fire), and its synthesis target is the
    normalised sum of its text and image embeddings."""

    def __init__(self, index, named, protos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))
        self.register_buffer("named", torch.as_tensor(named, dtype=torch.bool))
        self.register_buffer("protos", protos.float())
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def rows(self, scaled: torch.Tensor) -> torch.Tensor:
        """Each concept by example's logit [B, E] from scaled normalised image features [B, D]."""
        return (scaled @ self.protos.t()) @ self.weight.t() + self.bias

    def apply(self, logits: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B, K(+1)] with each concept by example's column replaced by (or pooled with) its row
        (matrix products and ``where`` only: the teacher exports to ONNX for its latency baseline)."""
        place = F.one_hot(self.index, logits.shape[1]).to(logits)               # [E, K(+1)]: row e -> its column
        new = self.rows(scaled) @ place                                          # [B, K(+1)], zero elsewhere
        pooled = torch.logsumexp(torch.stack([logits, new]), 0)
        named = (self.named.to(logits) @ place).bool()
        return torch.where(place.sum(0).bool(), torch.where(named, pooled, new), logits)

    def mix(self, targets: torch.Tensor) -> torch.Tensor:
        """Per-class targets [..., K, D] with each concept by example's mixed in: its prototype alone, or the
        normalised sum with its (text) target when it has a name."""
        sel = targets[..., self.index, :]
        mixed = torch.where(self.named[:, None], F.normalize(sel + self.protos, dim=-1), self.protos.expand_as(sel))
        return targets.index_copy(targets.dim() - 2, self.index, mixed)


GENERIC_IMAGES = 64   # generic images (1/f noise) a concept by example must lose on


@torch.no_grad()
def fit_example_rows(teacher: ClipTeacher, concepts) -> ExampleRows:
    """The ``ExampleRows`` of a teacher's concepts by example, fitted on its own embeddings of them."""
    pre = teacher.eval_preprocess()
    index = [k for k, c in enumerate(concepts) if c.examples]
    feats = [teacher.image_features(torch.from_numpy(augmented(concepts[k].examples, pre)).to(teacher.text.device))
             for k in index]
    protos = torch.stack([F.normalize(f.mean(0), dim=-1) for f in feats])
    negatives = teacher.image_features(generic_images(GENERIC_IMAGES, teacher.input_size).to(protos.device))
    frozen_cols = [k for k in range(teacher.outputs) if k not in index]   # the other concepts' texts, "other"

    def frozen(f: torch.Tensor) -> torch.Tensor:   # the teacher has no example rows yet: its plain zero-shot logits
        z = teacher.head_logits(f)
        return z[:, frozen_cols] if frozen_cols else torch.zeros(len(f), 1, device=f.device)
    scaled = [teacher.scale * f @ protos.t() for f in feats + [negatives]]
    fixed = [frozen(f) for f in feats + [negatives]]
    bias0 = fixed[-1].max(1).values.mean() - scaled[-1].mean(0)   # a generic image scores each row as its best frozen one
    weight, bias = fit_rows([x.cpu() for x in scaled[:-1]], scaled[-1].cpu(), [z.cpu() for z in fixed],
                            torch.eye(len(index)), bias0.cpu())
    return ExampleRows(index, [bool(concepts[k].text) for k in index], protos, weight, bias).to(protos.device)


TEACHERS.register("open_clip-config", TeacherFamily(matches=_is_config, build=build_clip_teacher, names=lambda: [],
                                                   check=check_clip, resolve_paths=resolve_clip_paths,
                                                   learns_examples=True))


def register_name_family() -> None:
    """open_clip model names come last in the lookup (after efficientnet-lite* and timm:)."""
    TEACHERS.register("open_clip", TeacherFamily(matches=_is_model_name, build=build_clip_teacher,
                                                 names=lambda: list(_model_names()), check=check_clip,
                                                 resolve_paths=resolve_clip_paths, learns_examples=True))
