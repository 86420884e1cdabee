"""The cloud snapshot workflow: ``imagekit snapshot --cloud C`` through openstacksdk and imagekit's Glance code.

:func:`snapshot`:

1. the **source**: a new server from ``image`` / ``flavor`` / ``network`` whose user-data is
   the caller's plus imagekit's reporter (``imagekit.snapshot.userdata``; an SSH public key,
   when given, becomes a temporary keypair), or an existing ``server``. A volume-backed
   server (no image: its root disk is a Cinder volume) is refused before anything is
   created: its snapshot would be a 0-byte image pointing at a Cinder snapshot;
2. waits for ACTIVE, then for the end of the customisation on the console log: imagekit's
   reporter says cloud-init's outcome and that the guest was generalised (an existing
   server: the caller's ``marker`` text, if any);
3. **captures**: stops the server (SHUTOFF) and snapshots it, or, with ``quiesce`` and
   when the base image declares ``hw_qemu_guest_agent=yes``, snapshots it running (Nova
   freezes the file systems through the guest agent);
4. ``createImage``, then waits for the image (``cloud_wait.image_active``: a vanished or
   failed image fails at once, with what the server and its instance actions say);
5. **cleans** the properties the snapshot inherited (``imagekit.snapshot.properties``) and
   sets the recipe's (``imagekit.properties.build``) and the caller's;
6. optionally **boots a server from the snapshot** (``verify_boot``) and waits for the
   reporter's verdict on its console;
7. deletes every server and keypair it created, on success, failure, Ctrl-C or SIGTERM
   (and the snapshot image too unless the whole run succeeded); an existing server it
   stopped is started again;
8. writes the build manifest (``imagekit.manifest``) when ``output_dir`` is given.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagekit.cloud import Cloud, CloudError, connect, load_region
from imagekit.errors import UsageError
from imagekit.snapshot import cloud_wait as wait
from imagekit.snapshot import console as console_mod
from imagekit.snapshot import properties as snap_props
from imagekit.snapshot import userdata
from imagekit.snapshot.errors import ServerFailed, SnapshotError, VolumeBacked

if TYPE_CHECKING:
    from imagekit.recipe import Recipe

log = logging.getLogger("imagekit.snapshot")
Say = Callable[[str], None]


@dataclass(frozen=True)
class CloudSnapshotOptions:
    cloud: str | None = None
    image: str | None = None  # name or ID of the base image (a new server), or
    server: str | None = None  # name or ID of an existing server
    flavor: str | None = None
    network: str | None = None  # "none", "auto", a network's name or ID (default: auto)
    user_data: str | None = None
    user_data_file: str | None = None  # where user_data came from (the manifest)
    name: str | None = None  # the snapshot's name (default: the recipe's glance.name, else SERVER-snapshot)
    recipe: Recipe | None = None
    properties: dict[str, str] = field(default_factory=dict)
    server_metadata: dict[str, str] = field(default_factory=dict)
    ssh_public_key: str | None = None
    quiesce: bool = False
    marker: str | None = None  # an existing server: wait for this text on its console
    verify_boot: bool = False
    output_dir: Path | None = None
    waits: wait.Waits = field(default_factory=wait.Waits)


@dataclass(frozen=True)
class SnapshotImage:
    id: str
    name: str
    status: str
    disk_format: str | None
    container_format: str | None
    size: int | None
    virtual_size: int | None
    min_disk: int | None
    visibility: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    properties: dict[str, Any]


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: float


@dataclass(frozen=True)
class CloudSnapshotResult:
    cloud: str
    image: SnapshotImage
    removed: dict[str, str]  # property -> why it was removed
    set: dict[str, str]  # properties set (recipe, caller)
    server: str  # the server the snapshot was taken from
    server_created: bool
    generalised: bool
    capture: str  # "stopped" or "quiesced"
    verify_server: str | None
    deleted: tuple[str, ...]
    warnings: tuple[str, ...]
    timings: tuple[Timing, ...]
    manifest: str | None = None


@dataclass
class _Run:
    """What the run made and saw: what to delete, what to report."""

    conn: Any
    glance: Cloud
    opts: CloudSnapshotOptions
    say: Say
    servers: list[str] = field(default_factory=list)
    keypairs: list[str] = field(default_factory=list)
    snapshot_id: str | None = None
    restart: str | None = None  # an existing server stopped here, to start again
    warnings: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    mark: float = field(default_factory=time.monotonic)

    @property
    def cloud(self) -> str:
        return self.glance.name

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings.append(Timing(name, round(now - self.mark, 2)))
        self.mark = now


@dataclass(frozen=True)
class _Source:
    server: Any
    created: bool
    nonce: str | None  # imagekit's reporter runs in it
    base: dict[str, Any] | None  # the Glance record of the image it booted from


# ---------------------------------------------------------------- the source


def _find_image(glance: Cloud, ref: str) -> dict[str, Any]:
    img = wait.get_image(glance, ref)
    if img is not None:
        return img
    from imagekit.glance_images import image_dict

    found = glance.call("find the image", lambda: [image_dict(i) for i in glance.glance.images.list(
        filters={"name": ref})])
    active = [i for i in found if i.get("status") == "active"]
    if len(active) != 1:
        raise UsageError(f"cloud '{glance.name}': {'no' if not active else len(active)} active image(s) named {ref!r}",
                         "give the image's ID")
    return active[0]


def _check_quiesce(r: _Run, base: dict[str, Any] | None) -> None:
    """--quiesce only where Nova can freeze the guest's file systems (before anything is created)."""
    agent = str((base or {}).get("hw_qemu_guest_agent", "")).lower()
    if r.opts.quiesce and agent not in ("yes", "true", "1"):
        raise UsageError("--quiesce needs the base image to declare hw_qemu_guest_agent=yes",
                         "without the guest agent Nova cannot freeze the file systems: the snapshot would only "
                         "be crash-consistent; leave out --quiesce to stop the server instead")


def _networks(r: _Run) -> Any:
    net = r.opts.network or "auto"
    if net in ("none", "auto"):
        return net
    found = wait.call(r.cloud, "find the network", lambda: r.conn.network.find_network(net, ignore_missing=True))
    if found is None:
        raise UsageError(f"cloud '{r.cloud}': no network {net!r}", "give a network's name or ID, 'auto' or 'none'")
    return [{"uuid": found.id}]


def _new_server(r: _Run) -> _Source:
    o = r.opts
    if not o.flavor:
        raise UsageError("--image needs --flavor", "the flavor of the server to customise")
    base = _find_image(r.glance, str(o.image))
    _check_quiesce(r, base)
    flavor = wait.call(r.cloud, "find the flavor", lambda: r.conn.compute.find_flavor(o.flavor, ignore_missing=True))
    if flavor is None:
        raise UsageError(f"cloud '{r.cloud}': no flavor {o.flavor!r}")
    ud = userdata.compose(o.user_data, mode="provision")
    encoded = base64.b64encode(ud.text.encode()).decode()
    if len(encoded) > userdata.NOVA_USER_DATA_LIMIT:
        raise UsageError(f"the user-data is {len(encoded)} bytes once encoded; Nova takes at most "
                         f"{userdata.NOVA_USER_DATA_LIMIT}", "move large files to an #include URL or the image")
    name = f"imagekit-snapshot-{ud.nonce}"
    attrs: dict[str, Any] = {"name": name, "image_id": base["id"], "flavor_id": flavor.id,
                             "networks": _networks(r), "user_data": encoded,
                             "metadata": {"imagekit": "snapshot", **o.server_metadata}}
    if o.ssh_public_key:
        wait.call(r.cloud, "create a keypair", lambda: r.conn.compute.create_keypair(
            name=name, public_key=o.ssh_public_key))
        r.keypairs.append(name)
        attrs["key_name"] = name
    r.say(f"creating server {name} from image {base.get('name')} ({base['id']})")
    server = wait.call(r.cloud, "create a server", lambda: r.conn.compute.create_server(**attrs))
    r.servers.append(server.id)
    return _Source(server, True, ud.nonce, base)


def _existing_server(r: _Run) -> _Source:
    ref = str(r.opts.server)
    server = wait.call(r.cloud, "find the server", lambda: r.conn.compute.find_server(ref, ignore_missing=True))
    if server is None:
        raise UsageError(f"cloud '{r.cloud}': no server {ref!r}")
    server = wait.call(r.cloud, "read the server", lambda: r.conn.compute.get_server(server.id))
    _refuse_volume_backed(r, server)
    if server.status not in ("ACTIVE", "SHUTOFF"):
        raise ServerFailed(f"server {server.name} ({server.id}) is {server.status}: a snapshot needs ACTIVE or SHUTOFF")
    base = wait.get_image(r.glance, _image_id(server) or "")
    _check_quiesce(r, base)
    r.warnings.append("an existing server is not generalised by imagekit: its machine-id, SSH host keys and "
                      "/var/lib/cloud are in the snapshot unless the guest removed them")
    return _Source(server, False, None, base)


def _image_id(server: Any) -> str | None:
    image = server.image
    ident = image.get("id") if isinstance(image, dict) else getattr(image, "id", None)
    return str(ident) if ident else None


def _has_block_storage(r: _Run) -> bool:
    try:
        return bool(r.conn.endpoint_for("block-storage"))
    except Exception:  # noqa: BLE001 - only for the hint
        return False


def _refuse_volume_backed(r: _Run, server: Any) -> None:
    """Nova's own test: a server without an image boots from a volume."""
    if _image_id(server):
        return
    volumes = ", ".join(str(v.get("id")) for v in (server.attached_volumes or []) if isinstance(v, dict))
    cinder = ("this cloud has a block-storage service: upload the root volume with Cinder instead "
              "('openstack image create --volume VOLUME NAME')" if _has_block_storage(r)
              else "this cloud shows no block-storage (Cinder) service to upload the volume with")
    raise VolumeBacked(f"server {server.name} ({server.id}) boots from a volume"
                       + (f" ({volumes})" if volumes else "") + ": Nova's snapshot of it is a 0-byte image that only "
                       "points at a Cinder snapshot, not a disk image; imagekit does not publish that",
                       cinder)


# ---------------------------------------------------------------- the steps


def _customised(r: _Run, src: _Source) -> tuple[Any, bool]:
    """Wait for ACTIVE and for the end marker; the server and whether imagekit generalised it."""
    w = r.opts.waits
    server = src.server
    if src.created:
        r.say(f"waiting for server {server.name} to become ACTIVE")
        server = wait.server_status(r.conn, r.cloud, server.id, "ACTIVE", w.active, w.poll)
        _refuse_volume_backed(r, server)
        r.lap("active")
    if src.nonce is not None:
        nonce = src.nonce
        r.say(f"waiting for the customisation of {server.name} to end (console log)")
        wait.console(r.conn, r.cloud, server.id, lambda t: console_mod.scan(t, nonce).generalised_rc == 0, nonce,
                     w.provision, w.poll)
        r.lap("provision")
        return server, True
    if r.opts.marker:
        marker = r.opts.marker
        r.say(f"waiting for {marker!r} on the console of {server.name}")
        wait.console(r.conn, r.cloud, server.id, lambda t: marker in t, None, w.provision, w.poll)
        r.lap("provision")
    return server, False


def _capture(r: _Run, src: _Source, server: Any) -> str:
    """Stop the server (or leave it running for a quiesced snapshot); how it was captured."""
    w = r.opts.waits
    if r.opts.quiesce:
        if server.status != "ACTIVE":
            raise UsageError(f"--quiesce snapshots a running server; {server.name} is {server.status}")
        return "quiesced"
    if server.status != "SHUTOFF":
        r.say(f"stopping server {server.name}")
        wait.call(r.cloud, "stop the server", lambda: r.conn.compute.stop_server(server.id))
        if not src.created:
            r.restart = server.id
        r.say(f"waiting for server {server.name} to stop (SHUTOFF)")
        wait.server_status(r.conn, r.cloud, server.id, "SHUTOFF", w.stop, w.poll)
        r.lap("stop")
    return "stopped"


def _snapshot_name(r: _Run, server: Any) -> str:
    if r.opts.name:
        return r.opts.name
    if r.opts.recipe is not None:
        return r.opts.recipe.glance.name
    return f"{server.name}-snapshot-{time.strftime('%Y%m%d%H%M%S')}"


def _create_image(r: _Run, server: Any) -> dict[str, Any]:
    name = _snapshot_name(r, server)
    r.say(f"creating the snapshot image {name!r} of server {server.name}")
    r.snapshot_id = wait.call(r.cloud, "create the snapshot (createImage)",
                              lambda: server.create_image(r.conn.compute, name, {"imagekit_snapshot": "incomplete"}))
    r.say(f"waiting for snapshot image {r.snapshot_id} to become active")
    img = wait.image_active(r.conn, r.glance, str(r.snapshot_id), server.id, r.opts.waits)
    r.lap("snapshot")
    return img


def _wanted(r: _Run) -> dict[str, str]:
    from imagekit import properties as props_mod

    wanted = props_mod.build(r.opts.recipe, r.opts.properties) if r.opts.recipe is not None else dict(r.opts.properties)
    return {k: v for k, v in wanted.items() if v != ""}


def _clean(r: _Run, img: dict[str, Any]) -> tuple[dict[str, Any], snap_props.Cleaning]:
    """Remove what the snapshot inherited, set the recipe's and the caller's properties (and tags)."""
    from imagekit.glance_images import image_dict

    cleaning = snap_props.plan(img, _wanted(r))
    r.say(f"cleaning the snapshot's properties ({len(cleaning.remove)} removed, {len(cleaning.set)} set)")
    image_id = str(img["id"])
    fields: dict[str, Any] = dict(cleaning.set)
    recipe = r.opts.recipe
    if recipe is not None and img.get("visibility") != recipe.glance.visibility:
        fields["visibility"] = recipe.glance.visibility
    updated = r.glance.call("update the snapshot's properties", lambda: r.glance.glance.images.update(
        image_id, remove_props=list(cleaning.remove), **fields))
    for tag in recipe.glance.tags if recipe is not None else ():
        r.glance.call("tag the snapshot", lambda t=tag: r.glance.glance.image_tags.update(image_id, t))
    if recipe is not None and recipe.glance.tags:
        updated = wait.get_image(r.glance, image_id) or updated
    r.lap("properties")
    return image_dict(updated), cleaning


def _flavor_id(r: _Run, server: Any) -> str:
    """The flavor to boot the verification server with: --flavor, else the source server's."""
    ref = r.opts.flavor
    if not ref:
        fl = server.flavor
        ref = (fl.get("id") or fl.get("original_name")) if isinstance(fl, dict) else (fl.id or fl.original_name)
    flavor = wait.call(r.cloud, "find the flavor", lambda: r.conn.compute.find_flavor(str(ref), ignore_missing=True))
    if flavor is None:
        raise UsageError(f"cloud '{r.cloud}': no flavor {ref!r} to boot the snapshot with", "give --flavor")
    return str(flavor.id)


def _verify(r: _Run, image_id: str, server: Any) -> str:
    """Boot a server from the snapshot and wait for the reporter's verdict; its ID (deleted later)."""
    w, o = r.opts.waits, r.opts
    ud = userdata.compose(None, mode="verify")
    name = f"imagekit-verify-{ud.nonce}"
    flavor = _flavor_id(r, server)
    r.say(f"booting server {name} from the snapshot")
    new = wait.call(r.cloud, "boot from the snapshot", lambda: r.conn.compute.create_server(
        name=name, image_id=image_id, flavor_id=flavor, networks=_networks(r),
        user_data=base64.b64encode(ud.text.encode()).decode(), metadata={"imagekit": "verify", **o.server_metadata}))
    r.servers.append(new.id)
    r.say(f"waiting for verification server {name} to become ACTIVE")
    wait.server_status(r.conn, r.cloud, new.id, "ACTIVE", w.active, w.poll)
    r.say(f"waiting for the verification boot of {name} (console log)")
    wait.console(r.conn, r.cloud, new.id, lambda t: console_mod.scan(t, ud.nonce).result is not None, ud.nonce,
                 w.provision, w.poll)
    r.lap("verify")
    return str(new.id)


# ---------------------------------------------------------------- clean-up and the whole run


def _cleanup(r: _Run, keep_image: bool) -> tuple[list[str], list[str]]:
    """Delete what this run created (servers, keypairs; the snapshot unless kept); (deleted, problems)."""
    deleted: list[str] = []
    problems: list[str] = []
    w = r.opts.waits
    for sid in r.servers:
        try:
            r.conn.compute.delete_server(sid, ignore_missing=True)
        except Exception as exc:  # noqa: BLE001 - every clean-up is tried
            problems.append(f"server {sid}: {exc}")
    for sid in r.servers:
        try:
            if wait.gone(r.conn, r.cloud, sid, w.delete, w.poll):
                deleted.append(f"server {sid}")
            else:
                problems.append(f"server {sid} was still there after {w.delete:g} s")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"server {sid}: {exc}")
    for name in r.keypairs:
        try:
            r.conn.compute.delete_keypair(name, ignore_missing=True)
            deleted.append(f"keypair {name}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"keypair {name}: {exc}")
    if r.snapshot_id and not keep_image:
        try:
            r.glance.glance.images.delete(r.snapshot_id)
            deleted.append(f"image {r.snapshot_id}")
        except Exception as exc:  # noqa: BLE001 - already gone (Nova deleted it) is fine
            if "404" not in str(exc) and "not found" not in str(exc).lower():
                problems.append(f"image {r.snapshot_id}: {exc}")
    if r.restart:
        try:
            r.conn.compute.start_server(r.restart)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"could not start server {r.restart} again: {exc}")
    return deleted, problems


def _image(img: dict[str, Any]) -> SnapshotImage:
    from imagekit.glance_images import IMAGE_FIELDS

    props = {k: v for k, v in img.items() if k not in IMAGE_FIELDS and k not in snap_props.GLANCE_FIELDS}
    return SnapshotImage(str(img["id"]), str(img.get("name")), str(img.get("status")), img.get("disk_format"),
                         img.get("container_format"), img.get("size"), img.get("virtual_size"), img.get("min_disk"),
                         img.get("visibility"), img.get("os_hash_algo"), img.get("os_hash_value"), props)


def _steps(r: _Run) -> tuple[_Source, CloudSnapshotResult]:
    src = _new_server(r) if r.opts.image else _existing_server(r)
    server, generalised = _customised(r, src)
    capture = _capture(r, src, server)
    img = _create_image(r, server)
    img, cleaning = _clean(r, img)
    verify = _verify(r, str(img["id"]), server) if r.opts.verify_boot else None
    return src, CloudSnapshotResult(r.cloud, _image(img), cleaning.remove, cleaning.set, str(server.id), src.created,
                                    generalised, capture, verify, (), (), ())


def _check_options(o: CloudSnapshotOptions) -> None:
    if bool(o.image) == bool(o.server):
        raise UsageError("give --image (a new server) or --server (an existing one), not both or neither")
    if o.server and (o.user_data is not None or o.ssh_public_key is not None):
        raise UsageError("--user-data and --ssh-public-key are for a new server (--image)")
    if o.image and o.marker:
        raise UsageError("--marker is for an existing server: a new server runs imagekit's reporter",
                         "the reporter says when cloud-init has finished and the guest is generalised")


def snapshot(opts: CloudSnapshotOptions, say: Say = lambda _m: None) -> CloudSnapshotResult:
    """Run the workflow (see the module documentation)."""
    import openstack

    _check_options(opts)
    glance = connect(opts.cloud)
    conn = openstack.connection.Connection(config=load_region(opts.cloud))

    def tell(message: str) -> None:
        log.info(message)
        say(message)

    r = _Run(conn, glance, opts, tell)
    started = time.monotonic()
    try:
        src, result = _steps(r)
    except BaseException as exc:
        deleted, problems = _cleanup(r, keep_image=False)
        log.info("cleaned up after the failure: %s", ", ".join(deleted) or "nothing to delete")
        if problems and isinstance(exc, SnapshotError | CloudError | UsageError):
            exc.message += "\nclean-up problems: " + "; ".join(problems)
        raise
    deleted, problems = _cleanup(r, keep_image=True)
    r.lap("clean-up")
    result = _finish(r, src, result, tuple(deleted), problems, time.monotonic() - started)
    return result


def _finish(r: _Run, src: _Source, result: CloudSnapshotResult, deleted: tuple[str, ...], problems: list[str],
            seconds: float) -> CloudSnapshotResult:
    from dataclasses import replace

    warnings = tuple(r.warnings) + tuple(f"clean-up: {p}" for p in problems)
    result = replace(result, deleted=deleted, warnings=warnings, timings=tuple(r.timings))
    if r.opts.output_dir is not None:
        from imagekit.snapshot.cloud_manifest import write_manifest

        path = write_manifest(r.opts, r.glance, result, src.base, seconds)
        result = replace(result, manifest=str(path))
    return result
