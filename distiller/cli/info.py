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
    for c in ("name", "student", "input px", "description"):
        t.add_column(c)
    for n, tg in TARGETS.items():
        t.add_row(n, tg.student, str(tg.input_size), tg.description)
    console.print(t)
