"""`imagekit build` end to end, for real: debian-12 with real diskimage-builder, customised
with libguestfs, converted and checked, uploaded to the real local Glance, booted under
QEMU to cloud-init's final stage; the step cache; the cloud-image builder served from
127.0.0.1. One cold build (``tests/debian_build.py``, session-scoped) is shared by the tests
of this module and the snapshot tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagekit.cloud import connect
from tests.conftest import ROOT
from tests.debian_build import run_build
from tests.http_fixture import FileServer
from tests.json_contract import assert_document

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root")]


def stages(result: dict[str, Any]) -> dict[str, bool]:
    return {s["name"]: s["cached"] for s in result["stages"]}


def test_debian_build_output_and_manifest(debian: dict[str, Any]) -> None:
    out = Path(debian["output"]["path"])
    assert out.is_file() and out.name == "debian-12.qcow2"
    assert debian["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert debian["verdict"] == "accept" and debian["output"]["format"] == "qcow2"
    assert debian["output"]["virtual_size"] == 10 << 30  # the recipe's disk_size
    assert stages(debian) == {"build": False, "customise": False, "convert": False, "check": False,
                              "upload": False}
    m = json.loads(Path(debian["manifest"]).read_text())
    assert m["recipe"]["name"] == "debian-12" and len(m["recipe"]["digest"]) == 64
    assert m["elements"] == ["vm", "debian-minimal", "cloud-init-datasources", "imagekit-openstack"]
    assert m["tools"]["diskimage-builder"] and "qemu-img" in m["tools"]["qemu-img"]
    assert m["accelerator"]["accel"] in ("kvm", "tcg")
    assert all(s["seconds"] >= 0 for s in m["stages"])
    assert m["output"]["sha256"] == debian["output"]["sha256"] and m["check"]["verdict"] == "accept"
    assert m["glance"]["id"] == debian["glance"]["id"]
    names = {p["name"] for p in m["guest"]["packages"]}
    assert {"cloud-init", "qemu-guest-agent", "openssh-server", "systemd"} <= names  # really in the image
    assert m["guest"]["os"]["distro"] == "debian"
    assert any(i.get("name") == "recipe" and len(i["sha256"]) == 64 for i in m["inputs"])


def test_debian_uploaded_to_local_glance(debian: dict[str, Any], glance_env: Any) -> None:
    g = debian["glance"]
    assert g["verified"] is True and g["status"] == "active"
    img = connect("imagekit-local").glance.images.get(g["id"])
    assert img["status"] == "active" and img["disk_format"] == "qcow2"
    assert img["name"].startswith("debian-12-")
    assert img["os_hash_value"] == hashlib.sha512(Path(debian["output"]["path"]).read_bytes()).hexdigest()
    assert img.get("hw_qemu_guest_agent") == "yes" and img.get("hw_disk_bus") == "virtio"
    assert img.get("os_distro") == "debian" and img.get("os_version") == "12"
    assert "imagekit" in img["tags"]


def test_debian_boots_to_cloud_init(debian: dict[str, Any]) -> None:
    proc = subprocess.run([sys.executable, "-m", "imagekit", "--json", "boot", debian["output"]["path"], "--timeout",
                           "900", "--wait-for", "cloud-init"], capture_output=True, text=True, cwd=ROOT, timeout=1000)
    res = assert_document("boot", proc.stdout)
    assert proc.returncode == 0 and res["ok"], res.get("console_tail") or proc.stderr[-3000:]
    assert "login" in res["reached"] or "cloud-init" in res["reached"]


def test_unchanged_recipe_is_a_cache_hit(debian: dict[str, Any], build_env: dict[str, str],
                                        tmp_path: Path) -> None:
    again = run_build("debian-12", "--output-dir", str(tmp_path), env=build_env)
    assert stages(again) == {"build": True, "customise": True, "convert": True, "check": False}
    assert again["output"]["sha256"] == debian["output"]["sha256"]


def test_customise_change_reuses_the_base(debian: dict[str, Any], build_env: dict[str, str],
                                          tmp_path: Path) -> None:
    recipe = tmp_path / "debian-12-custom.yaml"
    recipe.write_text(f"extends: {ROOT / 'recipes' / 'debian-12.yaml'}\nname: debian-12-custom\n"
                      "customise+:\n  - {op: hostname, hostname: imagekit-custom}\n")
    res = run_build(str(recipe), "--output-dir", str(tmp_path / "out"), env=build_env)
    assert stages(res) == {"build": True, "customise": False, "convert": False, "check": False}
    assert res["output"]["sha256"] != debian["output"]["sha256"]


def test_cloud_image_builder_and_no_cache(debian: dict[str, Any], build_env: dict[str, str],
                                          tmp_path: Path) -> None:
    """A cloud-image recipe whose base (a real Debian qcow2) is served from 127.0.0.1 with a checksum file."""
    www = tmp_path / "www"
    www.mkdir()
    base = www / "debian-base.qcow2"
    shutil.copy(debian["output"]["path"], base)
    (www / "SHA256SUMS").write_text(f"{hashlib.sha256(base.read_bytes()).hexdigest()}  debian-base.qcow2\n")
    srv = FileServer(www).start()
    try:
        recipe = tmp_path / "served.yaml"
        recipe.write_text(
            "name: served\ndescription: a cloud image from a local server\n"
            "os: {type: linux, distro: debian, version: '12'}\n"
            f"build:\n  method: cloud-image\n  base:\n    url: {srv.url('debian-base.qcow2')}\n"
            f"    checksum_url: {srv.url('SHA256SUMS')}\n  format: qcow2\n"
            "disk_size: 12G\n"
        )
        first = run_build(str(recipe), "--output-dir", str(tmp_path / "a"), env=build_env)
        assert stages(first) == {"build": False, "customise": False, "convert": False, "check": False}
        assert first["output"]["virtual_size"] == 12 << 30  # grown to the recipe's disk size
        m = json.loads(Path(first["manifest"]).read_text())
        assert m["inputs"][0]["url"].endswith("debian-base.qcow2")
        assert m["inputs"][0]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
        cached = run_build(str(recipe), "--output-dir", str(tmp_path / "b"), env=build_env)
        assert stages(cached)["build"] and stages(cached)["convert"]
        fresh = run_build(str(recipe), "--output-dir", str(tmp_path / "c"), "--no-cache", env=build_env)
        assert stages(fresh) == {"build": False, "customise": False, "convert": False, "check": False}
        assert fresh["output"]["sha256"] == first["output"]["sha256"]
    finally:
        srv.stop()
