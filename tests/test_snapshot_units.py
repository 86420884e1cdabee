"""The snapshot workflows' parts that need no VM and no cloud: the user-data and its reporter, the
console markers, the property cleaning, the recipe model and its cache key, QEMU's shutdown
sequence (against real Unix sockets speaking QMP and the guest agent's protocol, and a real child
process standing in for QEMU), and the CLI's usage errors."""

from __future__ import annotations

import base64
import email
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagekit import builders
from imagekit import recipe as rec
from imagekit.builders.base import ToolVersions
from imagekit.errors import RecipeError, UsageError
from imagekit.process import Process
from imagekit.snapshot import console, monitor, properties, userdata
from imagekit.snapshot.errors import ShutdownFailed
from imagekit.snapshot.local import shutdown

# ---------------------------------------------------------------- user-data


def parts(text: str) -> list[tuple[str, str, str]]:
    """(content type, file name, decoded text) of each part of a MIME user-data document."""
    msg = email.message_from_string(text)
    return [(p.get_content_type(), p.get_filename() or "", p.get_payload(decode=True).decode())
            for p in msg.walk() if not p.is_multipart()]


def test_user_data_parts_in_order() -> None:
    ud = userdata.compose("#cloud-config\nruncmd: [[touch, /x]]\n", ["nginx", "tree"],
                          [userdata.Script("first", "echo one\n"), userdata.Script("b.sh", "#!/bin/bash\necho two\n")])
    got = parts(ud.text)
    assert [(t, n) for t, n, _ in got] == [
        ("text/cloud-boothook", "imagekit-reporter.sh"), ("text/cloud-config", "user-data"),
        ("text/cloud-config", "imagekit-packages.cfg"), ("text/x-shellscript", "imagekit-01-first"),
        ("text/x-shellscript", "imagekit-02-b.sh")]
    assert got[1][2] == "#cloud-config\nruncmd: [[touch, /x]]\n"  # the caller's part, untouched
    pkgs = json.loads(got[2][2].split("\n", 1)[1])
    assert pkgs["packages"] == ["nginx", "tree"] and {"name": "list", "settings": ["append"]} in pkgs["merge_how"]
    assert got[3][2].startswith("#!/bin/sh\nset -e\necho one")  # inline scripts fail on their first error
    assert got[4][2] == "#!/bin/bash\necho two\n"
    hook = got[0][2]
    assert hook.startswith("#cloud-boothook\n#!/bin/sh\n") and f"N={ud.nonce}" in hook and "MODE=provision" in hook
    assert f"IMAGEKIT-RESULT {ud.nonce}" not in hook  # the script never holds a whole marker line


def test_user_data_mime_is_nested_and_unknown_kinds_refused() -> None:
    inner = userdata.compose("#!/bin/sh\necho inner\n", mode="verify").text
    ud = userdata.compose(inner, mode="provision")
    kinds = [t for t, _, _ in parts(ud.text)]
    assert kinds.count("text/cloud-boothook") == 2 and "text/x-shellscript" in kinds
    with pytest.raises(UsageError, match="not a kind cloud-init runs"):
        userdata.compose("just some text\n")


def test_reporter_is_valid_shell_and_python(tmp_path: Path) -> None:
    hook = userdata.reporter("0123456789abcdef", "provision")
    (tmp_path / "hook.sh").write_text(hook.split("\n", 1)[1])
    subprocess.run(["sh", "-n", str(tmp_path / "hook.sh")], check=True)
    script = hook.split("<<'IMAGEKIT_EOF'\n", 1)[1].split("IMAGEKIT_EOF\n", 1)[0]
    (tmp_path / "report.sh").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "report.sh")], check=True)
    py = script.split("<<'IMAGEKIT_PY' 2>/dev/null\n", 1)[1].split("IMAGEKIT_PY\n", 1)[0]
    compile(py, "reporter", "exec")
    assert "cloud-init clean --logs --machine-id --seed" in script and "rm -f /etc/ssh/ssh_host_" in script


# ---------------------------------------------------------------- console markers


def b64(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_console_scan_finds_this_boots_markers_only() -> None:
    nonce = "a1b2c3d4e5f60718"
    ok = b64({"v1": {"datasource": "DataSourceNoCloud", "errors": []}})
    text = ("[  5.0] random: crng init done\r\nIMAGEKIT-STARTED ffffffffffffffff\r\n"
            f"[ 60.1] cloud-init[345]: x IMAGEKIT-STARTED {nonce}\r\n"
            f"\x1b[0;32m  OK  \x1b[0mIMAGEKIT-RESULT {nonce} status=done result={ok}\n")
    p = console.scan(text, nonce)
    assert p.started and p.result is not None and p.result.ok and p.result.datasource == "DataSourceNoCloud"
    assert not p.generalising and p.generalised_rc is None
    assert console.scan(text, "0000000000000000") == console.Progress()
    bad = b64({"v1": {"errors": ["('scripts-user', RuntimeError('Runparts: 1 failures'))"]}})
    p = console.scan(f"IMAGEKIT-RESULT {nonce} status=error result={bad}\nIMAGEKIT-GENERALISED {nonce} rc=1", nonce)
    assert p.result is not None and not p.result.ok and "Runparts" in p.result.errors[0]
    assert p.generalised_rc == 1
    assert console.tail(f"IMAGEKIT-RESULT {nonce} status=error result={bad}") == \
        f"IMAGEKIT-RESULT {nonce} status=error result=..."  # error messages do not carry the encoded blob
    garbled = console.scan(f"IMAGEKIT-RESULT {nonce} status=done result=eyJ2MSI6", nonce)
    assert garbled.result is not None and not garbled.result.readable and garbled.result.ok
    assert console.tail("a\r\n\x1b[1mb\x1b[0m\n\n  \nc\x07\n", 2) == "b\nc"


# ---------------------------------------------------------------- property cleaning

# A snapshot's record as Nova 34 and the libvirt-like test driver left it (the prototype's run).
SNAPSHOT = {
    "os_distro": "debian", "hw_disk_bus": "virtio", "owner_specified.openstack.md5": "",
    "owner_specified.openstack.sha256": "", "owner_specified.openstack.object": "images/base",
    "imagekit_recipe": "base-recipe", "base_image_ref": "907851ac", "owner_user_name": "u", "owner_project_name": "p",
    "boot_roles": "admin,member,reader", "instance_uuid": "f1235e07", "user_id": "u", "image_type": "snapshot",
    "made_by": "flow.py", "image_location": "snapshot", "image_state": "available", "owner_id": "p",
    "kernel_id": None, "ramdisk_id": "r-123", "block_device_mapping": "[]",
    "name": "snap", "disk_format": "qcow2", "status": "active", "owner": "p", "min_disk": 1, "tags": [],
}


def test_inherited_properties_removed_with_reasons() -> None:
    c = properties.plan(SNAPSHOT, {"imagekit_recipe": "debian-12", "os_type": "linux", "os_distro": "debian"})
    assert set(c.remove) == {"owner_specified.openstack.md5", "owner_specified.openstack.sha256",
                             "owner_specified.openstack.object", "base_image_ref", "owner_user_name",
                             "owner_project_name", "boot_roles", "instance_uuid", "user_id", "image_type",
                             "image_location", "image_state", "owner_id", "kernel_id"}
    assert all(c.remove.values())  # every removal says why
    # set: what differs; kept: the guest's own (os_*, hw_*), a real ramdisk, a volume's mapping, unknown keys
    assert c.set == {"imagekit_recipe": "debian-12", "os_type": "linux"}
    without = properties.plan(SNAPSHOT, {})
    assert "imagekit_recipe" in without.remove and "block_device_mapping" not in without.remove
    assert properties.plan(SNAPSHOT, {"name": "x", "status": "x"}).set == {}  # Glance's fields are not properties


# ---------------------------------------------------------------- the recipe model and cache key

GOOD = """\
name: snap
description: d
os: {type: linux, distro: debian, version: "12"}
build:
  method: snapshot
  base: {recipe: debian-12}
  provision:
    packages: [hello]
    user_data: "#cloud-config\\n{}\\n"
    scripts: ["echo hi", {file: setup.sh}]
  timeouts: {provision: 90s}
disk_size: 10G
"""


def load(tmp: Path, text: str) -> rec.Recipe:
    path = tmp / "snap.yaml"
    path.write_text(text)
    return rec.load(path)


def problems(tmp: Path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load(tmp, text)
    return "\n".join(info.value.problems) or info.value.message


def test_snapshot_recipe_validates(tmp_path: Path) -> None:
    (tmp_path / "setup.sh").write_text("echo setup\n")
    r = load(tmp_path, GOOD)
    assert r.build.method == "snapshot"
    assert r.build.provision.host_files() == [tmp_path / "setup.sh"]  # type: ignore[union-attr]
    assert r.build.timeouts.seconds().provision == 90  # type: ignore[union-attr]


@pytest.mark.parametrize(("change", "says"), [
    (("base: {recipe: debian-12}", "base: {}"), "exactly one of base.recipe"),
    (("base: {recipe: debian-12}", "base: {recipe: debian-12, image: {url: 'http://x/y', trust: first-use}}"),
     "exactly one of base.recipe"),
    (("base: {recipe: debian-12}", "base: {recipe: snap}"), "cannot start from itself"),
    (("user_data: \"#cloud-config\\n{}\\n\"", "user_data: hello"), "not a kind cloud-init runs"),
    (("{file: setup.sh}", "{file: missing.sh}"), "does not exist"),
    (("packages: [hello]", "packages: ['a;b']"), "not a package name"),
    (("timeouts: {provision: 90s}", "timeouts: {provision: soon}"), "not a duration"),
    (("type: linux", "type: windows"), "needs os.type linux"),
    (("  timeouts:", "  memory: 16M\n  timeouts:"), "at least 256M"),
])
def test_snapshot_recipe_problems(tmp_path: Path, change: tuple[str, str], says: str) -> None:
    (tmp_path / "setup.sh").write_text("echo setup\n")
    assert change[0] in GOOD
    assert says in problems(tmp_path, GOOD.replace(*change))


def test_cache_key_follows_content_not_timeouts(tmp_path: Path) -> None:
    (tmp_path / "setup.sh").write_text("echo setup\n")
    tools = ToolVersions(imagekit="x", qemu_img="q")
    builder = builders.get("snapshot")

    def key(text: str) -> str:
        from imagekit import cache

        return cache.digest(builder.cache_inputs(load(tmp_path, text), tools))

    first = key(GOOD)
    assert key(GOOD.replace("provision: 90s", "provision: 2h")) == first
    assert key(GOOD.replace("[hello]", "[hello, tree]")) != first
    (tmp_path / "setup.sh").write_text("echo changed\n")
    assert key(GOOD) != first


# ---------------------------------------------------------------- shutdown: ACPI, then the agent, then a timeout


class FakeSockets:
    """A QMP and a guest agent socket; each command received is recorded and may end the fake QEMU."""

    def __init__(self, folder: Path, on_command: Callable[[str], None]) -> None:
        self.folder = folder
        self.on_command = on_command
        self.received: list[str] = []
        self.servers = []
        for name, greeting in (("qmp.sock", {"QMP": {"version": {}, "capabilities": []}}), ("qga.sock", None)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(folder / name))
            s.listen(4)
            self.servers.append(s)
            threading.Thread(target=self._serve, args=(s, greeting), daemon=True).start()

    def _serve(self, srv: socket.socket, greeting: dict[str, Any] | None) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rwb")
                if greeting:
                    f.write(json.dumps(greeting).encode() + b"\n")
                    f.flush()
                for line in f:
                    cmd = json.loads(line)
                    self.received.append(cmd["execute"])
                    if cmd["execute"] == "guest-sync":
                        f.write(b'{"return": 999}\n' + json.dumps({"return": cmd["arguments"]["id"]}).encode() + b"\n")
                    elif cmd["execute"] != "guest-shutdown":
                        f.write(b'{"event": "X"}\n{"return": {}}\n')
                    f.flush()
                    self.on_command(cmd["execute"])

    def close(self) -> None:
        for s in self.servers:
            s.close()


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[Process]:
    """A child that exits 0 on SIGTERM, as QEMU does when its guest powers off."""
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "print('ready', flush=True); time.sleep(120)")
    with Process([sys.executable, "-c", code], log_path=tmp_path / "qemu.log") as proc:
        while b"ready" not in proc.read_log(0):
            assert proc.running()
            time.sleep(0.02)
        yield proc


@pytest.mark.parametrize(("obeys", "expected"), [("system_powerdown", "acpi"), ("guest-shutdown", "agent"),
                                                  (None, None)])
def test_shutdown_sequence(tmp_path: Path, fake_qemu: Process, obeys: str | None, expected: str | None) -> None:
    def on_command(cmd: str) -> None:
        if cmd == obeys and fake_qemu.pid:
            os.kill(fake_qemu.pid, signal.SIGTERM)  # the guest powers off: QEMU exits 0

    socks = FakeSockets(tmp_path, on_command)
    said: list[str] = []
    try:
        if expected is None:
            with pytest.raises(ShutdownFailed, match="did not shut down"):
                shutdown(fake_qemu, tmp_path, 1.0, said.append)
            assert fake_qemu.running()  # the caller's Process context then kills it
        else:
            assert shutdown(fake_qemu, tmp_path, 2.0, said.append) == expected
            assert fake_qemu.poll() == 0
    finally:
        socks.close()
    assert socks.received[:2] == ["qmp_capabilities", "system_powerdown"]
    assert ("guest-shutdown" in socks.received) == (obeys != "system_powerdown")


def test_monitor_errors(tmp_path: Path) -> None:
    with pytest.raises(monitor.MonitorError, match="cannot connect"):
        monitor.qmp_command(tmp_path / "absent.sock", "system_powerdown", timeout=1)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "mute.sock"))
    srv.listen(1)
    try:
        with pytest.raises(monitor.MonitorError, match="no answer"):
            monitor.qmp_command(tmp_path / "mute.sock", "system_powerdown", timeout=0.5)
    finally:
        srv.close()


# ---------------------------------------------------------------- CLI usage errors (before any cloud is touched)


@pytest.mark.parametrize(("args", "says"), [
    ((), "give --image"),
    (("--image", "a", "--server", "b"), "give --image"),
    (("--image", "a", "--flavor", "f", "--marker", "done"), "--marker is for an existing server"),
    (("--server", "s", "--user-data", "/dev/null"), "--user-data and --ssh-public-key are for a new server"),
    (("--image", "a", "--flavor", "f", "--user-data", "/nonexistent/ud"), "does not exist"),
])
def test_snapshot_cli_usage_errors(imagekit: Callable[..., Any], args: tuple[str, ...], says: str) -> None:
    res = imagekit("--json", "snapshot", "--cloud", "nowhere", *args)
    assert res.code == 2, res.err
    doc = res.json()
    assert doc["error"]["code"] == "usage" and says in doc["error"]["message"]


def test_snapshot_is_a_registered_build_method() -> None:
    assert "snapshot" in builders.methods()
    assert shutil.which("sh")
