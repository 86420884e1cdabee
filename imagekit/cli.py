"""The command line. The only module that prints or exits.

Exit codes: 0 ok, 1 failed, 2 bad usage or invalid recipe, 3 unsafe image,
130 interrupted. Errors print as ``error: MESSAGE`` and ``hint: ...`` on stderr
(and as a JSON object on stdout with ``--json``); a traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click
import yaml
from rich.console import Console

from imagekit import __version__
from imagekit.errors import ImagekitError, RecipeError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


class State:
    def __init__(self, as_json: bool, verbose: int, debug: bool) -> None:
        self.json = as_json
        self.verbose = verbose
        self.debug = debug


def _state() -> State:
    ctx = click.get_current_context()
    obj = ctx.find_object(State)
    return obj if obj is not None else State(False, 0, False)


def emit(data: Any, human: Callable[[], None] | None = None) -> None:
    """Print a result: JSON with --json, else the human rendering."""
    if _state().json or human is None:
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        human()


def fail(exc: ImagekitError) -> NoReturn:
    raise exc


def _report_error(exc: ImagekitError, as_json: bool, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    err_console.print(f"[bold red]error:[/] {exc.message}", markup=True, highlight=False)
    for problem in getattr(exc, "problems", []) or []:
        err_console.print(f"  - {problem}", markup=False)
    if exc.hint:
        err_console.print(f"[yellow]hint:[/] {exc.hint}", markup=True, highlight=False)
    if as_json:
        click.echo(json.dumps({"ok": False, **exc.to_dict()}, indent=2, default=str))
    return exc.exit_code


def _setup_logging(verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    root = logging.getLogger("imagekit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="imagekit")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--debug", is_flag=True, help="Debug logs and tracebacks on errors.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None,
              help="Accelerator for every VM imagekit starts (default: IMAGEKIT_ACCEL or auto).")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, verbose: int, debug: bool, accel: str | None) -> None:
    """Build, customise, convert, check and publish VM disk images for OpenStack."""
    ctx.obj = State(as_json, verbose, debug)
    if accel:
        os.environ["IMAGEKIT_ACCEL"] = accel
    _setup_logging(verbose, debug)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` accepted after the subcommand too (``imagekit doctor --json``)."""

    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            state = ctx.find_object(State)
            if state is not None:
                state.json = True

    return click.option("--json", "as_json_local", is_flag=True, expose_value=False, callback=callback,
                        help="Machine-readable output on stdout.")(f)


# ---------------------------------------------------------------- recipes


@cli.group()
def recipes() -> None:
    """List, show and validate recipes."""


@recipes.command("list")
@json_option
def recipes_list() -> None:
    """List the recipes in the search path (IMAGEKIT_RECIPE_PATH, then recipes/)."""
    from imagekit import recipe as rec

    rows = []
    for name, path, data in rec.list_recipes():
        row: dict[str, Any] = {"name": name, "description": data.get("description"), "method": None,
                               "abstract": bool(data.get("abstract")), "extends": data.get("extends"),
                               "path": str(path), "valid": None}
        if not row["abstract"]:
            try:
                r = rec.load(path)
                row.update(description=r.description, method=r.build.method, valid=True,
                           os=f"{r.os.distro} {r.os.version} {r.os.arch}")
            except RecipeError as exc:
                row.update(valid=False, error=exc.message)
        rows.append(row)

    def human() -> None:
        for r in rows:
            if r["abstract"]:
                continue
            state = "" if r["valid"] else "  (invalid: run 'imagekit recipes validate')"
            out_console.print(f"{r['name']:<22} {r['method'] or '?':<12} {r['description'] or ''}{state}", markup=False)

    emit(rows, human)


@recipes.command("show")
@click.argument("name")
@json_option
def recipes_show(name: str) -> None:
    """Print the resolved recipe NAME (a name or a path), YAML or --json."""
    from imagekit import recipe as rec

    r = rec.load(name)
    data = {"name": r.name, "source": r.source, "digest": r.digest, **r.to_dict()}

    def human() -> None:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)

    emit(data, human)


@recipes.command("validate")
@click.argument("refs", nargs=-1)
@json_option
def recipes_validate(refs: tuple[str, ...]) -> None:
    """Validate recipes (names or paths); all concrete recipes when none are given."""
    from imagekit import recipe as rec

    targets: list[str] = list(refs) or [n for n, _p, d in rec.list_recipes() if not d.get("abstract")]
    if not targets:
        raise UsageError("no recipes found", "add YAML files to recipes/ or set IMAGEKIT_RECIPE_PATH")
    results: list[dict[str, Any]] = []
    for ref in targets:
        try:
            r = rec.load(ref)
            results.append({"recipe": ref, "ok": True, "name": r.name, "source": r.source, "problems": []})
        except RecipeError as exc:
            problems = exc.problems or [exc.message]
            results.append({"recipe": ref, "ok": False, "error": exc.message, "problems": problems, "hint": exc.hint})
    bad = [r for r in results if not r["ok"]]

    def human() -> None:
        for r in results:
            if r["ok"]:
                out_console.print(f"ok      {r['recipe']}", markup=False)
            else:
                out_console.print(f"invalid {r['recipe']}: {r['error']}", markup=False)
                for p in r["problems"]:
                    if p != r["error"]:
                        out_console.print(f"  - {p}", markup=False)

    emit({"ok": not bad, "results": results}, human)
    if bad:
        n = len(bad)
        raise RecipeError(f"{n} of {len(results)} recipe{'s' if len(results) != 1 else ''} invalid",
                          "fix the problems listed above")


# ---------------------------------------------------------------- doctor


@cli.command()
@click.option("--no-appliance", is_flag=True, help="Skip launching the libguestfs appliance (saves ~20 s).")
@click.option("--reprobe", is_flag=True, help="Probe KVM again instead of using the cached result.")
@json_option
def doctor(no_appliance: bool, reprobe: bool) -> None:
    """Report tools, versions, the accelerator in use and guestfs appliance health."""
    from imagekit import doctor as doc

    rep = doc.diagnose(appliance=not no_appliance, probe_cache=not reprobe)

    def human() -> None:
        p = out_console.print
        p("[bold]tools[/]")
        for t in rep.tools:
            mark = "[green]ok[/]     " if t.ok else ("[red]MISSING[/]" if t.required else "[yellow]missing[/]")
            p(f"  {mark} {t.name:<20} {t.version or ''}")
        p("[bold]python packages[/]")
        for k, v in rep.python.items():
            p(f"  {'[green]ok[/]     ' if v else '[yellow]missing[/]'} {k:<20} {v or ''}")
        a = rep.accelerator
        p(f"[bold]accelerator[/] {str(a['accel']).upper()} ({a['reason']}{', cached' if a.get('cached') else ''})")
        dm = "present" if rep.device_mapper else "absent: partitions are attached with offset loop devices"
        p(f"[bold]device-mapper[/] {dm}")
        ap = rep.appliance
        if ap.get("skipped"):
            p("[bold]libguestfs appliance[/] not checked (--no-appliance)")
        elif ap.get("ok"):
            p(f"[bold]libguestfs appliance[/] ok: {ap['libguestfs']}, launched in {ap['launch_seconds']} s ({ap['accel']})")
        else:
            p(f"[bold]libguestfs appliance[/] [red]FAILED[/]: {ap.get('error')}")
        for prob in rep.problems:
            p(f"[red]problem:[/] {prob}")

    emit(rep.to_dict(), human)
    if not rep.ok:
        raise ImagekitError("doctor found problems", "see the list above; 'make setup' installs what is missing")


# ---------------------------------------------------------------- progress


class ProgressBar:
    """A rich progress bar on stderr; silent when stderr is not a TTY or with --json."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.enabled = err_console.is_terminal and not _state().json
        self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(),
                                  TimeElapsedColumn(), console=err_console, transient=True)
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


def _size_option(value: str | None) -> int | None:
    from imagekit.recipe import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"bad size {value!r}: {exc}") from exc


def _human_bytes(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _print_findings(findings: list[dict[str, Any]]) -> None:
    colour = {"reject": "red", "warn": "yellow", "info": "blue"}
    for f in findings:
        sev = f["severity"]
        out_console.print(f"  [{colour.get(sev, 'white')}]{sev:<6}[/] {f['code']:<28} {f['message']}",
                          highlight=False)


# ---------------------------------------------------------------- inspect / check / convert


@cli.command()
@click.argument("image", type=click.Path(dir_okay=True))
@click.option("--deep", is_flag=True, help="Walk every qcow2 table for the allocation summary.")
@json_option
def inspect(image: str, deep: bool) -> None:
    """Describe IMAGE: detected format (never from the extension), sizes, qcow2 details, allocation."""
    from imagekit.inspect import inspect as do_inspect

    data = do_inspect(image, deep=deep)

    def human() -> None:
        p = out_console.print
        p(f"[bold]{data['path']}[/]", highlight=False)
        p(f"  format        {data['format']}" + (f" ({data['subformat']})" if data.get("subformat") else ""))
        p(f"  virtual size  {_human_bytes(data.get('virtual_size'))} ({data.get('virtual_size')} bytes)")
        p(f"  file size     {_human_bytes(data.get('file_size'))}, allocated {_human_bytes(data.get('actual_size'))}")
        if data.get("partition_table"):
            p(f"  partitions    {data['partition_table']}" + (" (hybrid ISO)" if data.get("hybrid") else ""))
        q = data.get("qcow2")
        if isinstance(q, dict):
            feats = q.get("features") or {}
            on = [k for k, v in feats.items() if v is True]
            p(f"  qcow2         v{q.get('version')} (compat {q.get('compat')}), cluster {_human_bytes(q.get('cluster_size'))}, "
              f"compression {q.get('compression_type')}" + (f", features: {', '.join(on)}" if on else ""))
            snaps = q.get("snapshots") or []
            p(f"  snapshots     {len(snaps)}" + (": " + ", ".join(str(s.get('name')) for s in snaps) if snaps else ""))
            p(f"  backing file  {q.get('backing_file') or 'none'}; data file {q.get('data_file') or 'none'}")
        alloc = data.get("allocation")
        if isinstance(alloc, dict):
            p("  allocation    " + ", ".join(f"{k} {_human_bytes(v) if isinstance(v, int) and 'bytes' in k else v}"
                                             for k, v in alloc.items()))
        rej = data.get("rejected")
        if rej:
            p(f"  [red]unsafe[/]        {', '.join(rej) if isinstance(rej, list) else rej}; run 'imagekit check'")

    emit(data, human)


@cli.command("check")
@click.argument("image", type=click.Path(dir_okay=True))
@click.option("--format", "declared", metavar="FMT", help="The format you believe IMAGE has (refused if it differs).")
@click.option("--max-virtual-size", metavar="SIZE", help="Reject images whose virtual size is larger (e.g. 200G).")
@click.option("--shallow", is_flag=True, help="qcow2: header and tables only, do not walk L2 tables and refcounts.")
@json_option
def check_cmd(image: str, declared: str | None, max_virtual_size: str | None, shallow: bool) -> None:
    """Check IMAGE: verdict accept, warn or reject, with every finding. Exit 0 accept/warn, 3 reject, 1 unreadable."""
    from imagekit.check import check
    from imagekit.errors import UnsafeImageError

    v = check(image, declared=declared, max_virtual_size=_size_option(max_virtual_size), deep=not shallow)
    data = v.to_dict()

    def human() -> None:
        colour = {"accept": "green", "warn": "yellow", "reject": "red"}[v.verdict]
        out_console.print(f"[bold {colour}]{v.verdict}[/] {v.path} ({v.format})", highlight=False)
        _print_findings(data["findings"])  # type: ignore[arg-type]

    emit(data, human)
    if not v.ok:
        raise UnsafeImageError(f"{image} is unsafe: {', '.join(c for c in v.codes() if c)}",
                               "do not convert or upload it; 'imagekit check --json' lists every finding")


@cli.command()
@click.argument("source", metavar="INPUT", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output file (default: next to INPUT, new extension).")
@click.option("-O", "--out-format", type=click.Choice(["qcow2", "raw", "vmdk", "vhdx", "vpc"]), default="qcow2",
              show_default=True)
@click.option("--compat", type=click.Choice(["0.10", "1.1"]), default="1.1", show_default=True, help="qcow2 version.")
@click.option("--cluster-size", metavar="SIZE", help="qcow2 cluster size (e.g. 64K, 2M).")
@click.option("--compress", type=click.Choice(["zlib", "zstd"]), help="Compress qcow2 clusters.")
@click.option("--preallocation", type=click.Choice(["off", "metadata", "falloc", "full"]))
@click.option("--keep-snapshots", is_flag=True, help="qcow2 to qcow2: keep internal snapshots.")
@click.option("--max-virtual-size", metavar="SIZE", help="Refuse inputs with a larger virtual size.")
@click.option("--force", is_flag=True, help="Replace an existing output; convert an installer-only ISO.")
@json_option
def convert(source: str, output: str | None, out_format: str, compat: str, cluster_size: str | None,
            compress: str | None, preallocation: str | None, keep_snapshots: bool, max_virtual_size: str | None,
            force: bool) -> None:
    """Convert INPUT (raw, ISO, qcow2, VMDK, VHD, VHDX, VDI) to a verified image, qcow2 by default."""
    from imagekit import convert as conv

    opts = conv.ConvertOptions(out_format=out_format, compat=compat, cluster_size=_size_option(cluster_size),
                               compress=compress, preallocation=preallocation, keep_snapshots=keep_snapshots,
                               force=force, max_virtual_size=_size_option(max_virtual_size))
    with ProgressBar("convert") as bar:
        result = conv.convert(source, output, opts, progress=bar.update)
    data = result.to_dict()

    def human() -> None:
        i, o = result.input, result.output
        p = out_console.print
        p(f"[green]converted[/] {i.path} ({i.format}, {_human_bytes(i.virtual_size)})", highlight=False)
        p(f"       to {o.path} ({o.format}" + (f" compat {o.compat}" if o.compat else "")
          + f", {_human_bytes(o.size)} on disk)", highlight=False)
        p(f"  verdict {result.output_verdict.verdict}, qemu-img check {result.qemu_check}, compare {result.compare}")
        p(f"  sha256  {o.sha256}")
        for note in result.notes:
            p(f"  note: {note}", highlight=False)
        _print_findings([f.to_dict() for f in result.output_verdict.findings if f.severity != "info"])

    emit(data, human)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> NoReturn:
    as_json = False
    debug = False
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="imagekit", standalone_mode=False)
    except ImagekitError as exc:
        sys.exit(_report_error(exc, as_json, debug))
    except click.exceptions.Abort:
        err_console.print("interrupted", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - last resort: no traceback unless --debug
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc}", markup=True, highlight=False)
        err_console.print("[yellow]hint:[/] run again with --debug for the traceback and report it", markup=True)
        sys.exit(EXIT_FAILED)
    sys.exit(EXIT_OK)
