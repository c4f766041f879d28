"""Console output: rich progress for the pipeline, tables, and the one place errors are printed."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from runtime.exports import ExportRecord

console = Console()
err = Console(stderr=True)
for _c in (console, err):  # logs and pipes: wide enough for the tables, not rich's 80 columns
    if not _c.is_terminal:
        _c.width = 120


def literal(value) -> str:
    """Any user-supplied string (a label, a path, a message quoting them) as rich prints it literally: ``[/]`` or
    ``cat [tabby]`` stay what they are instead of being read as markup. The one helper for it."""
    return escape(str(value))


class RichReporter:
    """The pipeline's Reporter, drawn with rich (duck-typed: no import of the pipeline needed)."""

    def __init__(self, quiet: bool = False, out: Console = err):
        self.quiet, self.out = quiet, out

    def log(self, message: str) -> None:
        if not self.quiet:
            self.out.print(f"[dim]{literal(message)}[/dim]")

    def warn(self, message: str) -> None:
        self.out.print(f"[bold yellow]warning:[/bold yellow] {literal(message)}")

    @contextmanager
    def task(self, description: str, total: int):
        if self.quiet:
            yield lambda advance=1, **info: None
            return
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*cols, console=self.out, transient=False) as progress:
            tid = progress.add_task(description, total=total)
            yield lambda advance=1, **info: progress.advance(tid, advance)


def error_line(message: str) -> None:
    """The one formatter for errors the user can fix: ``error: ...`` on one line of stderr."""
    text = " ".join(message.split())   # a message never spans lines, whatever a library put in it
    err.print(f"[bold red]error:[/bold red] {literal(text)}", highlight=False, soft_wrap=True)


def fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def artifacts_table(report: dict) -> Table:
    t = Table(title=f"distiller: {literal(', '.join(report['labels']))}", title_justify="left")
    t.add_column("file", no_wrap=True)
    for col in ("precision", "MB", "vs FP32", "cosine", "vs teacher", "p50 ms"):
        t.add_column(col, justify="right")
    t.add_column("", no_wrap=True)
    exp = ExportRecord.from_json(report["export"], "report.json's export")
    for name, r in exp.variants.items():
        mark = "[bold green]deployable[/bold green]" if name == exp.deployable_variant else ""
        vs_teacher = "-" if r.teacher_agreement is None else f"{100 * r.teacher_agreement:.1f}%"
        t.add_row(literal(r.file), r.precision, f"{r.size_mb:.1f}", f"{100 * r.agreement:.1f}%",
                  f"{r.cosine:.4f}", vs_teacher, fmt_ms(r.latency_ms.p50), mark)
    return t


def eval_table(title: str, results: dict[str, dict]) -> Table:
    t = Table(title=literal(title), title_justify="left")
    for col in ("model", "domain", "n", "accuracy [95% CI]", "balanced [95% CI]"):
        t.add_column(col, justify="right" if col == "n" else "left")
    for model, res in results.items():
        for r in res["rows"]:
            lo, hi = r["accuracy_ci"]
            blo, bhi = r["balanced_ci"]
            t.add_row(literal(model), literal(r["domain"]), str(r["n"]), f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                      f"{100 * r['balanced_accuracy']:.1f} [{100 * blo:.1f}, {100 * bhi:.1f}]")
    return t


def rejection_table(title: str, results: dict[str, dict]) -> Table:
    """``eval --other-data``: per model, AUROC of known against other and how often "other" is answered."""
    t = Table(title=literal(title), title_justify="left")
    for col in ("model", "AUROC [95% CI]", "answers other [95% CI]", "n other"):
        t.add_column(col, justify="right" if col == "n other" else "left")
    for model, res in results.items():
        r = res.get("open_set")
        if r:
            (alo, ahi), (olo, ohi) = r["auroc_ci"], r["other_ci"]
            t.add_row(literal(model), f"{r['auroc']:.3f} [{alo:.3f}, {ahi:.3f}] ({r.get('score', 'probability')})",
                      f"{100 * r['other_accuracy']:.1f} [{100 * olo:.1f}, {100 * ohi:.1f}]", str(r["other_images"]))
    return t


def fit_table(title: str, fits: dict) -> Table:
    """``eval --fit``: per variant, the threshold written and what it keeps and rejects on the fitting images."""
    t = Table(title=literal(title), title_justify="left")
    for col in ("model", "score", "threshold", "known kept", "known balanced (closed-set)", "answers other [95% CI]"):
        t.add_column(col)
    for model, f in fits.items():
        p = f.point
        lo, hi = p.other_ci
        t.add_row(literal(model), f.rule.score, f"{f.rule.threshold:.4g}", f"{100 * p.known_kept:.1f}%",
                  f"{100 * p.known_balanced:.1f} ({100 * p.closed_balanced:.1f})",
                  f"{100 * p.other_answered:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] of {p.other_images}")
    return t
