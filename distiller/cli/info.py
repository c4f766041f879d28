"""``recipes``: what recipes and targets there are."""
from __future__ import annotations

import typer
from rich.table import Table

from . import app
from .ui import console


@app.command()
def recipes():
    """List the recipes and deployment targets."""
    from ..recipe import load_recipe, recipe_names
    from ..students import TARGETS
    t = Table(title="recipes (--recipe NAME)", title_justify="left")
    for c in ("name", "description", "teacher", "images/class", "steps", "epochs"):
        t.add_column(c)
    for n in recipe_names():
        r = load_recipe(n)   # with its base: every value as a run would use it
        t.add_row(n, r.description, r.teacher.model, str(r.synthesis.images_per_class), str(r.synthesis.steps),
                  str(r.distill.epochs))
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
    cov = map_concepts(parse_concepts(classes, minimum=1))
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
