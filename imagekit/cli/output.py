"""The CLI's one output layer: consoles, the result document, errors, progress.

Every command hands its result to :func:`emit` with a function that renders it for
humans. Without ``--json`` that function runs at once (stdout). With ``--json`` the
result is kept as *the* document and printed once, by ``imagekit.cli.main``, when the
command ends: on success as it is, on failure with the error merged into it (next to
whatever partial result the command emitted before failing). So stdout always holds
exactly one JSON document. Logs, progress bars and status lines go to stderr, and are
silent with ``--json`` or when stderr is not a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import click

from imagekit.errors import ImagekitError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_NO_DOCUMENT = object()


class _LazyConsole:
    """A rich Console made on first use: quick commands do not pay for importing rich (~20 ms)
    unless they print through it."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


err_console: Any = _LazyConsole(stderr=True)
out_console: Any = _LazyConsole(stderr=False)


class State:
    """Per-invocation settings and the result document (``--json``)."""

    def __init__(self, as_json: bool = False, verbose: int = 0, debug: bool = False,
                 accel: str | None = None) -> None:
        self.json = as_json
        self.verbose = verbose
        self.debug = debug
        self.accel = accel
        self.document: Any = _NO_DOCUMENT

    @property
    def has_document(self) -> bool:
        return self.document is not _NO_DOCUMENT


_FALLBACK = State()


def state() -> State:
    """The State of the running command (a default one outside a click context)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(State) if ctx is not None else None
    return obj if obj is not None else _FALLBACK


def current() -> State | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(State) if ctx is not None else None


def emit(data: Any, human: Callable[[], None] | None = None) -> None:
    """Hand over the command's result: kept as the JSON document with --json, else rendered now."""
    st = state()
    if st.json or human is None:
        st.document = data
    else:
        human()


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` accepted after the subcommand too (``imagekit doctor --json``)."""

    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            st = ctx.find_object(State)
            if st is not None:
                st.json = True

    return click.option("--json", "as_json_local", is_flag=True, expose_value=False, callback=callback,
                        help="Machine-readable output on stdout (exactly one JSON document).")(f)


# ---------------------------------------------------------------- result types (the --json contract)

# command path ("check", "cache list") -> the type of its --json result (a dataclass or pydantic model);
# docs/schemas/ is generated from these (imagekit.cli.schemas), so the schema and the code cannot drift.
RESULT_TYPES: dict[str, Any] = {}


def result_type(tp: Any, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the type of a command's ``--json`` result (put it under the ``@cli.command`` decorator).

    ``name`` is the command path ("cache list"); by default the function's name with ``_`` as
    spaces and a trailing ``_cmd`` dropped.
    """

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f.__name__.removesuffix("_cmd").replace("_", " ")
        RESULT_TYPES[key] = tp
        f.__imagekit_result__ = key  # type: ignore[attr-defined]
        return f

    return mark


# ---------------------------------------------------------------- the document


def error_object(exc: ImagekitError) -> dict[str, Any]:
    return {"ok": False, **exc.to_dict()}


def to_jsonable(obj: Any) -> Any:
    """A result as JSON data: pydantic models and dataclasses through pydantic (the same
    serialiser the published schemas come from), ``to_dict()`` where a type has one."""
    import dataclasses

    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from pydantic import TypeAdapter

        return TypeAdapter(type(obj)).dump_python(obj, mode="json")
    return obj


def write_document(doc: Any) -> None:
    click.echo(json.dumps(to_jsonable(doc), indent=2, sort_keys=False, default=str))


def finish_success(st: State | None) -> None:
    if st is not None and st.has_document:
        write_document(st.document)


def finish_failure(st: State | None, as_json: bool, err: dict[str, Any]) -> None:
    """With --json: the document with the error merged in (or the error alone) on stdout."""
    if not as_json:
        return
    doc = to_jsonable(st.document) if st is not None and st.has_document else None
    if isinstance(doc, dict):
        write_document({**doc, **err})
    elif doc is not None:
        write_document({"result": doc, **err})
    else:
        write_document(err)


def report_error(exc: ImagekitError) -> None:
    """``error: MESSAGE``, the problems and ``hint: ...`` on stderr."""
    err_console.print(f"[bold red]error:[/] {exc.message}", markup=True, highlight=False)
    for problem in getattr(exc, "problems", []) or []:
        err_console.print(f"  - {problem}", markup=False)
    if exc.hint:
        err_console.print(f"[yellow]hint:[/] {exc.hint}", markup=True, highlight=False)


# ---------------------------------------------------------------- progress


class ProgressBar:
    """A rich progress bar on stderr; silent when stderr is not a TTY or with --json."""

    def __init__(self, label: str) -> None:
        self.enabled = not state().json and sys.stderr.isatty() and err_console.is_terminal
        self._progress: Any = None
        if self.enabled:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(),
                                      TimeElapsedColumn(), console=err_console.real(), transient=True)
        self._tasks: dict[str, Any] = {}
        self.label = label

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, phase: str, fraction: float) -> None:
        if not self.enabled:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=1.0)
        self._progress.update(self._tasks[phase], completed=max(0.0, min(1.0, fraction)))


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StatusLine:
    """A one-line status on stderr for long work: the stage, what it is doing, the time spent in the
    stage and, when ``estimates`` (stage -> seconds, e.g. the recipe's last build: ``imagekit.timings``)
    knows the stage, that duration and about how much is left. On a TTY a spinner line that keeps
    ticking (rich ``Live`` re-renders it 4 times a second, and at once on every message, so even a
    short stage shows); otherwise plain ``stage: message`` log lines without timings; silent with --json.
    """

    def __init__(self, estimates: Mapping[str, float] | None = None) -> None:
        self.json = state().json
        self.tty = err_console.is_terminal and not self.json
        self.estimates = dict(estimates or {})
        self._live: Any = None
        self._spinner: Any = None
        self.stage = ""
        self.message = "starting"
        self._since = time.monotonic()

    def __enter__(self) -> StatusLine:
        if self.tty:
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", style="status.spinner")
            self._live = Live(self, console=err_console.real(), refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, stage: str, message: str) -> None:
        if stage != self.stage:
            self.stage, self._since = stage, time.monotonic()
        self.message = message
        if self._live is not None:
            self._live.refresh()
        elif not self.json:
            err_console.print(f"{stage}: {message}", markup=False, highlight=False)

    def timing(self, now: float | None = None) -> str:
        """``0:42`` in the stage, with ``(last time 2:10, about 1:28 left)`` when estimated."""
        spent = (time.monotonic() if now is None else now) - self._since
        est = self.estimates.get(self.stage)
        if est is None:
            return clock(spent)
        whole = round(est)
        if int(spent) < whole:
            return f"{clock(spent)} (last time {clock(whole)}, about {clock(whole - int(spent))} left)"
        return f"{clock(spent)} (last time {clock(whole)})"

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        line = Text(self.message) if not self.stage else \
            Text.assemble((self.stage, "bold"), " ", (self.timing(), "cyan"), " ", self.message)
        grid = Table.grid(padding=1)
        grid.add_row(self._spinner or "", line)
        return grid


# ---------------------------------------------------------------- small renderers


def size_option(value: str | None) -> int | None:
    if value is None:
        return None
    from imagekit.specs import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"bad size {value!r}: {exc}") from exc


def human_bytes(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def print_findings(findings: list[dict[str, Any]]) -> None:
    colour = {"reject": "red", "warn": "yellow", "info": "blue"}
    for f in findings:
        sev = f["severity"]
        click.echo(f"  {click.style(f'{sev:<6}', fg=colour.get(sev, 'white'))} {f['code']:<28} {f['message']}")


def print_lint(findings: list[dict[str, Any]]) -> None:
    colour = {"error": "red", "warning": "yellow"}
    for f in findings:
        out_console.print(f"  [{colour.get(f['severity'], 'white')}]{f['severity']:<7}[/] {f['code']} "
                          f"{f['property']}: {f['message']}", highlight=False)
