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
        self.command: str | None = None  # the command path ("cache list")

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
    """Hand over the command's result: kept for the JSON document with --json (validated against
    the command's declared result type), else rendered now for people."""
    from imagekit.cli import document

    st = state()
    if st.json or human is None:
        ctx = click.get_current_context(silent=True)
        key = getattr(ctx.command.callback, "__imagekit_result__", None) if ctx is not None else None
        st.document = document.normalise(resolve_type(RESULT_TYPES[key]), data) if key in RESULT_TYPES \
            else document.to_jsonable(data)
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

# command path ("check", "cache list") -> the type of its --json result, as "module:Name" references
# ("a:X | b:Y" for a union), imported only when a document is made or the schemas are generated, so
# quick commands do not pay for importing every result type. docs/schemas/ is generated from these
# (imagekit.cli.schemas): the schemas and the code cannot drift.
RESULT_TYPES: dict[str, str] = {}


def result_type(ref: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the type of the ``--json`` result of command ``name`` (put it under ``@cli.command``)."""

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        RESULT_TYPES[name] = ref
        f.__imagekit_result__ = name  # type: ignore[attr-defined]
        return f

    return mark


def resolve_type(ref: str) -> Any:
    """The type a ``result_type`` reference names (a union for ``a:X | b:Y``)."""
    import functools
    import importlib
    import operator

    types = []
    for part in ref.split("|"):
        module, _, attr = part.strip().partition(":")
        types.append(getattr(importlib.import_module(module), attr))
    return functools.reduce(operator.or_, types)


# ---------------------------------------------------------------- the document


def finish_success(st: State) -> None:
    from imagekit.cli import document

    if st.json:
        result = st.document if st.has_document else None
        document.write(document.document(st.command, result, True, None))


def finish_failure(st: State, as_json: bool, error: dict[str, Any], partial: dict[str, Any] | None = None) -> None:
    """With --json: the document (the result produced so far, the error's partial result) with the error."""
    from imagekit.cli import document

    if not as_json:
        return
    result = st.document if st.has_document else None
    body = dict(result) if isinstance(result, dict) else ({} if result is None else {"result": result})
    body.update(partial or {})
    document.write(document.document(st.command, body, False, error))


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
