"""The ``distiller`` command line. One module per command group; commands stay thin.

Heavy libraries (torch, open_clip, timm, openvino) are imported inside commands, so
``distiller --help`` and the runtime-only commands start instantly.

``main`` runs the command itself rather than through click's ``main()``, which would turn Ctrl-C
into an exit code it then drops, and a truncated file's ``EOFError`` into an "abort". Here every
outcome has one place: a ``UserError`` or a usage error is one ``error:`` line and exit 2, Ctrl-C
is exit 130 (SIGTERM 143) with the resume hint as the last line, anything else is a bug with its traceback.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import ExitStack

import typer

try:  # typer vendors click in recent releases; older ones depend on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from runtime.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Distill a vision-language model into a compact, quantized CPU classifier, data-free.")

from . import info, make, models  # noqa: E402  (commands register themselves on app)

INTERRUPTED = "interrupted: run the same command again to resume where it stopped"
ARGS: list[str] = []   # the command line main() is running
HELD = ExitStack()     # what a command holds until main() returns (a run folder's writer lock)


METAVARS = {"images": "DIR", "out": "DIR", "data": "DIR", "other_data": "DIR", "classes_file": "FILE",
            "labels_map": "FILE", "pretrained": "FILE|TAG", "teacher": "NAME", "recipe": "NAME", "name": "NAME",
            "target": "NAME", "set_": "KEY=VALUE", "classes": "A,B,...", "model": "RUN|FILE", "models": "RUN|FILE"}


def _flags_show_no_type(command) -> None:
    """typer's help prints a type beside every option, flags too (``--exist-ok <bool>``), and Python types for
    values (``<list[Path]>``): a flag takes no value, and a value reads as a word (DIR, FILE, NAME)."""
    help_option = command.get_help_option(command.context_class(command))
    for p in [*command.params, *([help_option] if help_option else [])]:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        elif p.metavar is None and p.name and p.param_type_name == "option":
            p.metavar = METAVARS.get(p.name, p.name.upper().rstrip("_"))
        elif p.metavar is None and p.name:   # an argument: its name, as usage shows it
            p.metavar = p.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _flags_show_no_type(sub)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the resume hint), with its own exit code (143)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and formats every user error in one place (one line, exit 2)."""
    from .ui import error_line
    args = sys.argv[1:] if argv is None else list(argv)
    ARGS[:] = args   # what `make --nproc N` relaunches under torchrun
    command = typer.main.get_command(app)
    _flags_show_no_type(command)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        try:
            with command.make_context("distiller", args) as ctx:
                command.invoke(ctx)
        except (KeyboardInterrupt, typer.Abort) as exc:
            from .ui import err
            err.print(INTERRUPTED, highlight=False, soft_wrap=True)
            return 143 if isinstance(exc, Terminated) else 130
    except UserError as exc:
        error_line(str(exc))
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except getattr(click_exc, "NoArgsIsHelpError", ()) as exc:   # click >= 8.2: a bare `distiller`
        exc.show()   # prints the help
        return 0
    except click_exc.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        error_line(exc.format_message() + where)
        return exc.exit_code
    except click_exc.ClickException as exc:
        error_line(exc.format_message())
        return exc.exit_code
    finally:
        HELD.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def run() -> None:  # pragma: no cover
    sys.exit(main())
