"""``build.method: snapshot`` end to end under QEMU (TCG), on the Debian image the suite builds.

The base is ``base: {recipe: debian-12}``: run with the session's ``build_env`` (the cache of
the one real ``imagekit build debian-12``, ``tests/debian_build.py``), the pipeline finds
debian-12's build, customise and convert stages in that cache, so diskimage-builder does not
run again; the snapshot's manifest names the very same base image (its sha256).

- a provision that installs a package (from the Debian mirror, through the guest's own apt),
  writes a file and runs a script: read back offline (libguestfs) from the result, which is
  generalised (empty ``/etc/machine-id``, no SSH host keys, ``/var/lib/cloud`` clean, no
  journal or DHCP lease), and boots again with new SSH host keys;
- a provision whose cloud-init fails and one that hangs: both fail with the console's last
  lines, and leave no QEMU process, no work folder, no output and no cache entry.

The Debian image configures no network of its own (no ifupdown, systemd-networkd disabled:
see the report), so the provisions bring it up with ``dhclient`` in a ``bootcmd``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagekit import boot
from tests.conftest import ROOT
from tests.guest_image import HAVE_GUESTFS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root")]

NETWORK = "      bootcmd:\n        - [dhclient, '-1']\n"
RECIPE = """\
name: {name}
description: snapshot test
os: {{type: linux, distro: debian, version: "12"}}
build:
  method: snapshot
  base: {{recipe: debian-12}}
  provision:
{provision}  timeouts: {{boot: 15m, provision: {provision_timeout}, generalise: 5m, shutdown: 3m}}
disk_size: 10G
"""
GOOD = """\
    packages: [hello]
    user_data: |
      #cloud-config
""" + NETWORK + """\
      write_files:
        - path: /etc/imagekit-snapshot-test
          content: "provisioned by imagekit\\n"
    scripts:
      - "echo script-ran > /var/lib/imagekit-script"
"""
FAILS = """\
    user_data: |
      #cloud-config
      bootcmd:
        - [sh, -c, 'echo imagekit-provision-fails; exit 3']
"""
HANGS = """\
    user_data: |
      #cloud-config
      bootcmd:
        - [sh, -c, 'echo imagekit-provision-hangs; sleep 3600']
"""


def build(recipe: Path, out: Path, env: dict[str, str], timeout: float = 2400) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-m", "imagekit", "--json", "--accel", "tcg", "build", str(recipe),
                           "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=timeout)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def write_recipe(tmp: Path, name: str, provision: str, provision_timeout: str = "20m") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, provision=provision, provision_timeout=provision_timeout))
    return path


def qemu_processes(marker: str) -> list[str]:
    """Command lines of running QEMU processes that mention ``marker`` (a cache folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and marker in cmd:
                found.append(cmd)
    return found


@pytest.fixture(scope="module")
def snap_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("snap"), "snap-debian", GOOD)


@pytest.fixture(scope="module")
def snap(debian: dict[str, Any], build_env: dict[str, str], snap_recipe: Path) -> dict[str, Any]:
    code, doc, err = build(snap_recipe, snap_recipe.parent / "out", build_env)
    assert code == 0, err[-4000:] + json.dumps(doc)[-2000:]
    return doc


def test_snapshot_build_and_its_manifest(snap: dict[str, Any], debian: dict[str, Any]) -> None:
    assert snap["verdict"] == "accept" and snap["output"]["format"] == "qcow2"
    stage = {s["name"]: s for s in snap["stages"]}
    facts = stage["build"]["details"]["facts"]
    assert facts["base"] == "debian-12" and facts["cloud_init_status"] == "done"
    assert facts["shutdown"] == "acpi"  # the ACPI power button worked; the agent was not needed
    m = json.loads(Path(snap["manifest"]).read_text())
    assert m["recipe"]["build_method"] == "snapshot"
    base = next(i for i in m["inputs"] if i["name"] == "base image")
    assert base["sha256"] == debian["output"]["sha256"]  # the suite's own Debian image, from the cache
    assert any(i["name"] == "base recipe" and i["path"].endswith("recipes/debian-12.yaml") for i in m["inputs"])
    packages = {p["name"]: p["version"] for p in m["guest"]["packages"]}  # read offline by the pipeline
    assert "hello" in packages
    console = Path(stage["build"]["output"]).parent / facts["console_log"]
    assert "IMAGEKIT-GENERALISED" in console.read_text(errors="replace")


def test_unchanged_snapshot_recipe_is_a_cache_hit(snap: dict[str, Any], snap_recipe: Path, build_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    code, again, err = build(snap_recipe, tmp_path / "out", build_env)
    assert code == 0, err[-3000:]
    assert {s["name"]: s["cached"] for s in again["stages"]} == {"build": True, "customise": True, "convert": True,
                                                                 "check": False}
    assert again["output"]["sha256"] == snap["output"]["sha256"]
    assert qemu_processes(build_env["IMAGEKIT_CACHE_DIR"]) == []


@pytest.mark.guestfs
@pytest.mark.skipif(not HAVE_GUESTFS, reason="the guestfs Python binding is not importable")
def test_result_read_back_offline_is_provisioned_and_generalised(snap: dict[str, Any]) -> None:
    from imagekit.guest import open_image

    with open_image(snap["output"]["path"], readonly=True, fmt="qcow2", accel="tcg") as s:
        g = s.g
        assert s.read_text("/etc/imagekit-snapshot-test") == "provisioned by imagekit\n"
        assert s.read_text("/var/lib/imagekit-script") == "script-ran\n"
        assert s.is_file("/usr/bin/hello")
        assert "Package: hello\nStatus: install ok installed" in s.read_text("/var/lib/dpkg/status")
        assert s.read_text("/etc/machine-id") == ""  # uninitialised: systemd makes a new one
        assert [k for k in g.ls("/etc/ssh") if k.startswith("ssh_host_")] == []
        for folder in ("/var/lib/cloud", "/var/log/journal"):  # cloud-init's state and the journal: gone
            assert not s.is_dir(folder) or g.ls(folder) == [], folder
        assert [f for f in g.ls("/var/lib/dhcp") if f.endswith(".leases")] == []
        assert not s.exists("/var/log/cloud-init.log") or s.read_text("/var/log/cloud-init.log") == ""


def fingerprints(text: str) -> set[str]:
    return set(re.findall(r"SHA256:[A-Za-z0-9+/]{43}", text))


def test_result_boots_again_with_new_host_keys(snap: dict[str, Any], tmp_path: Path) -> None:
    stage = next(s for s in snap["stages"] if s["name"] == "build")
    provisioning = (Path(stage["output"]).parent / stage["details"]["facts"]["console_log"]).read_text(errors="replace")
    old = fingerprints(provisioning)
    assert old, "cloud-init printed the provisioning boot's host keys"
    user_data = ("#cloud-config\nruncmd:\n  - [sh, -c, 'for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf $k; "
                 f"done > /dev/ttyS0; echo machine-id $(cat /etc/machine-id) > /dev/ttyS0; echo {boot.MARKER} "
                 "> /dev/ttyS0']\n")
    log = tmp_path / "console.log"
    res = boot.boot(snap["output"]["path"], "qcow2", timeout=900, accel_name="tcg", console_log=log,
                    user_data=user_data)
    assert res.ok, res.console_tail
    text = log.read_text(errors="replace")
    new = fingerprints(text)
    assert new and not (new & old), (new, old)
    assert re.search(r"machine-id [0-9a-f]{32}\b", text)


@pytest.mark.parametrize(("case", "provision", "timeout", "code", "says", "logged"), [
    ("fails", FAILS, "20m", "snapshot-provision-failed", "Exit code: 3", "imagekit-provision-fails"),
    ("hangs", HANGS, "15s", "snapshot-timeout", "imagekit-provision-hangs", "imagekit-provision-hangs"),
])
def test_failing_provision_leaves_nothing(debian: dict[str, Any], build_env: dict[str, str], tmp_path: Path,
                                          case: str, provision: str, timeout: str, code: str, says: str,
                                          logged: str) -> None:
    name = f"snap-{case}"
    out = tmp_path / "out"
    rc, doc, err = build(write_recipe(tmp_path, name, provision, timeout), out, build_env)
    assert rc == 1, err[-3000:]
    assert doc["error"]["code"] == code, doc
    assert "--- console (last lines) ---" in doc["error"]["message"] and says in doc["error"]["message"]
    kept = Path(build_env["IMAGEKIT_STATE_DIR"]) / "logs" / f"snapshot-{name}.console.log"
    assert str(kept) in doc["error"]["hint"] and logged in kept.read_text(errors="replace")  # the whole console, kept
    cache = Path(build_env["IMAGEKIT_CACHE_DIR"])
    assert qemu_processes(str(cache)) == []
    assert not out.exists() or list(out.iterdir()) == []
    work = cache / "work"
    assert not work.is_dir() or [p.name for p in work.iterdir()] == []  # the work folder (overlay, seed) is gone
    listed = subprocess.run([sys.executable, "-m", "imagekit", "--json", "cache", "list"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, **build_env}, check=True)
    assert name not in {row["recipe"] for row in json.loads(listed.stdout)["entries"]}
