"""The ``distiller`` command line. One module per command group; commands stay thin.

Heavy libraries (torch, open_clip, timm, openvino) are imported inside commands, so
``distiller --help`` and the runtime-only commands start instantly.
"""
from __future__ import annotations

import sys

import typer

try:  # typer vendors click in recent releases; older ones depend on it
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

from runtime.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Distill a vision-language model into a compact, quantized CPU classifier, data-free.")

from . import info, make, models  # noqa: E402  (commands register themselves on app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and formats every user error in one place (one line, exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        from .ui import err, escape
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        from .ui import err
        err.print("interrupted: run the same command again to resume where it stopped")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


def run() -> None:  # pragma: no cover
    sys.exit(main())
