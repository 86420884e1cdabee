"""``imagekit inspect``, ``check`` and ``convert``: one image in, a description, a verdict or a verified copy out."""

from __future__ import annotations

import click

from imagekit.cli.output import (
    ProgressBar,
    emit,
    human_bytes,
    json_option,
    out_console,
    print_findings,
    result_type,
    size_option,
)
from imagekit.cli.root import cli
from imagekit.formats import registry


@cli.command()
@result_type("imagekit.cli.results:InspectResult | imagekit.cli.results:GuestInfo", "inspect")
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
        from imagekit.cli.guest import guest_inspect_cmd

        ctx.invoke(guest_inspect_cmd, image=image, sbom=sbom)
        return

    data = do_inspect(image, deep=deep)

    def human() -> None:
        p = out_console.print
        p(f"[bold]{data['path']}[/]", highlight=False)
        p(f"  format        {data['format']}" + (f" ({data['subformat']})" if data.get("subformat") else ""))
        p(f"  virtual size  {human_bytes(data.get('virtual_size'))} ({data.get('virtual_size')} bytes)")
        p(f"  file size     {human_bytes(data.get('file_size'))}, allocated {human_bytes(data.get('actual_size'))}")
        if data.get("partition_table"):
            p(f"  partitions    {data['partition_table']}" + (" (hybrid ISO)" if data.get("hybrid") else ""))
        q = data.get("qcow2")
        if isinstance(q, dict):
            feats = q.get("features") or {}
            on = [k for k, v in feats.items() if v is True]
            p(f"  qcow2         v{q.get('version')} (compat {q.get('compat')}), cluster {human_bytes(q.get('cluster_size'))}, "
              f"compression {q.get('compression_type')}" + (f", features: {', '.join(on)}" if on else ""))
            snaps = q.get("snapshots") or []
            p(f"  snapshots     {len(snaps)}" + (": " + ", ".join(str(s.get('name')) for s in snaps) if snaps else ""))
            p(f"  backing file  {q.get('backing_file') or 'none'}; data file {q.get('data_file') or 'none'}")
        alloc = data.get("allocation")
        if isinstance(alloc, dict):
            p("  allocation    " + ", ".join(f"{k} {human_bytes(v) if isinstance(v, int) and 'bytes' in k else v}"
                                             for k, v in alloc.items()))
        rej = data.get("rejected")
        if rej:
            p(f"  [red]unsafe[/]        {', '.join(rej) if isinstance(rej, list) else rej}; run 'imagekit check'")

    emit(data, human)


@cli.command("check")
@result_type("imagekit.cli.results:CheckResult | imagekit.cli.results:CodeList", "check")
@click.argument("image", type=click.Path(dir_okay=True), required=False)
@click.option("--format", "declared", metavar="FMT", help="The format you believe IMAGE has (refused if it differs).")
@click.option("--max-virtual-size", metavar="SIZE", help="Reject images whose virtual size is larger (e.g. 200G).")
@click.option("--shallow", is_flag=True, help="qcow2: header and tables only, do not walk L2 tables and refcounts.")
@click.option("--list-codes", is_flag=True, help="List every finding code and what it means (no IMAGE).")
@json_option
def check_cmd(image: str | None, declared: str | None, max_virtual_size: str | None, shallow: bool,
              list_codes: bool) -> None:
    """Check IMAGE: verdict accept, warn or reject, with every finding. Exit 0 accept/warn, 3 reject, 1 unreadable."""
    from imagekit.check import check
    from imagekit.errors import UnsafeImageError, UsageError

    if list_codes:
        _list_codes()
        return
    if image is None:
        raise UsageError("give the IMAGE to check", "imagekit check IMAGE [--format FMT]; --list-codes lists the codes")

    v = check(image, declared=declared, max_virtual_size=size_option(max_virtual_size), deep=not shallow)
    data = v.to_dict()

    def human() -> None:
        colour = {"accept": "green", "warn": "yellow", "reject": "red"}[v.verdict]
        click.echo(f"{click.style(v.verdict, fg=colour, bold=True)} {v.path} ({v.format})")
        print_findings(data["findings"])  # type: ignore[arg-type]

    emit(data, human)
    if not v.ok:
        raise UnsafeImageError(f"{image} is unsafe: {', '.join(c for c in v.codes() if c)}",
                               "do not convert or upload it; 'imagekit check --json' lists every finding")


@cli.command()
@result_type("imagekit.cli.results:ConvertResult", "convert")
@click.argument("source", metavar="INPUT", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output file (default: next to INPUT, new extension).")
@click.option("-O", "--out-format", type=click.Choice(registry.output_names()), default="qcow2",
              show_default=True)
@click.option("--compat", type=click.Choice(["0.10", "1.1"]), default="1.1", show_default=True, help="qcow2 version.")
@click.option("--cluster-size", metavar="SIZE", help="qcow2 cluster size (e.g. 64K, 2M).")
@click.option("--compress", type=click.Choice(["zlib", "zstd"]), help="Compress qcow2 clusters.")
@click.option("--compress-level", type=click.IntRange(1, 19), help="Compression level (default: zlib 7 with "
              "zlib-ng, else 6 as QEMU; zstd 3). zlib 9 is smaller, and with zlib-ng as fast as QEMU's 6.")
@click.option("--preallocation", type=click.Choice(["off", "metadata", "falloc", "full"]))
@click.option("--keep-snapshots", is_flag=True, help="qcow2 to qcow2: keep internal snapshots.")
@click.option("--max-virtual-size", metavar="SIZE", help="Refuse inputs with a larger virtual size.")
@click.option("--force", is_flag=True, help="Replace an existing output; convert an installer-only ISO.")
@click.option("--verify", "verify", type=click.Choice(["map", "content"]), default="map", show_default=True,
              help="qcow2: 'map' checks the written metadata and that qemu-img maps every range where it was "
                   "planned (no data read back); 'content' also compares every byte with the input.")
@json_option
def convert(source: str, output: str | None, out_format: str, compat: str, cluster_size: str | None,
            compress: str | None, compress_level: int | None, preallocation: str | None, keep_snapshots: bool,
            max_virtual_size: str | None, force: bool, verify: str) -> None:
    """Convert INPUT (raw, ISO, qcow2, VMDK, VHD, VHDX, VDI) to a verified image, qcow2 by default.

    qcow2 is written by imagekit's own writer in one pass (hashed as written); other formats by qemu-img."""
    from imagekit import convert as conv

    opts = conv.ConvertOptions(out_format=out_format, compat=compat, cluster_size=size_option(cluster_size),
                               compress=compress, compress_level=compress_level, preallocation=preallocation,
                               keep_snapshots=keep_snapshots,
                               force=force, max_virtual_size=size_option(max_virtual_size), verify=verify)
    with ProgressBar("convert") as bar:
        result = conv.convert(source, output, opts, progress=bar.update)
    data = result.to_dict()

    def human() -> None:
        i, o = result.input, result.output
        p = out_console.print
        p(f"[green]converted[/] {i.path} ({i.format}, {human_bytes(i.virtual_size)})", highlight=False)
        p(f"       to {o.path} ({o.format}" + (f" compat {o.compat}" if o.compat else "")
          + f", {human_bytes(o.size)} on disk)", highlight=False)
        p(f"  verdict {result.output_verdict.verdict}, qemu-img check {result.qemu_check}, compare {result.compare}"
          f" (written by {result.writer})")
        p(f"  sha256  {o.sha256}")
        for note in result.notes:
            p(f"  note: {note}", highlight=False)
        print_findings([f.to_dict() for f in result.output_verdict.findings if f.severity != "info"])

    emit(data, human)


def _list_codes() -> None:
    from imagekit.finding_codes import CODES

    rows = [{"code": c, "meaning": m} for c, m in CODES.items()]
    def human() -> None:
        for r in rows:
            out_console.print(f"{r['code']:<32} {r['meaning']}", markup=False, highlight=False)

    emit({"codes": rows}, human)
