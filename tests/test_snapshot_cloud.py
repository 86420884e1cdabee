"""``imagekit snapshot --cloud`` against a real Nova 34 on 127.0.0.1 (``tests/nova_fixture.py``:
what is not real is named there: the hypervisor, Neutron, Keystone).

Each test runs the real CLI in a subprocess and then looks at the cloud through openstacksdk
and Glance's raw JSON: the snapshot's properties after cleaning, its bytes, and that no server,
keypair or snapshot image imagekit created is left, after success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagekit.cloud import connect
from imagekit.snapshot.properties import INHERITED
from tests.conftest import ROOT, CliResult
from tests.nova_fixture import NovaCloud

pytestmark = [pytest.mark.slow]

SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKjB35pR4hESxp7UuDdNYqVRxDh+5lXkQ8TilE0lgYJU imagekit-test\n")
FAST = ("--poll", "0.3", "--network", "none")


@dataclass(frozen=True)
class Base:
    id: str
    name: str
    sha256: str  # of the qcow2 file uploaded
    props: dict[str, Any]


def _qcow2(path: Path, seed: bytes) -> str:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.write(hashlib.sha512(seed).digest() * 16384)  # 1 MiB of data
        f.truncate(16 << 20)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload(nova: NovaCloud, tmp: Path, name: str, meta: dict[str, str]) -> Base:
    """A base image uploaded with openstacksdk, as users do (it adds its owner_specified.* properties)."""
    disk = tmp / f"{name}.qcow2"
    digest = _qcow2(disk, name.encode())
    conn = nova.connect()
    img = conn.image.create_image(name, filename=str(disk), disk_format="qcow2", container_format="bare",
                                  meta=meta, wait=True, allow_duplicates=True)
    return Base(img.id, name, digest, raw_image(nova, img.id) or {})


@pytest.fixture(scope="module")
def base(nova_cloud: NovaCloud, tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _upload(nova_cloud, tmp_path_factory.mktemp("base"), "snap-base",
                   {"os_distro": "debian", "imagekit_recipe": "debian-12", "hw_qemu_guest_agent": "yes"})


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("key") / "id.pub"
    p.write_text(SSH_KEY)
    return p


def raw_image(nova: NovaCloud, image_id: str) -> dict[str, Any] | None:
    """Glance's JSON of an image, every property (first-class or not); None when it does not exist."""
    from imagekit.snapshot.cloud_wait import get_image

    old = os.environ.get("OS_CLIENT_CONFIG_FILE")
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(nova.clouds_yaml)
    try:
        return get_image(connect(nova.cloud), image_id)
    finally:
        os.environ.pop("OS_CLIENT_CONFIG_FILE") if old is None else os.environ.update(OS_CLIENT_CONFIG_FILE=old)


def snapshot(nova: NovaCloud, *args: str, timeout: float = 180) -> CliResult:
    proc = subprocess.run([sys.executable, "-m", "imagekit", "--json", "snapshot", "--cloud", nova.cloud, *args],
                          capture_output=True, text=True, env={**os.environ, **nova.env}, cwd=ROOT, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def delete_server(nova: NovaCloud, server_id: str) -> None:
    """Delete a server the test made itself, and wait until it is gone."""
    conn = nova.connect()
    conn.compute.delete_server(server_id, ignore_missing=True)
    deadline = time.monotonic() + 120
    while (left := conn.compute.find_server(server_id, ignore_missing=True)) is not None:
        assert time.monotonic() < deadline, f"server {server_id} not deleted: {left.status} {left.task_state}"
        time.sleep(0.3)


def cloud_state(nova: NovaCloud) -> tuple[set[str], set[str], set[str]]:
    """(servers, keypairs, images) of the test project, by name."""
    conn = nova.connect()
    return ({s.name for s in conn.compute.servers()}, {k.name for k in conn.compute.keypairs()},
            {i.name for i in conn.image.images()})


@pytest.fixture
def nothing_left(nova_cloud: NovaCloud, base: Base) -> Iterator[Callable[[], None]]:
    """After the test: no server or keypair left, and no image but those there before (and kept snapshots)."""
    conn = nova_cloud.connect()
    for server in conn.compute.servers():  # a failed test's leftovers (that test said so): not this test's
        delete_server(nova_cloud, server.id)
    for key in conn.compute.keypairs():
        conn.compute.delete_keypair(key, ignore_missing=True)
    _, _, images = cloud_state(nova_cloud)

    def check(kept: tuple[str, ...] = ()) -> None:
        s, k, i = cloud_state(nova_cloud)
        assert not s, f"servers left: {s}"
        assert not k, f"keypairs left: {k}"
        assert i - images - set(kept) == set(), f"images left: {i - images - set(kept)}"

    yield check


def test_whole_flow_snapshot_cleaned_and_booted(nova_cloud: NovaCloud, base: Base, key_file: Path, tmp_path: Path,
                                               nothing_left: Callable[..., None]) -> None:
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text("#cloud-config\npackages: [nginx]\n")
    res = snapshot(nova_cloud, "--image", base.name, "--flavor", "imagekit-test", *FAST, "--user-data", str(user_data),
                   "--ssh-public-key", str(key_file), "--recipe", "debian-12", "--property", "imagekit_test=yes",
                   "--name", "debian-12-snap", "--verify-boot", "--output-dir", str(tmp_path / "out"))
    assert res.code == 0, res.out + res.err
    doc = res.json()
    assert isinstance(doc, dict)
    assert doc["generalised"] is True and doc["capture"] == "stopped" and doc["verify_server"]
    img = raw_image(nova_cloud, doc["image"]["id"])
    assert img is not None and img["status"] == "active" and img["name"] == "debian-12-snap"
    # what Nova and the driver added, and the base's sdk digests, are gone (they were there: see the report)
    inherited = [k for k in img if k in INHERITED or k.startswith("owner_specified.openstack.")]
    assert inherited == [], inherited
    for gone in ("instance_uuid", "base_image_ref", "image_type", "user_id", "boot_roles", "image_location",
                 "owner_id", "owner_specified.openstack.sha256", "owner_specified.openstack.object"):
        assert gone in doc["removed"], gone
    assert any(k.startswith("owner_specified.openstack.") for k in base.props)  # the base really had them
    # the recipe's properties and the caller's are set, the guest's own are kept
    assert img["imagekit_recipe"] == "debian-12" and img["imagekit_test"] == "yes"
    assert img["os_type"] == "linux" and img["os_distro"] == "debian" and img["hw_disk_bus"] == "virtio"
    assert len(img["imagekit_recipe_digest"]) == 64 and "imagekit" in img["tags"]
    # the snapshot holds the server's disk: the base's bytes, uploaded by Nova through the driver
    data = b"".join(connect_glance(nova_cloud).glance.images.data(img["id"]))
    assert hashlib.sha256(data).hexdigest() == base.sha256
    # the manifest, as imagekit build writes it
    m = json.loads(Path(doc["manifest"]).read_text())
    assert m["recipe"]["build_method"] == "cloud-snapshot" and m["recipe"]["name"] == "debian-12"
    assert m["glance"]["id"] == img["id"] and m["output"]["path"].endswith(img["id"])
    assert m["inputs"][0]["sha512"] == base.props["os_hash_value"]
    assert any(i["name"] == "user-data" and i["sha256"] == hashlib.sha256(user_data.read_bytes()).hexdigest()
               for i in m["inputs"])
    assert [s["name"] for s in m["stages"]][:4] == ["active", "provision", "stop", "snapshot"]
    assert sorted(d.split()[0] for d in doc["deleted"]) == ["keypair", "server", "server"]
    nothing_left(kept=("debian-12-snap",))


def connect_glance(nova: NovaCloud) -> Any:
    old = os.environ.get("OS_CLIENT_CONFIG_FILE")
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(nova.clouds_yaml)
    try:
        return connect(nova.cloud)
    finally:
        os.environ.pop("OS_CLIENT_CONFIG_FILE") if old is None else os.environ.update(OS_CLIENT_CONFIG_FILE=old)


def test_snapshot_failing_in_the_driver_fails_fast(nova_cloud: NovaCloud, base: Base, key_file: Path, tmp_path: Path,
                                                  nothing_left: Callable[..., None]) -> None:
    """The driver fails after image_uploading: Nova deletes the image. imagekit says so at once (it
    would otherwise poll for an hour: --snapshot-timeout 3600 within a 120 s subprocess limit)."""
    res = snapshot(nova_cloud, "--image", base.name, "--flavor", "imagekit-test", *FAST, "--name", "fails",
                   "--ssh-public-key", str(key_file), "--server-metadata", "imagekit_fake_snapshot=fail",
                   "--snapshot-timeout", "3600", "--output-dir", str(tmp_path), timeout=120)
    assert res.code == 1, res.out + res.err
    doc = res.json()
    assert isinstance(doc, dict) and doc["error"]["code"] == "snapshot-image-failed"
    assert "Nova deletes the image when the snapshot fails" in doc["error"]["message"]  # 404, or status deleted
    assert "createImage" in doc["error"]["message"] and "task state none" in doc["error"]["message"]  # what the cloud says about it
    assert "nova-compute's log" in doc["error"]["hint"]
    assert not list(tmp_path.iterdir())  # no manifest
    nothing_left()


def test_cloud_init_error_fails_before_any_snapshot(nova_cloud: NovaCloud, base: Base, tmp_path: Path,
                                                    nothing_left: Callable[..., None]) -> None:
    res = snapshot(nova_cloud, "--image", base.name, "--flavor", "imagekit-test", *FAST, "--name", "never-made",
                   "--server-metadata", "imagekit_fake_console=error", "--output-dir", str(tmp_path))
    assert res.code == 1, res.out + res.err
    doc = res.json()
    assert isinstance(doc, dict) and doc["error"]["code"] == "snapshot-provision-failed"
    assert "status 'error'" in doc["error"]["message"] and "Runparts" in doc["error"]["message"]
    assert "--- console (last lines) ---" in doc["error"]["message"] and "+ false" in doc["error"]["message"]
    nothing_left()


def test_existing_server_is_stopped_snapshotted_and_started_again(nova_cloud: NovaCloud, base: Base,
                                                                  tmp_path: Path) -> None:
    conn = nova_cloud.connect()
    server = conn.compute.create_server(name="users-server", image_id=base.id, flavor_id=nova_cloud.flavor,
                                        networks="none")
    try:
        conn.compute.wait_for_server(server, "ACTIVE", interval=0.3, wait=120)
        res = snapshot(nova_cloud, "--server", "users-server", "--marker", "imagekit_fake console", *FAST,
                       "--name", "users-snap", "--output-dir", str(tmp_path))
        assert res.code == 0, res.out + res.err
        doc = res.json()
        assert isinstance(doc, dict)
        assert doc["server"] == server.id and doc["server_created"] is False and doc["generalised"] is False
        assert any("not generalised" in w for w in doc["warnings"])
        assert doc["deleted"] == []  # the user's server is not imagekit's to delete
        again = conn.compute.wait_for_server(server, "ACTIVE", interval=0.3, wait=120)  # started again
        assert again.status == "ACTIVE"
    finally:
        delete_server(nova_cloud, server.id)


def test_quiesce_needs_the_guest_agent_declared(nova_cloud: NovaCloud, base: Base, tmp_path: Path,
                                                nothing_left: Callable[..., None]) -> None:
    bare = _upload(nova_cloud, tmp_path, "no-agent", {"os_distro": "debian"})
    refused = snapshot(nova_cloud, "--image", bare.name, "--flavor", "imagekit-test", *FAST, "--quiesce",
                       "--output-dir", str(tmp_path))
    assert refused.code == 2, refused.out + refused.err
    assert "hw_qemu_guest_agent=yes" in refused.out
    done = snapshot(nova_cloud, "--image", base.name, "--flavor", "imagekit-test", *FAST, "--quiesce",
                    "--name", "quiesced", "--output-dir", str(tmp_path))
    assert done.code == 0, done.out + done.err
    doc = done.json()
    assert isinstance(doc, dict) and doc["capture"] == "quiesced" and "stop" not in [t["name"] for t in doc["timings"]]
    nothing_left(kept=("no-agent", "quiesced"))


def test_volume_backed_server_is_refused(nova_cloud: NovaCloud, base: Base, tmp_path: Path) -> None:
    """Boot from volume (there is no Cinder: the server goes to ERROR, but it is volume-backed all
    the same: no image). imagekit refuses it before doing anything, and leaves it alone."""
    conn = nova_cloud.connect()
    server = conn.compute.create_server(
        name="boots-from-volume", flavor_id=nova_cloud.flavor, networks="none",
        block_device_mapping=[{"boot_index": 0, "uuid": base.id, "source_type": "image",
                               "destination_type": "volume", "volume_size": 1, "delete_on_termination": True}])
    try:
        conn.compute.wait_for_server(server, "ERROR", interval=0.3, wait=120)
        _, _, images = cloud_state(nova_cloud)
        res = snapshot(nova_cloud, "--server", server.id, *FAST, "--output-dir", str(tmp_path))
        assert res.code == 1, res.out + res.err
        doc = res.json()
        assert isinstance(doc, dict) and doc["error"]["code"] == "snapshot-volume-backed"
        assert "boots from a volume" in doc["error"]["message"] and "0-byte image" in doc["error"]["message"]
        assert "Cinder" in doc["error"]["hint"]
        assert conn.compute.find_server(server.id) is not None  # not imagekit's to delete
        assert cloud_state(nova_cloud)[2] == images  # no image was made
    finally:
        delete_server(nova_cloud, server.id)


# ---------------------------------------------------------------- Ctrl-C (and SIGTERM) at each wait

WAITS = [
    ("active", ("--server-metadata", "imagekit_fake_spawn_delay=6"), "to become ACTIVE", signal.SIGINT),
    ("console", ("--server-metadata", "imagekit_fake_console=never"), "customisation of", signal.SIGINT),
    ("stop", ("--server-metadata", "imagekit_fake_stop_delay=6"), "to stop (SHUTOFF)", signal.SIGINT),
    ("image", ("--server-metadata", "imagekit_fake_snapshot=slow", "--server-metadata",
               "imagekit_fake_snapshot_delay=6"), "snapshot image", signal.SIGTERM),
    ("verify", ("--verify-boot", "--server-metadata", "imagekit_fake_console_verify=never"), "verification boot",
     signal.SIGINT),
]


@pytest.mark.parametrize(("wait", "extra", "line", "sig"), WAITS, ids=[w[0] for w in WAITS])
def test_interrupt_at_each_wait_leaves_nothing(nova_cloud: NovaCloud, base: Base, key_file: Path, tmp_path: Path,
                                               nothing_left: Callable[..., None], wait: str, extra: tuple[str, ...],
                                               line: str, sig: int) -> None:
    argv = [sys.executable, "-m", "imagekit", "--json", "-v", "snapshot", "--cloud", nova_cloud.cloud, "--image",
            base.name, "--flavor", "imagekit-test", *FAST, "--ssh-public-key", str(key_file), "--name",
            f"interrupted-{wait}", "--output-dir", str(tmp_path), *extra]
    # as from a terminal: a runner that starts jobs in the background hands them SIGINT ignored, and
    # imagekit keeps a signal that was ignored at start ignored (nohup)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **nova_cloud.env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        for text in proc.stderr:
            seen.append(text)
            if "waiting for" in text and line in text:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the command ended before the wait:\n" + "".join(seen))
        time.sleep(0.5)  # inside the wait
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, "".join(seen) + err
    assert json.loads(out)["error"]["code"] == "interrupted"
    nothing_left()


def test_parallel_snapshots_on_sqlite(nova_cloud: NovaCloud, base: Base, tmp_path: Path,
                                      nothing_left: Callable[..., None]) -> None:
    """Three runs at once: Nova's services and imagekit's Glance write their SQLite files concurrently
    (without the tuning, 'database is locked' failed two runs in three in the prototype)."""
    glance_db = nova_cloud.run / "glance" / "data" / "glance.sqlite"
    with sqlite3.connect(glance_db) as con:  # serve(sqlite_tuning=True) switched Glance's database to WAL
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    procs = [subprocess.Popen([sys.executable, "-m", "imagekit", "--json", "snapshot", "--cloud", nova_cloud.cloud,
                               "--image", base.name, "--flavor", "imagekit-test", *FAST, "--name", f"parallel-{i}",
                               "--output-dir", str(tmp_path / str(i))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **nova_cloud.env})
             for i in range(3)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, out + err
    nothing_left(kept=("parallel-0", "parallel-1", "parallel-2"))
