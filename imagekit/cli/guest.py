"""``imagekit customise`` and ``guest-inspect``: offline work inside a guest (libguestfs)."""

from __future__ import annotations

import json
from typing import Any

import click

from imagekit.cli.completion import complete_recipe
from imagekit.cli.output import (
    emit,
    err_console,
    json_option,
    out_console,
    result_type,
    state,
)
from imagekit.cli.root import accel_choice, cli
from imagekit.errors import UsageError
from imagekit.formats import registry


@cli.command("customise")
@result_type("imagekit.cli.results:CustomiseResult", "customise")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--recipe", "recipe_ref", metavar="R", shell_complete=complete_recipe,
              help="Apply the customise: steps of recipe R (name or path).")
@click.option("--step", "step_texts", multiple=True, metavar="JSON_OR_YAML",
              help="A step, e.g. '{op: hostname, hostname: web01}' (repeatable, applied after the recipe's).")
@click.option("--in-place", is_flag=True, help="Change IMAGE itself (default: IMAGE is never touched).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the customised image here.")
@click.option("-O", "--out-format", type=click.Choice(registry.customisable_names()), default="qcow2", show_default=True)
@click.option("--no-network", is_flag=True, help="No network for the guest (package installs are refused).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--confined", is_flag=True, help="The recipe comes from an untrusted source: refuse host files outside its folder, DIB environment, unpinned or non-https downloads, public images (docs/trust-model.md).")
@json_option
def customise_cmd(image: str, recipe_ref: str | None, step_texts: tuple[str, ...], in_place: bool,
                  output: str | None, out_format: str, no_network: bool, force: bool, confined: bool) -> None:
    """Apply customise steps to IMAGE offline (libguestfs), into -o OUTPUT or --in-place."""
    from pathlib import Path

    from imagekit import customise as cust
    from imagekit import recipe as rec
    from imagekit.steps import parse_step_texts

    steps: list[Any] = []
    if recipe_ref:
        steps.extend(rec.load(recipe_ref, confined=confined).customise)
    steps.extend(parse_step_texts(step_texts, Path.cwd(), len(steps)))
    if not steps:
        raise UsageError("no steps to apply", "give --recipe R (with a customise: list) and/or --step ...")
    if in_place == (output is not None):
        raise UsageError("give either -o OUTPUT or --in-place", "IMAGE is never changed unless --in-place is given")
    quiet = state().json

    def on_step(r: Any) -> None:
        if not quiet:
            mark = "[green]ok[/]    " if r.ok else "[red]FAILED[/]"
            err_console.print(f"{mark} step {r.index} ({r.op}) {r.duration:.1f} s: {r.summary}",
                              markup=True, highlight=False)

    target = cust.OutputSpec(output, out_format, overwrite=force) if output is not None else None
    results = cust.customise(image, steps, in_place=in_place, output=target, network=not no_network,
                             accel=accel_choice(), log=on_step)
    data = {"ok": True, "image": image, "output": output, "in_place": in_place,
            "steps": [r.to_dict() for r in results]}

    def human() -> None:
        out_console.print(f"customised {'in place: ' + image if in_place else output} ({len(results)} steps)",
                          markup=False)

    emit(data, human)


@cli.command("guest-inspect")
@result_type("imagekit.cli.results:GuestInfo", "guest-inspect")
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
    info = sb.inspect_guest(image, fmt, accel=accel_choice())
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
        if o.get("type") == "windows" and isinstance(info.get("windows"), dict):
            _windows_lines(info)
            return
        p(f"  kernels       {', '.join(k['version'] for k in info['kernels']) or 'none'}", markup=False)
        p(f"  boot loader   {info.get('bootloader') or 'none found'}", markup=False)
        p(f"  cloud-init    {'yes' if info['cloud_init'] else 'no'}; qemu-guest-agent "
          f"{'yes' if info['qemu_guest_agent'] else 'no'}", markup=False)

    emit(info, human)


def _windows_lines(info: dict[str, Any]) -> None:
    """The Windows part of ``inspect --guest`` (display only; the data is ``info['windows']``)."""
    p = out_console.print
    w = info["windows"]
    p(f"  edition       {w.get('edition_id')} ({w.get('installation_type')}), build {w.get('build')}"
      + (f", {w['display_version']}" if w.get("display_version") else ""), markup=False)
    p(f"  image state   {w.get('image_state') or 'unknown'}", markup=False)
    p(f"  applications  {info['package_count']}: " + ", ".join(
        f"{a.get('display_name') or a['name']} {a['version']}".strip() for a in info["applications"][:8])
      + (", ..." if info["package_count"] > 8 else ""), markup=False)
    drivers = w.get("drivers") or []
    p(f"  drivers       {len(drivers)} third-party: " + ", ".join(
        f"{d['name']} {d.get('version') or ''} ({d.get('driver_class') or '?'}, {d.get('provider') or '?'})".replace(
            "  ", " ") for d in drivers), markup=False)
    p(f"  boot drivers  {', '.join(w.get('boot_drivers') or []) or 'none'}", markup=False)
    p(f"  cloudbase-init {'yes' if info['cloudbase_init'] else 'no'}; qemu-guest-agent "
      f"{'yes' if info['qemu_guest_agent'] else 'no'}", markup=False)
    for problem in w.get("problems") or []:
        p(f"  [yellow]note[/]          {problem}")
