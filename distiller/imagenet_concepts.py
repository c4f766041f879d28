"""Concepts for ImageNet-classifier teachers: every ImageNet-1k class under the concept's WordNet synset.

"cats" -> the first noun sense of "cat" -> the 7 classes beneath it (5 domestic cats, cougar,
lynx). ``cat=n02121808`` names a synset exactly (domestic cat: the 5). A class under two
concepts (minivan under car and truck) is an overlap: shown, and left out of both. The mapping
data ships in ``data/imagenet_wordnet.json``; ``data/make_imagenet_wordnet.py`` regenerates it.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runtime.errors import UserError

DATA = Path(__file__).resolve().parent / "data" / "imagenet_wordnet.json"
THIN = 3   # warn below this many classes


@lru_cache(maxsize=1)
def wordnet() -> dict:
    return json.loads(DATA.read_text())


@dataclass(frozen=True)
class Coverage:
    label: str
    synset: str                  # "n02121620"
    lemmas: tuple[str, ...]
    classes: tuple[int, ...]     # ImageNet indices this concept owns (overlaps removed)
    overlaps: tuple[int, ...]    # classes also under another concept, left out

    def names(self, idx=None) -> list[str]:
        classes = wordnet()["classes"]
        return [classes[i]["name"].split(",")[0] for i in (self.classes if idx is None else idx)]


def _synset_of(label: str, text: str) -> str:
    wn = wordnet()
    t = text.strip()
    if re.fullmatch(r"n\d{8}", t):
        if t[1:] not in wn["synsets"]:
            raise UserError(f"{label}: synset {t} has no ImageNet class beneath it: pick a synset that has "
                            f"(`distiller concepts` shows what a word covers)")
        return t[1:]
    key = t.lower()
    senses = wn["lemmas"].get(key) or wn["lemmas"].get(key.replace("-", " "))
    if not senses:
        near = difflib.get_close_matches(key, list(wn["lemmas"]), n=4, cutoff=0.6)
        raise UserError(f"{label}: no WordNet noun {t!r} has ImageNet classes beneath it"
                        + (f": near names: {', '.join(near)}" if near else ": try a broader word"))
    first = senses[0]
    if first not in wn["synsets"]:
        others = [f"n{s} ({', '.join(wn['synsets'][s]['lemmas'][:2])})" for s in senses if s in wn["synsets"]]
        raise UserError(f"{label}: the first WordNet sense of {t!r} has no ImageNet class beneath it; "
                        f"name another sense with {label}=SYNSET: {', '.join(others[:3])}")
    return first


def map_concepts(concepts) -> list[Coverage]:
    """Coverage of each concept, overlaps removed from both sides."""
    out = _coverage([(c.label, _synset_of(c.label, c.text)) for c in concepts])
    empty = [c.label for c in out if not c.classes]
    if empty:
        raise UserError(f"{', '.join(empty)}: every ImageNet class beneath it is also under another class: "
                        f"name a narrower synset (label=nXXXXXXXX)")
    return out


def _coverage(pairs) -> list[Coverage]:
    """(label, synset offset or None) -> Coverage (None where None), overlaps removed from both sides."""
    wn = wordnet()
    sets = [set(wn["synsets"][off]["classes"]) if off else set() for _, off in pairs]
    out = []
    for i, (label, off) in enumerate(pairs):
        others = set().union(*(s for j, s in enumerate(sets) if j != i))
        out.append(None if off is None else Coverage(label, f"n{off}", tuple(wn["synsets"][off]["lemmas"]),
                                                     tuple(sorted(sets[i] - others)), tuple(sorted(sets[i] & others))))
    return out


def map_each(concepts) -> list[Coverage | None]:
    """Coverage of each concept that WordNet maps onto ImageNet (overlaps removed), None for the others: a
    word with no WordNet noun over ImageNet classes, or one whose every class is also another concept's.
    An explicit synset (label=nXXXXXXXX) that maps nowhere is still the user's error."""
    pairs = []
    for c in concepts:
        try:
            pairs.append((c.label, _synset_of(c.label, c.text)))
        except UserError:
            if re.fullmatch(r"n\d{8}", c.text.strip()):
                raise
            pairs.append((c.label, None))
    return [c if c is not None and c.classes else None for c in _coverage(pairs)]


def class_names() -> list[str]:
    """The 1000 ImageNet class names, the first of each class's names ("tabby", "tiger cat", ...)."""
    return [c["name"].split(",")[0] for c in wordnet()["classes"]]


def warnings_for(coverage: list[Coverage]) -> list[str]:
    out = []
    for c in coverage:
        if c.synset == "examples":   # a concept by example: its own row, no WordNet coverage to speak of
            continue
        if len(c.classes) < THIN:
            out.append(f"{c.label}: thin coverage, only {', '.join(c.names())} ({len(c.classes)} ImageNet class"
                       f"{'es' if len(c.classes) > 1 else ''}): the teacher knows little else of it")
        if c.overlaps:
            out.append(f"{c.label}: {', '.join(c.names(c.overlaps))} also under another class: left out of both")
    return out
