"""Prompt sources: which (class, style) each surrogate image gets, and its target text embedding.

The synthesizer only sees target embeddings; it never knows how a style was made. A source is
registered by name and built from the teacher, the recipe's ``[prompts]`` slice and the run folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.errors import UserError

from .registry import Registry

PROMPT_SOURCES: Registry = Registry("prompt source")


@dataclass
class PromptSource:
    """Targets for (class, style) pairs. ``num_styles`` >= 1; style names for reports."""

    name: str
    num_styles: int
    style_names: list[str]
    class_targets: torch.Tensor          # [K, D] plain class embeddings

    def targets(self, class_ids: torch.Tensor, style_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@PROMPT_SOURCES.register("plain")
class PlainPrompts(PromptSource):
    """The class prompt ensemble itself: one style, the teacher's zero-shot class embedding."""

    def __init__(self, teacher, cfg, paths=None):
        text = getattr(teacher, "text", None)
        if text is None:
            raise UserError("prompt sources need a CLIP teacher: this teacher has no text embeddings")
        super().__init__("plain", 1, ["plain"], text)

    def targets(self, class_ids, style_ids):
        return self.class_targets[class_ids]


def default_source(teacher) -> str:
    return "plain"


def build_prompt_source(teacher, cfg, paths=None) -> PromptSource:
    name = default_source(teacher) if cfg.source == "auto" else cfg.source
    return PROMPT_SOURCES.get(name)(teacher, cfg, paths)
