"""Concepts: the labels the user asked for, and what the teacher reads for each."""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from runtime.atomic import write_text
from runtime.errors import UserError


@dataclass(frozen=True)
class Concept:
    label: str   # as the user typed it; what the exported model answers
    text: str    # what the teacher reads ("a photo of a {text}."); "" for a concept named by its examples alone
    examples: tuple[str, ...] = ()   # its example images: as parsed, the folder or file given after @; in a run
                                     # folder, the copies it keeps (distiller.examples)


@lru_cache(maxsize=1)
def _inflect():
    try:
        import inflect
    except ImportError:  # the runtime-only install never parses concepts
        raise UserError("inflect is not installed: pip install 'distiller[train]'") from None
    return inflect.engine()


def singular(text: str) -> str:
    """English singular of a noun phrase ("cats" -> "cat", "golden retrievers" -> "golden retriever")."""
    words = text.split(" ")
    last = words[-1]
    if len(last) < 3 or not last.isalpha() or last.lower().endswith(("ss", "us", "is")):  # glass, bus, iris
        return text
    single = _inflect().singular_noun(last)
    if single:
        words[-1] = single
    return " ".join(words)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def check_printable(item: str) -> None:
    """Labels are what the model answers and what terminals and JSON show: no control, format
    (zero-width, bidi) or unassigned characters, which make two labels that print alike."""
    bad = next((ch for ch in item if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        name = unicodedata.name(bad, f"U+{ord(bad):04X}")
        raise UserError(f"class {item.encode('unicode_escape').decode()!r} holds an invisible or control character "
                        f"(U+{ord(bad):04X} {name}): type the class names as plain text")


def parse_concepts(spec: str | None = None, file: str | Path | None = None, minimum: int = 2) -> list[Concept]:
    """Concepts from ``--classes a,b`` or a file with one per line; ``label=teacher text`` allowed."""
    if (spec is None) == (file is None):
        raise UserError("name the classes with --classes cats,dogs or --classes-file FILE (one of them)")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"classes file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise UserError(f"classes file {path} is not UTF-8 text: write one class name per line")
        items = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
    else:
        items = spec.split(",")
    concepts, seen = [], {}
    for raw in items:
        item = _norm(raw)
        if not item:
            continue
        check_printable(item)
        examples: tuple[str, ...] = ()
        if "=" in item and "@" in item.split("=", 1)[1]:   # label=@DIR or label=teacher text@DIR
            label, rest = item.split("=", 1)
            text, where = (_norm(s) for s in rest.split("@", 1))
            label = _norm(label)
            if not label or not where:
                raise UserError(f"class {item!r}: write it as label=@FOLDER (example images) or label=teacher text@FOLDER")
            examples = (where,)
        elif "=" in item:
            label, text = (_norm(s) for s in item.split("=", 1))
            if not label or not text:
                raise UserError(f"class {item!r}: write it as label=teacher text, e.g. cats=a tabby cat")
        else:
            label, text = item, singular(item)
        if len(label) > MAX_LABEL:
            raise UserError(f"class {label[:40]!r}... is {len(label)} characters long: keep labels within {MAX_LABEL} "
                            "(put a long description after =, e.g. cats=a tabby cat on a sofa)")
        key = singular(label.lower())
        if key in seen:
            raise UserError(f"classes {seen[key]!r} and {label!r} are the same class: list each class once")
        seen[key] = label
        concepts.append(Concept(label=label, text=text, examples=examples))
    if len(concepts) < minimum:
        raise UserError(f"need at least {minimum} class{'es' if minimum > 1 else ''}, got {len(concepts)}: e.g. --classes cats,dogs")
    return concepts


MAX_LABEL = 100   # characters of a label (the teacher's text after = may be longer)


def save_concepts(concepts: list[Concept], path: Path) -> None:
    """concepts.json; example paths inside the run folder are written relative to it (the folder may move)."""
    root = Path(path).parent.absolute()

    def rel(p: str) -> str:
        return str(Path(p).relative_to(root)) if Path(p).is_absolute() and Path(p).is_relative_to(root) else p
    rows = [{**asdict(c), "examples": [rel(p) for p in c.examples]} for c in concepts]
    write_text(path, json.dumps(rows, indent=1) + "\n")


def load_concepts(path: Path) -> list[Concept]:
    root = Path(path).parent.absolute()
    return [Concept(c["label"], c["text"], tuple(str(root / p) for p in c.get("examples", ())))
            for c in json.loads(Path(path).read_text())]
