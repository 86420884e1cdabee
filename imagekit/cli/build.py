"""``imagekit build``, ``boot`` and ``cache list|prune``."""

from __future__ import annotations

import click

from imagekit.cli.completion import complete_recipe
from imagekit.cli.output import (
    StatusLine,
    emit,
    err_console,
    human_bytes,
    json_option,
    out_console,
    result_type,
)
from imagekit.cli.root import accel_choice, cli
from imagekit.errors import ImagekitError, UsageError


@cli.command()
@result_type("imagekit.cli.results:BuildResultOut", "build")
@click.argument("recipe_ref", metavar="RECIPE", shell_complete=complete_recipe)
@click.option("--output-dir", type=click.Path(file_okay=False), default="out", show_default=True)
@click.option("--upload", is_flag=True, help="Upload the image to Glance after a successful build.")
@click.option("--cloud", envvar="OS_CLOUD", help="Cloud from clouds.yaml for --upload (default: OS_CLOUD).")
@click.option("--no-cache", is_flag=True, help="Run every step again, ignoring the step cache.")
@click.option("--no-network", is_flag=True, help="No network for commands run inside the guest.")
@click.option("--confined", is_flag=True, help="The recipe comes from an untrusted source: refuse host files outside its folder, DIB environment, unpinned or non-https downloads, public images (docs/trust-model.md).")
@json_option
def build(recipe_ref: str, output_dir: str, upload: bool, cloud: str | None, no_cache: bool, no_network: bool,
          confined: bool) -> None:
    """Build RECIPE: build -> customise -> convert -> check -> (upload); writes IMAGE and IMAGE.manifest.json."""
    from pathlib import Path

    from imagekit import pipeline, timings, workdir
    from imagekit import recipe as rec

    for reaped in workdir.reap_stale():
        err_console.print(f"removed a stale work folder: {reaped.summary()}", markup=False, highlight=False)
    r = rec.load(recipe_ref, confined=confined)
    if upload and not cloud:
        raise UsageError("--upload needs --cloud NAME (or OS_CLOUD)",
                         "for a local Glance: 'imagekit glance serve', then --cloud imagekit-local")
    with StatusLine(estimates=timings.last(r.name)) as status:  # each stage's time in the recipe's last build
        status("prepare", "choosing the accelerator, reading tool versions")
        opts = pipeline.BuildOptions(accel=accel_choice(), use_cache=not no_cache, network=not no_network,
                                     upload_cloud=cloud if upload else None)
        result = pipeline.build(r, Path(output_dir), opts, phase=status)
    timings.record(r.name, result.stages)
    data = result.to_dict()

    def human() -> None:
        p = out_console.print
        o = result.output
        p(f"[green]built[/] {result.recipe}: {o.path} ({o.format}, {human_bytes(o.virtual_size)} virtual, "
          f"{human_bytes(o.size)} on disk)", highlight=False)
        p(f"  sha256   {o.sha256}")
        p(f"  check    {result.verdict}")
        for s in result.stages:
            p(f"  {s.name:<9} {'cached' if s.cached else f'{s.seconds:.1f} s'}")
        if result.upload:
            g = result.upload
            p(f"  glance   image {g.id} '{g.name}' ({g.status}) on {g.cloud}", highlight=False)
            props = g.properties or {}
            for k in sorted(props):
                p(f"           {k} = {props[k]}", highlight=False)
        p(f"  manifest {result.manifest}", highlight=False)

    emit(data, human)


@cli.command("boot")
@result_type("imagekit.boot:BootResult", "boot")
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
        fmt = v.detection.qemu_format if v.detection else None
        res = bootmod.boot(image, str(fmt or v.format), timeout=timeout, memory_mib=memory, wait_for=wait_for,
                           accel_name=accel_choice(), console_log=Path(console_log) if console_log else None)

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
@result_type("imagekit.cli.results:CacheList", "cache list")
@json_option
def cache_list() -> None:
    """List cache entries with their size and last use."""
    from imagekit import cache as step_cache

    rows = [e.to_dict() for e in step_cache.entries()]

    def human() -> None:
        if not rows:
            out_console.print("the step cache is empty")
        for r in rows:
            out_console.print(f"{r['entry']:<44} {r['recipe'] or '?':<20} {human_bytes(r['disk_bytes']):>10}  "
                              f"last used {r['last_used']}", markup=False)

    emit({"entries": rows}, human)


@cache.command("prune")
@result_type("imagekit.cli.results:CachePruneResult", "cache prune")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option("--recipe", help="Remove the entries of one recipe.")
@click.option("--older-than", metavar="DAYS", type=float, help="Remove entries unused for DAYS days.")
@click.option("--dry-run", is_flag=True)
@json_option
def cache_prune(everything: bool, recipe: str | None, older_than: float | None, dry_run: bool) -> None:
    """Remove cache entries."""
    from imagekit import cache as step_cache

    if not (everything or recipe or older_than is not None):
        raise UsageError("say what to prune: --all, --recipe NAME or --older-than DAYS")
    rows = [e.to_dict() for e in step_cache.prune(older_than=older_than * 86400 if older_than is not None else None,
                                                   recipe=recipe, everything=everything, dry_run=dry_run)]

    def human() -> None:
        verb = "would remove" if dry_run else "removed"
        for r in rows:
            out_console.print(f"{verb} {r['entry']} ({human_bytes(r['disk_bytes'])})", markup=False)
        if not rows:
            out_console.print("nothing to prune")

    emit({"dry_run": dry_run, "removed": rows}, human)
