"""``imagekit doctor``: tools, versions, accelerator, device-mapper, the libguestfs appliance."""

from __future__ import annotations

import click

from imagekit.cli.output import (
    emit,
    json_option,
    out_console,
    result_type,
    state,
)
from imagekit.cli.root import cli
from imagekit.errors import ImagekitError


@cli.command()
@result_type("imagekit.cli.results:DoctorResult", "doctor")
@click.option("--no-appliance", is_flag=True, help="Skip launching the libguestfs appliance (saves ~20 s).")
@click.option("--reprobe", is_flag=True, help="Probe KVM again instead of using the cached result.")
@json_option
def doctor(no_appliance: bool, reprobe: bool) -> None:
    """Report tools, versions, the accelerator in use and guestfs appliance health."""
    from imagekit import doctor as doc

    rep = doc.diagnose(appliance=not no_appliance, probe_cache=not reprobe, requested=state().accel)

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
