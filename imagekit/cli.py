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
from typing import TYPE_CHECKING, Any, NoReturn

import click

from imagekit import __version__, signals
from imagekit.errors import ImagekitError, RecipeError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _LazyConsole:
    """A rich Console made on first use: ``imagekit check`` and other quick commands do not pay for
    importing rich (~20 ms) unless they print through it."""

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
        import yaml

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
        self.enabled = not _state().json and sys.stderr.isatty() and err_console.is_terminal
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


def _size_option(value: str | None) -> int | None:
    if value is None:
        return None
    from imagekit.recipe import parse_size

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
        click.echo(f"  {click.style(f'{sev:<6}', fg=colour.get(sev, 'white'))} {f['code']:<28} {f['message']}")


# ---------------------------------------------------------------- inspect / check / convert


@cli.command()
@click.argument("image", type=click.Path(dir_okay=True))
@click.option("--deep", is_flag=True, help="Walk every qcow2 table for the allocation summary.")
@click.option("--guest", is_flag=True, help="Look inside (libguestfs): OS, kernels, agents, packages.")
@click.option("--sbom", type=click.Choice(["cyclonedx", "spdx"]), help="With --guest: print an SBOM of the packages.")
@json_option
@click.pass_context
def inspect(ctx: click.Context, image: str, deep: bool, guest: bool, sbom: str | None) -> None:
    """Describe IMAGE: detected format (never from the extension), sizes, qcow2 details, allocation.

    With --guest, what is inside: OS, version, kernels, boot loader, cloud-init and
    qemu-guest-agent, the installed packages (as an SBOM with --sbom)."""
    from imagekit.inspect import inspect as do_inspect

    if guest or sbom:
        ctx.invoke(guest_inspect_cmd, image=image, sbom=sbom)
        return

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
        click.echo(f"{click.style(v.verdict, fg=colour, bold=True)} {v.path} ({v.format})")
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


# ---------------------------------------------------------------- publish: upload, images, properties, glance

_VISIBILITIES = ["private", "shared", "community", "public"]


def _print_lint(findings: list[dict[str, Any]]) -> None:
    colour = {"error": "red", "warning": "yellow"}
    for f in findings:
        out_console.print(f"  [{colour.get(f['severity'], 'white')}]{f['severity']:<7}[/] {f['code']} "
                          f"{f['property']}: {f['message']}", highlight=False)


@cli.command()
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD, then the OS_* variables).")
@click.option("--name", help="Image name (default: the recipe's glance.name, else the file name).")
@click.option("--recipe", metavar="R", help="Recipe whose os/glance sections give properties, tags, name.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="Image property (repeatable; "
              "KEY= removes one).")
@click.option("--visibility", type=click.Choice(_VISIBILITIES), help="Default: the recipe's, else private.")
@click.option("--tag", "tags", multiple=True, help="Image tag (repeatable).")
@click.option("--protected/--no-protected", default=None, help="Protect the image once it is verified.")
@click.option("--min-ram", type=click.IntRange(0), help="min_ram in MiB.")
@click.option("--import-method", type=click.Choice(["direct", "glance-direct", "web-download"]), default="direct",
              show_default=True)
@click.option("--url", help="web-download: the URL Glance fetches (IMAGE, if given, is checked and its hash compared).")
@click.option("--disk-format", help="web-download without IMAGE only: the format of the data at --url.")
@click.option("--force-upload", is_flag=True, help="Upload even if an identical active image exists.")
@click.option("--prune-keep", type=click.IntRange(1), help="After the upload, keep the N newest images of the prefix.")
@click.option("--prune-action", type=click.Choice(["hide", "deactivate", "delete"]), default="hide",
              show_default=True)
@click.option("--prune-prefix", help="Name prefix for --prune-keep (default: the recipe name, else the image name).")
@click.option("--max-virtual-size", metavar="SIZE", help="Refuse images with a larger virtual size.")
@click.option("--lint-only", is_flag=True, help="Only build and lint the properties; do not check or upload.")
@json_option
def upload(image: str | None, cloud: str | None, name: str | None, recipe: str | None, props: tuple[str, ...],
           visibility: str | None, tags: tuple[str, ...], protected: bool | None, min_ram: int | None,
           import_method: str, url: str | None, disk_format: str | None, force_upload: bool,
           prune_keep: int | None, prune_action: str, prune_prefix: str | None, max_virtual_size: str | None,
           lint_only: bool) -> None:
    """Check IMAGE and publish it to Glance, verified by size, md5 and sha512.

    disk_format comes from the detected format, never the extension. An identical
    active image (same name and sha512) is reused. A failed or interrupted upload
    leaves no usable image behind.
    """
    from imagekit import glance, properties
    from imagekit import recipe as rec
    from imagekit.cloud import connect

    opts = glance.UploadOptions(
        name=name, recipe=rec.load(recipe) if recipe else None, properties=properties.parse_assignments(props), visibility=visibility,
        tags=list(tags), protected=protected, min_ram=min_ram, import_method=import_method,  # type: ignore[arg-type]
        url=url, disk_format=disk_format, force_upload=force_upload, prune_keep=prune_keep,
        prune_action=prune_action, prune_prefix=prune_prefix,  # type: ignore[arg-type]
        max_virtual_size=_size_option(max_virtual_size))
    if lint_only:
        p = glance.plan(image, opts, lint_only=True)
        data = {"ok": True, "properties": p.properties, "findings": [f.to_dict() for f in p.lint]}

        def human_lint() -> None:
            out_console.print(f"[green]ok[/] {len(p.properties)} properties, no inconsistency", highlight=False)
            for k, v in sorted(p.properties.items()):
                out_console.print(f"  {k} = {v}", markup=False)
            _print_lint(data["findings"])  # type: ignore[arg-type]

        emit(data, human_lint)
        return
    p = glance.plan(image, opts)
    c = connect(cloud)
    with ProgressBar("upload") as bar:
        result = glance.upload(c, image, opts, progress=bar.update, plan_=p)
    data = result.to_dict()

    def human() -> None:
        img = result.image
        pr = out_console.print
        if result.reused:
            pr(f"[green]reused[/] image {img['id']} '{img['name']}' (same name and sha512 already active)",
               highlight=False)
        else:
            pr(f"[green]uploaded[/] {image or result.method} as '{img['name']}' ({img['id']})", highlight=False)
            thr = f", {result.throughput_mib_s} MiB/s" if result.throughput_mib_s else ""
            pr(f"  {result.method}, {result.disk_format}, {_human_bytes(result.size)}{thr}, "
               f"{'verified' if result.verified else 'NOT verified (no local file)'}", highlight=False)
        pr(f"  cloud {result.cloud['cloud']} ({result.cloud['endpoint']}), status {img['status']}, "
           f"visibility {img['visibility']}{', protected' if img.get('protected') else ''}", highlight=False)
        pr(f"  sha512 {result.sha512}", highlight=False)
        if result.lint:
            _print_lint(result.lint)
        if result.pruned:
            changed = [r for r in result.pruned["images"] if r["action"] in ("hide", "deactivate", "delete")]
            pr(f"  pruned: {len(changed)} image(s) {result.pruned['action']}", highlight=False)

    emit(data, human)


@cli.group()
def properties() -> None:
    """Glance image properties: build them from a recipe and lint them."""


@properties.command("lint")
@click.option("--recipe", metavar="R", help="Recipe whose os/glance sections give the properties.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="Extra or overriding property.")
@json_option
def properties_lint(recipe: str | None, props: tuple[str, ...]) -> None:
    """Build the property set (recipe profile < recipe glance.properties < --property) and lint it. Exit 2 on errors."""
    from imagekit import properties as pm
    from imagekit import recipe as rec

    r = rec.load(recipe) if recipe else None
    built = pm.build(r, pm.parse_assignments(props))
    findings = pm.lint(built, r)
    errors = [f for f in findings if f.severity == "error"]
    data = {"ok": not errors, "properties": built, "findings": [f.to_dict() for f in findings]}

    def human() -> None:
        for k, v in sorted(built.items()):
            out_console.print(f"  {k} = {v}", markup=False)
        if findings:
            _print_lint(data["findings"])  # type: ignore[arg-type]
        else:
            out_console.print("[green]ok[/] no inconsistency")

    if errors:
        if not _state().json:
            human()
        # with --json the error object (findings included) is the only output
        raise pm.PropertyLintError(f"{len(errors)} inconsistent image propert{'ies' if len(errors) != 1 else 'y'}",
                                   "see the findings above; 'imagekit properties rules' explains each code",
                                   [str(f) for f in errors], findings)
    emit(data, human)


@properties.command("rules")
@json_option
def properties_rules() -> None:
    """List the linter's rules."""
    from imagekit.properties import RULES

    def human() -> None:
        for k, v in RULES.items():
            out_console.print(f"{k}  {v}", markup=False)

    emit(RULES, human)


@cli.group()
def images() -> None:
    """List and rotate images in Glance."""


@images.command("list")
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD / OS_* variables).")
@click.option("--name-prefix", metavar="P", help="Only images whose name starts with P.")
@json_option
def images_list(cloud: str | None, name_prefix: str | None) -> None:
    """List images, newest first (hidden ones included)."""
    from imagekit import glance
    from imagekit.cloud import connect

    rows = glance.list_images(connect(cloud, probe=False), name_prefix)

    def human() -> None:
        for r in rows:
            flags = ",".join(f for f, on in (("protected", r.get("protected")), ("hidden", r.get("os_hidden")))
                             if on)
            out_console.print(f"{r['id']}  {str(r['name']):<30} {r['status']:<11} {str(r['disk_format']):<6} "
                              f"{_human_bytes(r.get('size')):>10}  {r['created_at']}  {flags}", markup=False)

    emit(rows, human)


@images.command("prune")
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD / OS_* variables).")
@click.option("--name-prefix", metavar="P", required=True, help="Images whose name starts with P.")
@click.option("--keep", type=click.IntRange(0), required=True, help="How many of the newest to keep.")
@click.option("--hide", "action", flag_value="hide", default=True, help="Hide older images (os_hidden; default).")
@click.option("--deactivate", "action", flag_value="deactivate", help="Deactivate older images.")
@click.option("--delete", "action", flag_value="delete", help="Delete older images.")
@click.option("--dry-run", is_flag=True, help="Show what would be done.")
@json_option
def images_prune(cloud: str | None, name_prefix: str, keep: int, action: str, dry_run: bool) -> None:
    """Keep the KEEP newest images of a prefix (by created_at); protected images are never touched."""
    from imagekit import glance
    from imagekit.cloud import connect

    res = glance.prune(connect(cloud, probe=False), name_prefix, keep, action, dry_run)  # type: ignore[arg-type]

    def human() -> None:
        for r in res["images"]:
            out_console.print(f"{r['action']:<10} {r['id']}  {str(r['name']):<30} {r['created_at']}  ({r['reason']})",
                              markup=False)
        verb = "would change" if dry_run else "changed"
        out_console.print(f"{verb} {sum(r['action'] == action for r in res['images'])} image(s)", markup=False)

    emit(res, human)


@cli.group("glance")
def glance_group() -> None:
    """A local Glance on 127.0.0.1 (SQLite, file store, no Keystone) for publishing without a cloud account."""


@glance_group.command("serve")
@click.option("--port", type=click.IntRange(1, 65535), help="Port on 127.0.0.1 (default: a free one).")
@click.option("--dir", "data_dir", type=click.Path(file_okay=False), help="Data directory (default: under the "
              "imagekit state directory).")
@click.option("--clouds-yaml", type=click.Path(dir_okay=False), help="clouds.yaml to update (default: "
              "OS_CLIENT_CONFIG_FILE, else ~/.config/openstack/clouds.yaml).")
@click.option("--timeout", type=float, default=60, show_default=True, help="Seconds to wait for the API.")
@json_option
def glance_serve(port: int | None, data_dir: str | None, clouds_yaml: str | None, timeout: float) -> None:
    """Start the local Glance (in the background) and add the cloud 'imagekit-local' to clouds.yaml."""
    from imagekit import glance_server as gs

    info = gs.serve(port=port, data_dir=data_dir, clouds_yaml=clouds_yaml, timeout=timeout)

    def human() -> None:
        state = "already running" if info.already_running else f"started in {info.start_seconds} s"
        out_console.print(f"[green]local Glance[/] {info.endpoint} (pid {info.pid}, {state})", highlight=False)
        out_console.print(f"  cloud '{info.cloud}' in {info.clouds_yaml}; data in {info.data_dir}", highlight=False)
        out_console.print(f"  next: imagekit upload IMAGE --cloud {info.cloud}; stop: imagekit glance stop",
                          highlight=False)

    emit(info.to_dict(), human)


@glance_group.command("stop")
@json_option
def glance_stop() -> None:
    """Stop the local Glance (SIGTERM to its PID, then wait)."""
    from imagekit import glance_server as gs

    res = gs.stop()
    emit(res, lambda: out_console.print(f"stopped local Glance (pid {res['pid']})" if res["stopped"]
                                        else f"nothing to stop: {res['reason']}", markup=False))


@glance_group.command("status")
@json_option
def glance_status() -> None:
    """Show whether the local Glance runs (exit 1 when it does not)."""
    from imagekit import glance_server as gs

    info = gs.status()
    data: dict[str, Any] = info.to_dict() if info is not None else {"running": False}
    emit(data, lambda: out_console.print(
        f"running: {info.endpoint} (pid {info.pid}), cloud '{info.cloud}', data {info.data_dir}"
        if info is not None and info.running else "not running", markup=False))
    if info is None or not info.running:
        raise gs.GlanceServerError("the local Glance is not running", "start it with 'imagekit glance serve'")


# ---------------------------------------------------------------- build / boot / cache


class StatusLine:
    """A one-line status (spinner) on stderr for long work; plain log lines when not a TTY; silent with --json."""

    def __init__(self) -> None:
        self.json = _state().json
        self.tty = err_console.is_terminal and not self.json
        self._status: Any = None

    def __enter__(self) -> StatusLine:
        if self.tty:
            self._status = err_console.status("starting")
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)

    def __call__(self, stage: str, message: str) -> None:
        if self._status is not None:
            self._status.update(f"[bold]{stage}[/] {message}")
        elif not self.json:
            err_console.print(f"{stage}: {message}", markup=False, highlight=False)


@cli.command()
@click.argument("recipe_ref", metavar="RECIPE")
@click.option("--output-dir", type=click.Path(file_okay=False), default="out", show_default=True)
@click.option("--upload", is_flag=True, help="Upload the image to Glance after a successful build.")
@click.option("--cloud", envvar="OS_CLOUD", help="Cloud from clouds.yaml for --upload (default: OS_CLOUD).")
@click.option("--no-cache", is_flag=True, help="Run every step again, ignoring the step cache.")
@click.option("--no-network", is_flag=True, help="No network for commands run inside the guest.")
@json_option
def build(recipe_ref: str, output_dir: str, upload: bool, cloud: str | None, no_cache: bool, no_network: bool) -> None:
    """Build RECIPE: build -> customise -> convert -> check -> (upload); writes IMAGE and IMAGE.manifest.json."""
    from pathlib import Path

    from imagekit import pipeline, workdir
    from imagekit import recipe as rec

    for reaped in workdir.reap_stale():
        err_console.print(f"removed a stale work folder: {reaped.summary()}", markup=False, highlight=False)
    r = rec.load(recipe_ref)
    if upload and not cloud:
        raise UsageError("--upload needs --cloud NAME (or OS_CLOUD)",
                         "for a local Glance: 'imagekit glance serve', then --cloud imagekit-local")
    with StatusLine() as status:
        result = pipeline.build(r, Path(output_dir), use_cache=not no_cache, upload_cloud=cloud if upload else None,
                                phase=status, network=not no_network)
    data = result.to_dict()

    def human() -> None:
        p = out_console.print
        o = result.output
        p(f"[green]built[/] {result.recipe}: {o.path} ({o.format}, {_human_bytes(o.virtual_size)} virtual, "
          f"{_human_bytes(o.size)} on disk)", highlight=False)
        p(f"  sha256   {o.sha256}")
        p(f"  check    {result.verdict}")
        for s in result.stages:
            p(f"  {s.name:<9} {'cached' if s.cached else f'{s.seconds:.1f} s'}")
        if result.glance:
            g = result.glance
            p(f"  glance   image {g.get('id')} '{g.get('name')}' ({g.get('status')}) on {cloud}", highlight=False)
            props = g.get("properties") or {}
            for k in sorted(props):
                p(f"           {k} = {props[k]}", highlight=False)
        p(f"  manifest {result.manifest}", highlight=False)

    emit(data, human)


@cli.command("boot")
@click.argument("image", type=click.Path(exists=False))
@click.option("--wait-for", type=click.Choice(["login", "cloud-init"]), default="cloud-init", show_default=True)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds.")
@click.option("--memory", type=int, default=1024, show_default=True, help="MiB.")
@click.option("--console-log", type=click.Path(dir_okay=False), help="Write the serial console here.")
@json_option
def boot_cmd(image: str, wait_for: str, timeout: float, memory: int, console_log: str | None) -> None:
    """Boot IMAGE under QEMU (throw-away overlay, NoCloud seed) until a login prompt or cloud-init's final stage."""
    from pathlib import Path

    from imagekit import boot as bootmod
    from imagekit.check import check
    from imagekit.errors import UnsafeImageError

    v = check(image)
    if not v.ok:
        raise UnsafeImageError(f"{image} is unsafe ({', '.join(v.codes())}); it was not booted",
                               "run 'imagekit check' for details")
    with StatusLine() as status:
        status("boot", f"booting {image} (waiting for {wait_for}, at most {timeout:g} s)")
        det = v.details.get("detection")
        fmt = det.get("qemu_format") if isinstance(det, dict) else None
        res = bootmod.boot(image, str(fmt or v.format), timeout=timeout, memory_mib=memory, wait_for=wait_for,
                           console_log=Path(console_log) if console_log else None)

    def human() -> None:
        if res.ok:
            out_console.print(f"[green]booted[/] to {wait_for} in {res.seconds} s ({res.accel})")
        else:
            out_console.print(res.console_tail, markup=False, highlight=False)

    emit(res.to_dict(), human)
    if not res.ok:
        raise ImagekitError(f"{image} did not reach {wait_for} within {timeout:g} s (reached: "
                            f"{', '.join(res.reached) or 'nothing'})", "the console's last lines are shown above")


@cli.group()
def cache() -> None:
    """The step cache (built bases, customised images, conversions) and downloads."""


@cache.command("list")
@json_option
def cache_list() -> None:
    """List cache entries with their size and last use."""
    from imagekit import pipeline

    rows = pipeline.cache_list()

    def human() -> None:
        if not rows:
            out_console.print("the step cache is empty")
        for r in rows:
            out_console.print(f"{r['entry']:<44} {r['recipe'] or '?':<20} {_human_bytes(r['disk_bytes']):>10}  "
                              f"last used {r['last_used']}", markup=False)

    emit(rows, human)


@cache.command("prune")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option("--recipe", help="Remove the entries of one recipe.")
@click.option("--older-than", metavar="DAYS", type=float, help="Remove entries unused for DAYS days.")
@click.option("--dry-run", is_flag=True)
@json_option
def cache_prune(everything: bool, recipe: str | None, older_than: float | None, dry_run: bool) -> None:
    """Remove cache entries."""
    from imagekit import pipeline

    if not (everything or recipe or older_than is not None):
        raise UsageError("say what to prune: --all, --recipe NAME or --older-than DAYS")
    rows = pipeline.cache_prune(older_than=older_than * 86400 if older_than is not None else None,
                                recipe=recipe, everything=everything, dry_run=dry_run)

    def human() -> None:
        verb = "would remove" if dry_run else "removed"
        for r in rows:
            out_console.print(f"{verb} {r['entry']} ({_human_bytes(r['disk_bytes'])})", markup=False)
        if not rows:
            out_console.print("nothing to prune")

    emit({"dry_run": dry_run, "removed": rows}, human)


# ---------------------------------------------------------------- customise / guest-inspect


def _parse_steps(texts: tuple[str, ...], first_index: int) -> list[Any]:
    """``--step`` values (JSON or YAML mappings) validated with the recipe's Step model."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from imagekit import recipe as rec

    adapter: TypeAdapter[Any] = TypeAdapter(rec.Step)
    steps: list[Any] = []
    problems: list[str] = []
    for n, text in enumerate(texts):
        where = f"step[{first_index + n}]"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append(f"{where}: not valid JSON or YAML: {getattr(exc, 'problem', None) or exc}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{where}: expected a mapping such as '{{op: hostname, hostname: web01}}'")
            continue
        try:
            steps.append(adapter.validate_python(data))
        except ValidationError as exc:
            for err in exc.errors():
                parts = list(err["loc"])
                if parts and parts[0] == data.get("op"):
                    parts = parts[1:]  # the tag pydantic adds for the discriminated union
                loc = where + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in parts)
                problems.append(f"{loc}: {rec._message(err)}")
    if problems:
        n = len(problems)
        raise RecipeError(f"--step: {n} problem{'s' if n != 1 else ''}",
                          "each --step is one customise step, e.g. --step '{op: hostname, hostname: web01}'",
                          problems)
    return steps


@cli.command("customise")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--recipe", "recipe_ref", metavar="R", help="Apply the customise: steps of recipe R (name or path).")
@click.option("--step", "step_texts", multiple=True, metavar="JSON_OR_YAML",
              help="A step, e.g. '{op: hostname, hostname: web01}' (repeatable, applied after the recipe's).")
@click.option("--in-place", is_flag=True, help="Change IMAGE itself (default: IMAGE is never touched).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the customised image here.")
@click.option("-O", "--out-format", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True)
@click.option("--no-network", is_flag=True, help="No network for the guest (package installs are refused).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def customise_cmd(image: str, recipe_ref: str | None, step_texts: tuple[str, ...], in_place: bool,
                  output: str | None, out_format: str, no_network: bool, force: bool) -> None:
    """Apply customise steps to IMAGE offline (libguestfs), into -o OUTPUT or --in-place."""
    from imagekit import customise as cust
    from imagekit import recipe as rec

    steps: list[Any] = []
    if recipe_ref:
        steps.extend(rec.load(recipe_ref).customise)
    steps.extend(_parse_steps(step_texts, len(steps)))
    if not steps:
        raise UsageError("no steps to apply", "give --recipe R (with a customise: list) and/or --step ...")
    if in_place == (output is not None):
        raise UsageError("give either -o OUTPUT or --in-place", "IMAGE is never changed unless --in-place is given")
    quiet = _state().json

    def on_step(r: Any) -> None:
        if not quiet:
            mark = "[green]ok[/]    " if r.ok else "[red]FAILED[/]"
            err_console.print(f"{mark} step {r.index} ({r.op}) {r.duration:.1f} s: {r.summary}",
                              markup=True, highlight=False)

    results = cust.customise(image, steps, in_place=in_place, output=output, output_format=out_format,
                             network=not no_network, overwrite=force, log=on_step)
    data = {"ok": True, "image": image, "output": output, "in_place": in_place,
            "steps": [r.to_dict() for r in results]}

    def human() -> None:
        out_console.print(f"customised {'in place: ' + image if in_place else output} ({len(results)} steps)",
                          markup=False)

    emit(data, human)


@cli.command("guest-inspect")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--sbom", type=click.Choice(["cyclonedx", "spdx"]),
              help="Print an SBOM (CycloneDX 1.5 or SPDX 2.3 JSON) instead of the report.")
@json_option
def guest_inspect_cmd(image: str, sbom: str | None) -> None:
    """What is inside IMAGE: OS, version, kernels, boot loader, agents, installed packages."""
    from imagekit import sbom as sb
    from imagekit.customise import detect_format, ensure_safe

    fmt = detect_format(image)
    ensure_safe(image, fmt)
    info = sb.inspect_guest(image, fmt)
    if sbom:
        doc = sb.SBOM_FORMATS[sbom](info)
        click.echo(json.dumps(doc, indent=2))
        return

    def human() -> None:
        p = out_console.print
        o = info["os"]
        p(f"[bold]{image}[/] ({fmt})", highlight=False)
        p(f"  os            {o.get('product_name') or o.get('distro')} ({o.get('distro')} {o.get('version')}, "
          f"{o.get('arch')})", markup=False)
        p(f"  hostname      {o.get('hostname')}", markup=False)
        p(f"  packages      {info['package_count']} ({info.get('package_format')}, "
          f"{info.get('package_management')})", markup=False)
        p(f"  kernels       {', '.join(k['version'] for k in info['kernels']) or 'none'}", markup=False)
        p(f"  boot loader   {info.get('bootloader') or 'none found'}", markup=False)
        p(f"  cloud-init    {'yes' if info['cloud_init'] else 'no'}; qemu-guest-agent "
          f"{'yes' if info['qemu_guest_agent'] else 'no'}", markup=False)

    emit(info, human)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    debug = "--debug" in args
    signals.install()
    try:
        cli.main(args=args, prog_name="imagekit", standalone_mode=False)
    except ImagekitError as exc:
        sys.exit(_report_error(exc, as_json, debug))
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        err_console.print("interrupted", markup=False)
        sys.exit(signals.exit_code_of(exc))
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
