"""``imagekit snapshot --cloud C``: customise a server in a cloud, capture it, publish it (imagekit.snapshot.cloud)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from imagekit.cli.output import StatusLine, emit, human_bytes, json_option, out_console, result_type
from imagekit.cli.root import cli
from imagekit.errors import UsageError

if TYPE_CHECKING:
    from imagekit.snapshot.cloud import CloudSnapshotResult


def _read_text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from exc


def _human(res: CloudSnapshotResult) -> None:
    p = out_console.print
    img = res.image
    p(f"[green]snapshot[/] {img.name} ({img.id}) on {res.cloud}: {img.status}, {img.disk_format}, "
      f"{human_bytes(img.size)}", highlight=False)
    p(f"  from server {res.server} ({'created by imagekit' if res.server_created else 'existing'}), "
      f"{res.capture}, {'generalised' if res.generalised else 'not generalised by imagekit'}", highlight=False)
    if res.verify_server:
        p(f"  booted again from the snapshot (server {res.verify_server})", highlight=False)
    for k in sorted(res.removed):
        p(f"  removed  {k}  ({res.removed[k]})", markup=False)
    for k in sorted(res.set):
        p(f"  set      {k} = {res.set[k]}", markup=False)
    for d in res.deleted:
        p(f"  deleted  {d}", markup=False)
    for w in res.warnings:
        p(f"  [yellow]warning[/] {w}", highlight=False)
    if res.manifest:
        p(f"  manifest {res.manifest}", highlight=False)


@cli.command("snapshot")
@result_type("imagekit.snapshot.cloud:CloudSnapshotResult", "snapshot")
@click.option("--cloud", envvar="OS_CLOUD", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD).")
@click.option("--image", metavar="IMAGE", help="Boot a new server from this image (name or ID) and customise it.")
@click.option("--flavor", metavar="FLAVOR", help="The new server's flavor (and the verification server's).")
@click.option("--network", metavar="NET", help="none, auto (default), or a network's name or ID.")
@click.option("--user-data", "user_data_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The new server's user-data (#cloud-config, script, MIME); imagekit adds its reporter.")
@click.option("--ssh-public-key", type=click.Path(dir_okay=False), metavar="FILE",
              help="Import this key as a temporary keypair for the new server (deleted at the end).")
@click.option("--server", metavar="SERVER", help="Snapshot an existing server (name or ID) instead.")
@click.option("--marker", metavar="TEXT", help="--server: wait for TEXT on its console log first.")
@click.option("--name", help="The snapshot's name (default: the recipe's glance.name, else SERVER-snapshot-DATE).")
@click.option("--recipe", metavar="R", help="Recipe whose properties (os, glance.properties, tags) the snapshot gets.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="Property to set (repeatable).")
@click.option("--server-metadata", multiple=True, metavar="KEY=VALUE",
              help="Metadata of the servers imagekit creates (repeatable).")
@click.option("--quiesce", is_flag=True, help="Snapshot the running server with its file systems frozen by the "
              "guest agent (the image must declare hw_qemu_guest_agent=yes) instead of stopping it.")
@click.option("--verify-boot", is_flag=True, help="Boot a server from the snapshot and wait for cloud-init (deleted).")
@click.option("--output-dir", type=click.Path(file_okay=False), default="out", show_default=True,
              help="Where the manifest is written.")
@click.option("--boot-timeout", type=click.FloatRange(1), default=900, show_default=True,
              help="Seconds for a server to become ACTIVE or SHUTOFF.")
@click.option("--provision-timeout", type=click.FloatRange(1), default=3600, show_default=True,
              help="Seconds for the customisation to end (console log).")
@click.option("--snapshot-timeout", type=click.FloatRange(1), default=3600, show_default=True,
              help="Seconds for the snapshot image to become active.")
@click.option("--poll", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between polls.")
@json_option
def snapshot_cmd(cloud: str | None, image: str | None, flavor: str | None, network: str | None,
                 user_data_file: str | None, ssh_public_key: str | None, server: str | None, marker: str | None,
                 name: str | None, recipe: str | None, props: tuple[str, ...], server_metadata: tuple[str, ...],
                 quiesce: bool, verify_boot: bool, output_dir: str, boot_timeout: float, provision_timeout: float,
                 snapshot_timeout: float, poll: float) -> None:
    """Customise a server in a cloud, snapshot it into Glance, clean the snapshot's properties.

    A new server (--image, --flavor, --network, --user-data) runs imagekit's reporter: the
    snapshot is taken once cloud-init has finished without errors and the guest is generalised.
    Every server and keypair imagekit creates is deleted at the end, also on failure and Ctrl-C.
    """
    from imagekit import properties
    from imagekit import recipe as rec
    from imagekit.cli.output import state
    from imagekit.snapshot.cloud import CloudSnapshotOptions, snapshot
    from imagekit.snapshot.cloud_wait import Waits

    opts = CloudSnapshotOptions(
        cloud=cloud, image=image, server=server, flavor=flavor, network=network,
        user_data=_read_text(user_data_file, "user-data file"), user_data_file=user_data_file, name=name,
        recipe=rec.load(recipe) if recipe else None, properties=properties.parse_assignments(props),
        server_metadata=properties.parse_assignments(server_metadata),
        ssh_public_key=_read_text(ssh_public_key, "SSH public key"), quiesce=quiesce, marker=marker,
        verify_boot=verify_boot, output_dir=Path(output_dir),
        waits=Waits(active=boot_timeout, provision=provision_timeout, stop=boot_timeout, image=snapshot_timeout,
                    poll=poll))
    with StatusLine() as status:  # with -v the same messages are logged: no status line then
        result = snapshot(opts, say=(lambda _m: None) if state().verbose else lambda m: status("snapshot", m))
    emit(result, lambda: _human(result))
