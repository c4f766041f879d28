"""Where each concept's head on a pretrained student comes from: ImageNet rows it already has, or a new row.

A pretrained student (EfficientNet-Lite) knows the 1000 ImageNet classes. For each concept, in order:

- ``wordnet``: the concept's WordNet synset covers ImageNet classes (``imagenet_concepts``); its head is
  the logsumexp of those classes' rows, the pooling the ImageNet teachers use.
- ``clip``: no WordNet match, but the CLIP teacher's text tower finds ImageNet classes whose prompt
  ensembles sit close to the concept's: the candidates are the classes nearer this concept than every
  other concept, at a cosine of at least ``student.bridge_min_similarity``, and not owned by a ``wordnet``
  concept. Its head is log sum_i w_i exp(z_i) over their rows, w = softmax(logit_scale x cosine).
- ``fresh``: neither; a new row, learnt from the bank (and ``--images``), linear probe first.

One model mixes the three. The 1000 classes' text embeddings (their prompt ensembles under the recipe's
templates) are cached per teacher, weights and templates in the user's cache (``class_text_embeddings``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.atomic import write_json
from runtime.errors import UserError

from .imagenet_concepts import class_names, map_each
from .teachers.textsplice import SplicedText
from .torchfiles import load_torch, save_torch

SHOWN = 5   # nearest classes kept per concept for display (distiller concepts, report.json)


@dataclass(frozen=True)
class HeadSource:
    """One concept's head: its source, the ImageNet rows pooled (none for ``fresh``), their log weights in
    the pool (0 for ``wordnet``: a plain logsumexp), and for CLIP-scored concepts the cosines of the pooled
    classes (``clip``) or of the nearest ones, for the record (``fresh``: why none qualified)."""
    label: str
    source: str
    classes: tuple[int, ...] = ()
    log_weights: tuple[float, ...] = ()
    similarity: tuple[float, ...] = ()          # ``clip``: the cosine of each pooled class
    nearest: tuple[int, ...] = ()               # CLIP-scored concepts: the nearest classes, whatever their owner
    nearest_similarity: tuple[float, ...] = ()
    row: tuple[float, ...] = ()                 # ``examples``: the student's row for it, a probe on its own features
    row_bias: float = 0.0
    examples: int = 0                           # ``examples``: how many example images define it

    def to_json(self) -> dict:
        names = class_names()
        out = {"source": self.source, "classes": [names[i] for i in self.classes], "indices": list(self.classes)}
        if self.source == "clip":
            out["similarity"] = round(max(self.similarity), 4)
            out["weights"] = [round(math.exp(w), 4) for w in self.log_weights]
            out["similarities"] = [round(s, 4) for s in self.similarity]
        else:
            out["similarity"] = None
        if self.nearest:
            out["nearest"] = {names[i]: round(s, 4) for i, s in zip(self.nearest, self.nearest_similarity)}
        if self.source == "examples":
            out["examples"] = self.examples
        return out


def save_heads(heads: list[HeadSource], path: Path) -> None:
    write_json(path, [asdict(h) for h in heads])


def load_heads(path: Path) -> list[HeadSource]:
    return [HeadSource(**{k: tuple(v) if isinstance(v, list) else v for k, v in h.items()})
            for h in json.loads(Path(path).read_text())]


def wordnet_heads(concepts) -> list[HeadSource | None]:
    """The ``wordnet`` source of each concept WordNet maps onto ImageNet, None for the others."""
    return [None if c is None else HeadSource(c.label, "wordnet", c.classes, (0.0,) * len(c.classes))
            for c in map_each(concepts)]


def bridge(concept_emb, class_emb, scale: float, min_similarity: float, candidates: list[bool], owned=()) -> list[dict]:
    """The CLIP bridge of each concept with ``candidates[k]``: its ImageNet classes (nearer it than every
    other concept, cosine >= ``min_similarity``, not in ``owned``), their log pool weights and cosines, and
    its nearest classes. ``concept_emb`` [K, D] and ``class_emb`` [C, D] are normalised embeddings."""
    import torch
    cos = concept_emb.float() @ class_emb.float().T                 # [K, C]
    k = len(cos)
    # strictly nearer this concept than each of the others (a tie belongs to neither)
    exclusive = torch.stack([cos[i] > torch.cat([cos[:i], cos[i + 1:]]).amax(0) for i in range(k)]) if k > 1 else \
        torch.ones_like(cos, dtype=torch.bool)
    free = torch.ones(cos.shape[1], dtype=torch.bool)
    free[list(owned)] = False
    out = []
    for i in range(k):
        order = cos[i].argsort(descending=True)
        top = [int(j) for j in order[:SHOWN]]
        if not candidates[i]:
            out.append(None)
            continue
        keep = exclusive[i] & free & (cos[i] >= min_similarity)
        idx = [int(j) for j in order if keep[j]]
        sims = cos[i, idx]
        logw = torch.log_softmax(scale * sims, 0) if idx else sims
        out.append({"classes": tuple(idx), "log_weights": tuple(float(x) for x in logw),
                    "similarity": tuple(float(x) for x in sims), "nearest": tuple(top),
                    "nearest_similarity": tuple(float(cos[i, j]) for j in top)})
    return out


def decide_heads(concepts, head: str = "auto", text_emb=None, class_emb=None, scale: float = 100.0,
               min_similarity: float = 0.0) -> list[HeadSource]:
    """Each concept's head source. ``head``: auto (a concept by example's probe row; WordNet, else the CLIP bridge
    when ``text_emb`` and ``class_emb`` are given, else fresh), imagenet (the same, a fresh concept is an error),
    fresh (all, concepts by example too: every row is learnt from the teacher's labels of the transfer set, e.g. an
    ``--images`` pool the teacher labels with what it learnt from the examples)."""
    if head == "fresh":
        return [HeadSource(c.label, "fresh") for c in concepts]
    named = [c for c in concepts if not c.examples]
    found = iter(wordnet_heads(named))
    heads = [HeadSource(c.label, "examples", examples=len(c.examples)) if c.examples else next(found) for c in concepts]
    if text_emb is not None and any(h is None for h in heads):
        owned = {i for h in heads if h is not None for i in h.classes}   # (concepts by example own none)
        found = bridge(text_emb, class_emb, scale, min_similarity, [h is None for h in heads], owned)
        for k, (h, b) in enumerate(zip(heads, found)):
            if h is None:
                source = "clip" if b["classes"] else "fresh"
                heads[k] = HeadSource(concepts[k].label, source, **b)
    heads = [h or HeadSource(c.label, "fresh") for h, c in zip(heads, concepts)]
    fresh = [h.label for h in heads if h.source == "fresh"]
    if head == "imagenet" and fresh:
        raise UserError(f"student.head = imagenet: {', '.join(fresh)} has no ImageNet classes (no WordNet match"
                        f"{', no CLIP neighbour' if text_emb is not None else ''}): use student.head = auto (a fresh row for it)")
    return heads


def fresh_warning(h: HeadSource, min_similarity: float, asked: bool = False) -> str:
    """The loud warning for a concept whose head must be learnt from scratch (``asked``: student.head = fresh)."""
    if asked:
        return (f"{h.label}: student.head = fresh, so its head is learnt from scratch. Give real, unlabelled photos "
                f"with --images DIR, or expect surrogate-only quality for {h.label}")
    near = ""
    if h.nearest:
        near = (f" (nearest ImageNet class {class_names()[h.nearest[0]]!r} at cosine {h.nearest_similarity[0]:.2f}, "
                f"below student.bridge_min_similarity {min_similarity:g}, or nearer another class)")
    return (f"{h.label}: no ImageNet class the student knows matches it{near}: its head is learnt from scratch. "
            f"Give real, unlabelled photos with --images DIR, or expect surrogate-only quality for {h.label}")


# the 1000 ImageNet classes' prompt ensembles, cached per teacher, weights and templates

def cache_dir() -> Path:
    """``$DISTILLER_CACHE``, else ``$XDG_CACHE_HOME/distiller``, else ``~/.cache/distiller``."""
    if os.environ.get("DISTILLER_CACHE"):
        return Path(os.environ["DISTILLER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distiller"


def _file_id(path: str) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(model: str, weights: str, templates) -> dict:
    """What the cached embeddings depend on: the model (a config file by content), the weights (a file by
    path, size and modification time; a tag by name), the templates and the class names."""
    model_id = (hashlib.sha256(Path(model).read_bytes()).hexdigest() if model.endswith(".json") and Path(model).is_file()
                else model)
    weights_id = _file_id(weights) if Path(weights).is_file() else weights
    names = hashlib.sha256("\n".join(class_names()).encode()).hexdigest()
    return {"model": model_id, "weights": weights_id, "templates": list(templates), "classes": names}


def class_text_embeddings(tower, model: str, weights: str, templates, device="cpu", on_template=None,
                          folder: Path | None = None):
    """[1000, D]: each ImageNet class's normalised mean of its normalised template embeddings, from the cache
    when this teacher, weights and templates made it before; else encoded (truncated to the longest prompt,
    which is exact under the causal mask) and cached. ``on_template()`` after each template's 1000 prompts."""
    import torch
    import torch.nn.functional as F

    key = cache_key(model, weights, templates)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = (folder or cache_dir()) / "imagenet_text" / f"{digest}.pt"
    if path.exists():
        data = load_torch(path)
        if data.get("key") == json.dumps(key, sort_keys=True):
            return data["embeddings"].to(device)
    text = SplicedText(tower.model, tower.tokenizer)
    names = class_names()
    acc = None
    with torch.no_grad():
        for t in templates:
            parts = []
            for i in range(0, len(names), 250):
                tokens = text.tokens([t.format(n) for n in names[i:i + 250]])
                parts.append(F.normalize(text.encode(tokens).float(), dim=-1))
            emb = torch.cat(parts)
            acc = emb if acc is None else acc + emb
            if on_template:
                on_template()
    out = F.normalize(acc / len(templates), dim=-1).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch({"key": json.dumps(key, sort_keys=True), "embeddings": out}, path)
    return out.to(device)
