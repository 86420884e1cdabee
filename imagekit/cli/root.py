"""The root command group and its global options (``--json``, ``-v``, ``--debug``, ``--accel``)."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from imagekit import __version__
from imagekit.cli.output import State

if TYPE_CHECKING:
    from imagekit.accel import AccelChoice


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record: while a status line shows (rich swaps in a
    proxy), log lines then print above it instead of through it."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    root = logging.getLogger("imagekit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="imagekit")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout (exactly one JSON document).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--debug", is_flag=True, help="Debug logs and tracebacks on errors.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None,
              help="Accelerator for every VM imagekit starts (default: IMAGEKIT_ACCEL or auto).")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, verbose: int, debug: bool, accel: str | None) -> None:
    """Build, customise, convert, check and publish VM disk images for OpenStack."""
    st = ctx.ensure_object(State)
    st.json = st.json or as_json
    st.verbose, st.debug, st.accel = verbose, debug, accel
    setup_logging(verbose, debug)


def accel_choice() -> AccelChoice:
    """The accelerator for this command's VMs, resolved once (``--accel``, else IMAGEKIT_ACCEL, else auto)."""
    from imagekit import accel
    from imagekit.cli.output import state

    return accel.resolve(state().accel)
