"""``recipes``: what recipes and targets there are."""
from __future__ import annotations

import typer
from rich.table import Table

from . import app
from .ui import console


@app.command()
def recipes():
    """List the recipes and deployment targets."""
    import tomllib

    from ..recipe import find_recipe, recipe_names
    from ..students import TARGETS
    t = Table(title="recipes (--recipe NAME)", title_justify="left")
    for c in ("name", "description", "images/class", "steps", "epochs"):
        t.add_column(c)
    for n in recipe_names():
        p = find_recipe(n)
        d = tomllib.loads(p.read_text())
        t.add_row(n, d.get("description", ""), str(d.get("synthesis", {}).get("images_per_class", "")),
                  str(d.get("synthesis", {}).get("steps", "")), str(d.get("distill", {}).get("epochs", "")))
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
    teacher: str = typer.Option("efficientnet-lite0", help="An ImageNet-classifier teacher (efficientnet-lite0|1|2, timm:NAME)."),
    all_: bool = typer.Option(False, "--all", help="List every ImageNet class, not the first 10."),
):
    """What each class covers in ImageNet: its WordNet synset and the ImageNet classes beneath it."""
    from ..concepts import parse_concepts
    from ..imagenet_concepts import map_concepts, warnings_for
    from ..teachers import resolve_family
    from .ui import err, escape
    if resolve_family(teacher).styles:
        from runtime.errors import UserError
        raise UserError(f"concepts maps classes for ImageNet-classifier teachers; {teacher!r} is not one: "
                        f"a CLIP teacher reads the class text itself")
    cov = map_concepts(parse_concepts(classes))
    t = Table(title=f"concepts for {teacher} (WordNet 3.0 -> ImageNet-1k)", title_justify="left")
    for c in ("class", "synset", "WordNet lemmas", "ImageNet classes", "n"):
        t.add_column(c, justify="right" if c == "n" else "left")
    for c in cov:
        names = c.names()
        shown = ", ".join(names if all_ or len(names) <= 10 else names[:10] + [f"... (+{len(names) - 10}, --all)"])
        t.add_row(c.label, c.synset, ", ".join(c.lemmas[:3]), shown, str(len(c.classes)))
    console.print(t)
    for w in warnings_for(cov):
        err.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}")
