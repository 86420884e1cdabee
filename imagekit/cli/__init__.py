"""The command line: the only part of imagekit that prints or exits.

Exit codes: 0 ok, 1 failed, 2 bad usage or invalid recipe, 3 unsafe image, 130
interrupted (143 for SIGTERM, 129 for SIGHUP). Errors print as ``error: MESSAGE`` and
``hint: ...`` on stderr; with ``--json`` stdout holds exactly one JSON document, the
error merged into it on failure; a traceback only with ``--debug``.

One module per command group, all over the shared output layer (``cli/output.py``):
``recipes``, ``images`` (inspect, check, convert), ``publish`` (upload, properties,
images), ``glance`` (the local Glance), ``build`` (build, boot, cache), ``guest``
(customise, guest-inspect), ``doctor``.
"""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import click

from imagekit import signals
from imagekit.cli import build as _build  # noqa: F401 - registers the commands
from imagekit.cli import ci as _ci  # noqa: F401
from imagekit.cli import doctor as _doctor  # noqa: F401
from imagekit.cli import document
from imagekit.cli import glance as _glance  # noqa: F401
from imagekit.cli import guest as _guest  # noqa: F401
from imagekit.cli import images as _images  # noqa: F401
from imagekit.cli import publish as _publish  # noqa: F401
from imagekit.cli import recipes as _recipes  # noqa: F401
from imagekit.cli import snapshot as _snapshot  # noqa: F401
from imagekit.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    State,
    err_console,
    finish_failure,
    finish_success,
    report_error,
)
from imagekit.cli.root import cli
from imagekit.errors import ImagekitError

__all__ = ["cli", "main"]


def _fail(st: State, as_json: bool, code: str, message: str, hint: str | None, exit_code: int) -> NoReturn:
    error = document.error_object({"code": code, "message": message, "hint": hint, "kind": code}, exit_code)
    finish_failure(st, as_json, error)
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    st = State()
    debug = "--debug" in args
    signals.install()
    st.command = document.command_path(cli, args)
    try:
        cli.main(args=args, prog_name="imagekit", standalone_mode=False, obj=st)
    except ImagekitError as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        report_error(exc)
        finish_failure(st, st.json or "--json" in args, document.error_object(exc, exc.exit_code),
                       getattr(exc, "partial", None))
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        err_console.print("interrupted", markup=False)
        code = signals.exit_code_of(exc)
        _fail(st, st.json or "--json" in args, "interrupted", "interrupted", None, code)
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if exc.exit_code == 2 else exc.exit_code
        _fail(st, st.json or "--json" in args, "usage", exc.format_message(), None, code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - last resort: no traceback unless --debug
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc}", markup=True, highlight=False)
        err_console.print("[yellow]hint:[/] run again with --debug for the traceback and report it", markup=True)
        _fail(st, st.json or "--json" in args, "unexpected", f"unexpected {type(exc).__name__}: {exc}",
              "run again with --debug for the traceback and report it", EXIT_FAILED)
    finish_success(st)
    sys.exit(EXIT_OK)
