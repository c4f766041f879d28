"""``recipes``: what recipes and targets there are."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from . import app
from .ui import console


@app.command()
def recipes():
    """List the recipes and deployment targets."""
    from ..recipe import load_recipe, recipe_names
    from ..students import TARGETS, student_network
    t = Table(title="recipes (--recipe NAME)", title_justify="left")
    for c in ("name", "description", "teacher", "student", "images/class", "steps", "epochs"):
        t.add_column(c)
    for n in recipe_names():
        r = load_recipe(n)   # with its base: every value as a run would use it
        model, size = student_network(r)
        heads = f", head {r.student.head}" if r.student.init == "pretrained" else ""
        t.add_row(n, r.description, r.teacher.model, f"{model} @ {size}px, {r.student.init}{heads}",
                  str(r.synthesis.images_per_class), str(r.synthesis.steps), str(r.distill.epochs))
    console.print(t)
    t = Table(title="targets (--target NAME)", title_justify="left")
    for c in ("name", "scratch student", "pretrained student (offline)", "description"):
        t.add_column(c)
    for n, tg in TARGETS.items():
        t.add_row(n, f"{tg.student} @ {tg.input_size}px", f"{tg.pretrained[0]} @ {tg.pretrained[1]}px", tg.description)
    console.print(t)


@app.command()
def concepts(
    classes: str = typer.Argument(..., help="Comma-separated classes, as for make (label=nXXXXXXXX names a WordNet synset)."),
    teacher: str = typer.Option("efficientnet-lite0", help="An ImageNet-classifier teacher (efficientnet-lite0|1|2, "
                                "timm:NAME), or a CLIP teacher (ViT-B-32, a config .json): then each class's bridge."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="CLIP teachers: an open_clip tag or weights file "
                                             "(default: the cpu recipe's)."),
    all_: bool = typer.Option(False, "--all", help="List every ImageNet class, not the first 10."),
    offline: bool = typer.Option(False, "--offline", help="CLIP teachers: never reach the hub."),
):
    """What each class covers in ImageNet: its WordNet synset and the ImageNet classes beneath it; with a CLIP
    teacher, where each class's student head comes from (wordnet, clip bridge or fresh) and its similarities."""
    from ..concepts import parse_concepts
    from ..imagenet_concepts import map_concepts, warnings_for
    from ..teachers import resolve_family
    from .ui import err, literal
    parsed = parse_concepts(classes, minimum=1)
    if resolve_family(teacher).has_text_tower:
        return _bridges(parsed, teacher, pretrained, all_, offline)
    cov = map_concepts([c for c in parsed if not c.examples])
    t = Table(title=f"concepts for {teacher} (WordNet 3.0 -> ImageNet-1k)", title_justify="left")
    for c in ("class", "synset", "WordNet lemmas", "ImageNet classes", "n"):
        t.add_column(c, justify="right" if c == "n" else "left")
    for c in cov:
        names = c.names()
        shown = ", ".join(names if all_ or len(names) <= 10 else names[:10] + [f"... (+{len(names) - 10}, --all)"])
        t.add_row(literal(c.label), c.synset, ", ".join(c.lemmas[:3]), shown, str(len(c.classes)))
    for c in parsed:
        if c.examples:   # a concept by example: its own row, learnt from the images (docs/examples.md)
            t.add_row(literal(c.label), "examples", "", f"one new row, learnt from the images in {literal(c.examples[0])}", "1")
    console.print(t)
    for w in warnings_for(cov):
        err.print(f"[bold yellow]warning:[/bold yellow] {literal(w)}")


def _bridges(parsed, teacher: str, pretrained: str | None, all_: bool, offline: bool) -> None:
    """The head source of each class for a CLIP teacher, as `make` with the cpu recipe would choose it."""
    import dataclasses

    from ..bridge import class_text_embeddings, decide_heads, fresh_warning
    from ..imagenet_concepts import class_names
    from ..recipe import load_recipe
    from ..teachers import build_teacher, check_teacher
    from .make import _set_env
    from .ui import err, literal
    _set_env(offline, False)
    rec = load_recipe("cpu")
    cfg = dataclasses.replace(rec.teacher, model=teacher, pretrained=pretrained or rec.teacher.pretrained)
    from ..teachers import resolve_paths
    cfg = resolve_paths(cfg)
    check_teacher(cfg, offline)
    with err.status(f"encoding the 1000 ImageNet class names with {teacher} (cached after the first time)"):
        t = build_teacher(cfg, parsed, offline=offline)
        class_emb = class_text_embeddings(t.text_tower, cfg.model, cfg.pretrained, cfg.templates)
    min_sim = rec.student.bridge_min_similarity
    heads = decide_heads(parsed, "auto", t.text, class_emb, t.text_tower.scale, min_sim)
    names = class_names()
    cos = t.text @ class_emb.T
    table = Table(title=f"student heads with {teacher} (cpu recipe: bridge_min_similarity {min_sim:g})", title_justify="left")
    for c in ("class", "source", "ImageNet classes (cosine)", "n", "nearest (cosine)"):
        table.add_column(c, justify="right" if c == "n" else "left")
    for k, h in enumerate(heads):
        limit = len(h.classes) if all_ else 10
        shown = ", ".join(f"{names[i]} {float(cos[k, i]):.2f}" for i in h.classes[:limit])
        if len(h.classes) > limit:
            shown += f", ... (+{len(h.classes) - limit}, --all)"
        near = ", ".join(f"{names[i]} {float(cos[k, i]):.2f}" for i in cos[k].argsort(descending=True)[:3].tolist())
        table.add_row(literal(h.label), h.source, shown or "-", str(len(h.classes)), near)
    console.print(table)
    for h in heads:
        if h.source == "fresh":
            err.print(f"[bold yellow]warning:[/bold yellow] {literal(fresh_warning(h, min_sim))}")
