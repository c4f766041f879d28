"""CLIP teachers through open_clip: model-config JSON paths and open_clip model names."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.errors import UserError

from . import TEACHERS, TeacherFamily

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

    def __init__(self, model, model_name: str, weights: str, text_embeddings: torch.Tensor, templates):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name, self.weights, self.templates = model_name, weights, tuple(templates)
        pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        size = pp.get("size", model.visual.image_size)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = pp.get("interpolation", "bicubic")
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1))
        self.scale = float(model.logit_scale.exp().clamp(max=100))

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = (images - self._mean) / self._std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.image_features(images) @ self.text.t()

    def synthesis_loss(self, images: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor, cfg) -> torch.Tensor:
        """Per image: 1 - cosine to its target (prompt) embedding, plus ``cfg.class_weight`` x the
        cross-entropy of the zero-shot head against its class (keeps styled images on-class)."""
        feats = self.image_features(images)
        loss = 1 - (feats * F.normalize(targets.float(), dim=-1)).sum(-1)
        if cfg.class_weight:
            loss = loss + cfg.class_weight * F.cross_entropy(self.scale * feats @ self.text.t(), classes, reduction="none")
        return loss

    def describe(self) -> dict:
        return {"family": "open_clip", "model": self.model_name, "weights": self.weights,
                "input_size": self.input_size, "templates": list(self.templates)}


@torch.no_grad()
def encode_class_texts(model, tokenizer, concepts, templates, device="cpu") -> torch.Tensor:
    """Per concept, the normalised mean of its template embeddings: [K, D]."""
    out = []
    for c in concepts:
        tokens = tokenizer([t.format(c.text) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
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


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_weights(name: str, pretrained: str, offline: bool = False):
    """(open_clip module, model name) after checking that the weights can be had; registers config JSONs."""
    open_clip = _open_clip(offline or os.environ.get("HF_HUB_OFFLINE") == "1")
    if _is_config(name):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"teacher config {path} does not exist: pass an open_clip model-config .json or model name")
        open_clip.add_model_config(path)
        name = path.stem
    if _looks_like_file(pretrained):
        if not Path(pretrained).is_file():
            raise UserError(f"teacher weights file {pretrained} does not exist: check --pretrained PATH")
        return open_clip, name
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        hint = f"known tags: {', '.join(tags)}" if tags else "it has no published weights"
        raise UserError(f"no pretrained weights {pretrained!r} for {name} ({hint}): pass --pretrained FILE or a known tag")
    if not _cached(open_clip, name, pretrained):
        if offline or os.environ.get("HF_HUB_OFFLINE") == "1" or not _online():
            raise UserError(
                f"teacher weights {name}/{pretrained} are not in the local cache and the hub cannot be reached: "
                f"pass --pretrained FILE with a downloaded open_clip checkpoint"
            )
    return open_clip, name


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
        raise UserError(f"weights {pretrained} do not fit teacher {name}: {str(exc).splitlines()[0][:160]}") from None
    return model, open_clip.get_tokenizer(name), name


def build_clip_teacher(cfg, concepts, device="cpu", offline=False, text_embeddings=None) -> ClipTeacher:
    model, tokenizer, name = load_open_clip(cfg.model, cfg.pretrained, device=device, offline=offline)
    model.eval()
    if text_embeddings is None:
        text_embeddings = encode_class_texts(model, tokenizer, concepts, cfg.templates, device)
    teacher = ClipTeacher(model, name, cfg.pretrained, text_embeddings.to(device), cfg.templates).to(device)
    teacher.tokenizer = tokenizer
    teacher.class_texts = [c.text for c in concepts]
    return teacher


TEACHERS.register("open_clip-config", TeacherFamily(matches=_is_config, build=build_clip_teacher, names=lambda: [], check=check_clip))


def register_name_family() -> None:
    """open_clip model names come last in the lookup (after efficientnet-lite* and timm:)."""
    TEACHERS.register("open_clip", TeacherFamily(matches=_is_model_name, build=build_clip_teacher,
                                                 names=lambda: list(_model_names()), check=check_clip))
