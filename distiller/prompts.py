"""Prompt sources: which (class, style) each surrogate image gets, and its target text embedding.

The synthesizer only sees target embeddings; it never knows how a style was made. Sources are
registered by name and built from the teacher, the recipe's ``[prompts]`` slice and the run
folder (where learned styles are kept for resume).

- ``plain``: the class prompt ensemble, no style slot.
- ``mix`` (Mix-Prompt): each pseudo-word is a Dirichlet-weighted mix of the token embeddings of
  a few real style words (``data/style_words.txt``).
- ``random`` (Random-Prompt): pseudo-words drawn from a Gaussian fitted to the token-embedding
  table, a fresh draw for every synthesis batch.
- ``contrastive`` (Contrastive-Prompt): pseudo-words learned through the frozen text encoder
  for style diversity (InfoNCE against the styles already learned) and class consistency
  (the styled class prompt must classify as its class among the plain class embeddings).

The paper's (Xuan et al., ACM MM 2023) full text and code were not reachable when this was
written: these follow its abstract and the closest published mechanism (PromptStyler, ICCV 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.errors import UserError
from runtime.registry import Registry

from .teachers.textsplice import SplicedText
from .torchfiles import load_torch, save_torch

PROMPT_SOURCES: Registry = Registry("prompt source")
STYLE_WORDS = Path(__file__).resolve().parent / "data" / "style_words.txt"
DEFAULT_STYLES = 8


@dataclass
class PromptSource:
    """Targets for (class, style) pairs; ``class_targets`` are the plain class embeddings [K, D]."""

    name: str
    num_styles: int
    style_names: list[str]
    class_targets: torch.Tensor
    styled = False     # whether images differ by style (a pseudo-word slot in the prompt)

    @classmethod
    def training_steps(cls, cfg) -> int:
        """Optimisation steps the source spends before it can give targets (0: nothing to learn)."""
        return 0

    def targets(self, class_ids: torch.Tensor, style_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@PROMPT_SOURCES.register("plain")
class PlainPrompts(PromptSource):
    def __init__(self, teacher, cfg, paths=None, seed: int = 0, on_step=None):
        if teacher.text is None:
            raise UserError("prompt sources need a CLIP teacher: this teacher has no text embeddings")
        super().__init__("plain", 1, ["plain"], teacher.text)

    def targets(self, class_ids, style_ids, generator=None):
        return self.class_targets[class_ids]


@PROMPT_SOURCES.register("classes")
class ClassPrompts(PromptSource):
    """For ImageNet-classifier teachers: each image's target is one ImageNet class beneath its concept,
    drawn with the batch's generator (the concept's classes take turns across the bank)."""

    def __init__(self, teacher, cfg, paths=None, seed: int = 0, on_step=None):
        if teacher.members is None:
            raise UserError("--prompts classes is for ImageNet-classifier teachers: use auto")
        self.members = teacher.members
        super().__init__("classes", 1, ["plain"], None)

    def targets(self, class_ids, style_ids, generator=None):
        g = generator or torch.Generator().manual_seed(0)
        picks = torch.randint(0, 2**31 - 1, (len(class_ids),), generator=g)
        return torch.stack([self.members[int(c)][int(p) % len(self.members[int(c)])] for c, p in zip(class_ids, picks)])


class StyledPrompts(PromptSource):
    """Sources whose styles are pseudo-words spliced into ``cfg.template``."""

    styled = True

    def __init__(self, name, teacher, cfg, pseudo: torch.Tensor | None, style_names: list[str]):
        self.splice = _splice(teacher, name)
        self.cfg, self.scale = cfg, teacher.text_tower.scale
        self.mix_examples = teacher.text_tower.mix_examples
        self.class_texts = list(teacher.text_tower.class_texts)
        self.class_tokens = self.splice.tokens([cfg.template.format(style="*", cls=t) for t in self.class_texts])
        self.style_tokens = self.splice.tokens([cfg.style_template.format(style="*")])
        super().__init__(name, len(style_names), style_names, teacher.text)
        self.pseudo = pseudo
        self.table = self.encode_pairs(pseudo) if pseudo is not None else None

    def encode_pairs(self, pseudo: torch.Tensor) -> torch.Tensor:
        """Normalised features of every (style, class) prompt: [S, K, D]; a concept by example's are its image
        prototype (mixed with its styled text when it has a name: ``TextTower.mix_examples``)."""
        s, k = pseudo.shape[0], len(self.class_texts)
        with torch.no_grad():
            f = self.splice.encode(self.class_tokens.repeat(s, 1), pseudo.repeat_interleave(k, 0))
        f = F.normalize(f.float(), dim=-1).view(s, k, -1)
        return f if self.mix_examples is None else self.mix_examples(f)

    def style_features(self, pseudo: torch.Tensor) -> torch.Tensor:
        """Normalised features of "a [S] style of a" for each pseudo-word: [S, D]."""
        f = self.splice.encode(self.style_tokens.expand(pseudo.shape[0], -1), pseudo)
        return F.normalize(f.float(), dim=-1)

    def targets(self, class_ids, style_ids, generator=None):
        return self.table[style_ids, class_ids]


def _splice(teacher, name: str):
    tower = teacher.text_tower
    if tower is None:
        raise UserError(f"--prompts {name} needs a CLIP teacher; styles do not apply to this teacher: use --prompts plain")
    return SplicedText(tower.model, tower.tokenizer)


def _num_styles(cfg) -> int:
    return cfg.styles or DEFAULT_STYLES


def read_style_words(path: Path = STYLE_WORDS) -> list[str]:
    return [w.strip() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]


@PROMPT_SOURCES.register("mix")
class MixPrompts(StyledPrompts):
    def __init__(self, teacher, cfg, paths=None, seed: int = 0, on_step=None):
        words = read_style_words()
        splice = _splice(teacher, "mix")
        emb = torch.stack([splice.word_embedding(w) for w in words])
        g = torch.Generator().manual_seed(seed)
        pseudo, names = [], []
        for _ in range(_num_styles(cfg)):
            pick = torch.randperm(len(words), generator=g)[:cfg.mix_words]
            w = torch._standard_gamma(torch.ones(len(pick)), generator=g)
            w = w / w.sum()
            pseudo.append((w.to(emb.device)[:, None] * emb[pick]).sum(0))
            names.append(" + ".join(f"{float(x):.2f} {words[int(i)]}" for x, i in zip(w, pick)))
        super().__init__("mix", teacher, cfg, torch.stack(pseudo), names)


@PROMPT_SOURCES.register("random")
class RandomPrompts(StyledPrompts):
    def __init__(self, teacher, cfg, paths=None, seed: int = 0, on_step=None):
        n = _num_styles(cfg)
        super().__init__("random", teacher, cfg, None, [f"random-{i}" for i in range(n)])
        table = self.splice.table.float()
        self.mean, self.std = table.mean(0), table.std(0)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(n, self.splice.dim, generator=generator).to(self.mean.device)
        return self.mean + self.std * eps

    def targets(self, class_ids, style_ids, generator=None):
        """A fresh draw of ``num_styles`` pseudo-words for every batch (seeded by the batch)."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.pseudo = self.draw(self.num_styles, generator)
        return self.encode_pairs(self.pseudo)[style_ids, class_ids]


@PROMPT_SOURCES.register("contrastive")
class ContrastivePrompts(StyledPrompts):
    def __init__(self, teacher, cfg, paths=None, seed: int = 0, on_step=None):
        n = _num_styles(cfg)
        super().__init__("contrastive", teacher, cfg, None, [f"style-{i}" for i in range(n)])
        key = {"source": "contrastive", "styles": n, "template": cfg.template, "style_template": cfg.style_template,
               "steps": cfg.train_steps, "lr": cfg.lr, "diversity_weight": cfg.diversity_weight,
               "consistency_weight": cfg.consistency_weight, "seed": seed, "classes": self.class_texts}
        path = paths.styles if paths is not None else None
        saved = load_torch(path) if path is not None and Path(path).exists() else None
        if saved is not None and saved.get("key") == key:
            pseudo, self.history = saved["pseudo"].to(self.splice.device), saved["history"]
        else:
            pseudo, self.history = self.learn(n, torch.Generator().manual_seed(seed), on_step)
            if path is not None:
                save_torch({"key": key, "pseudo": pseudo.cpu(), "history": self.history}, Path(path))
        self.pseudo = pseudo
        self.table = self.encode_pairs(pseudo)

    @classmethod
    def training_steps(cls, cfg) -> int:
        return _num_styles(cfg) * cfg.train_steps

    def learn(self, n: int, generator: torch.Generator, on_step=None):
        """Learn ``n`` pseudo-words one after another; returns them and per-style loss history."""
        cfg = self.cfg
        table = self.splice.table.float()
        mean, std = table.mean(0), table.std(0)
        k = len(self.class_texts)
        # class consistency over the concepts with a text (a concept by example alone has no styled text to keep on-class)
        named = torch.tensor([i for i, t in enumerate(self.class_texts) if t], dtype=torch.long, device=mean.device)
        learned, feats, history = [], [], []
        for s in range(n):
            w = (mean + std * torch.randn(self.splice.dim, generator=generator).to(mean.device)).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            for step in range(cfg.train_steps):
                f = self.style_features(w[None])
                div = torch.zeros((), device=w.device)
                if feats:
                    # InfoNCE with the style as its own positive and earlier styles as negatives
                    sims = torch.cat([torch.ones(1, device=w.device), (f @ torch.cat(feats).t())[0]])
                    div = torch.logsumexp(sims / cfg.diversity_temperature, 0) - 1 / cfg.diversity_temperature
                g = F.normalize(self.splice.encode(self.class_tokens, w[None].expand(k, -1)).float(), dim=-1)
                cons = F.cross_entropy(self.scale * g[named] @ self.class_targets.float().t(), named) if len(named) \
                    else torch.zeros((), device=w.device)
                loss = cfg.diversity_weight * div + cfg.consistency_weight * cons
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if on_step:
                    on_step(s, step)
            with torch.no_grad():
                feats.append(self.style_features(w[None].detach()))
            learned.append(w.detach())
            history.append({"style": s, "diversity": div.item(), "consistency": cons.item()})
        return torch.stack(learned), history


UNSTYLED = ("auto", "plain", "classes")


def check_source(cfg, styles: bool) -> None:
    """The recipe's prompt source exists and fits a teacher with (``styles``) or without a text tower."""
    if cfg.source != "auto":
        PROMPT_SOURCES.get(cfg.source)
    if not styles and cfg.source not in UNSTYLED:
        raise UserError(f"--prompts {cfg.source}: prompt styles do not apply to ImageNet-classifier teachers: use --prompts auto")


def source_name(cfg, styles: bool) -> str:
    """The source the ``[prompts]`` slice names for a teacher with (``styles``) or without a text tower:
    ``auto`` is contrastive for CLIP and the member ImageNet classes for a classifier."""
    if not styles:
        check_source(cfg, styles=False)
        return "classes"
    return "contrastive" if cfg.source == "auto" else cfg.source


def source_class(cfg, styles: bool) -> type[PromptSource]:
    """The class of that source: what it costs (``training_steps``), whether it is ``styled``."""
    return PROMPT_SOURCES.get(source_name(cfg, styles))


def build_prompt_source(teacher, cfg, paths=None, seed: int = 0, on_step=None) -> PromptSource:
    """The source the recipe's ``[prompts]`` slice names; ``on_step(style, step)`` reports style learning."""
    return source_class(cfg, teacher.text_tower is not None)(teacher, cfg, paths, seed, on_step=on_step)


@torch.no_grad()
def style_diversity(source: StyledPrompts, pseudo: torch.Tensor | None = None) -> float:
    """Mean pairwise cosine between the style features "a [S] style of a" (lower: more diverse)."""
    p = source.pseudo if pseudo is None else pseudo
    f = source.style_features(p)
    n = f.shape[0]
    if n < 2:
        return 1.0
    sim = f @ f.t()
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def class_consistency(source: StyledPrompts, pseudo: torch.Tensor | None = None) -> float:
    """Share of styled class prompts that classify as their class among the plain class embeddings."""
    table = source.encode_pairs(source.pseudo if pseudo is None else pseudo)   # [S, K, D]
    pred = (table @ source.class_targets.float().t()).argmax(-1)
    return float((pred == torch.arange(table.shape[1], device=pred.device)).float().mean())
