"""Guest inspection and SBOMs on the real Debian 12 test image (libguestfs under TCG).

One read-only session (module fixture) answers both ``guest_info`` and the
independent ground truth (the image's own /var/lib/dpkg/status).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagekit import sbom
from tests import guest_image
from tests.json_contract import assert_document

needs_guest = guest_image.NEEDS_GUEST


@pytest.fixture(scope="module")
def inspected() -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    from imagekit.guest import open_image

    image = guest_image.debian_image()
    with open_image(image, readonly=True, fmt="qcow2") as s:
        info = sbom.guest_info(s)
        status = guest_image.dpkg_status(s.read_text("/var/lib/dpkg/status"), installed_only=True)
    return info, status


class TestRealImage:
    pytestmark = needs_guest

    def test_os(self, inspected: tuple[dict[str, Any], Any]) -> None:
        info, _ = inspected
        o = info["os"]
        assert o["type"] == "linux" and o["distro"] == "debian" and o["major_version"] == 12
        assert re.match(r"^12\.\d+$", o["version"])
        assert o["product_name"].startswith("12.") or "Debian" in o["product_name"]
        assert o["arch"] == "x86_64" and o["hostname"] == "debian-test"
        assert info["package_format"] == "deb" and info["package_management"] == "apt"
        assert info["mountpoints"] == {"/": "/dev/sda1"}
        assert info["cloud_init"] is True and info["qemu_guest_agent"] is True
        assert info["kernels"] == [] and info["bootloader"] is None  # debootstrap: no kernel, no loader

    def test_applications_match_dpkg_status(self, inspected: tuple[dict[str, Any], Any]) -> None:
        info, status = inspected
        apps = {f"{a['name']}:{a['arch']}": a for a in info["applications"]}
        assert set(apps) == set(status)
        assert info["package_count"] == len(status)
        for name in ("apt:amd64", "systemd:amd64", "base-files:amd64", "openssh-server:amd64", "cloud-init:all"):
            assert apps[name]["version"] == status[name]["Version"], name

    def test_cyclonedx(self, inspected: tuple[dict[str, Any], Any]) -> None:
        info, status = inspected
        bom = sbom.to_cyclonedx(info)
        json.dumps(bom)
        assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5"
        assert re.match(r"^urn:uuid:[0-9a-f-]{36}$", bom["serialNumber"])
        assert bom["metadata"]["component"]["type"] == "operating-system"
        assert bom["metadata"]["component"]["name"] == "debian"
        comps = {c["name"]: c for c in bom["components"]}
        assert len(bom["components"]) == len(status)
        apt_ver = status["apt:amd64"]["Version"]
        assert comps["apt"]["version"] == apt_ver
        assert comps["apt"]["purl"] == f"pkg:deb/debian/apt@{apt_ver}?arch=amd64&distro=debian-12"
        bf = status["base-files:amd64"]["Version"]
        assert comps["base-files"]["purl"].startswith("pkg:deb/debian/base-files@" + bf.replace("+", "%2B"))
        assert comps["systemd"]["version"] == status["systemd:amd64"]["Version"]
        refs = [c["bom-ref"] for c in bom["components"]]
        assert len(refs) == len(set(refs))
        assert bom["dependencies"][0]["dependsOn"] == refs

    def test_spdx(self, inspected: tuple[dict[str, Any], Any]) -> None:
        info, status = inspected
        doc = sbom.to_spdx(info)
        assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
        ids = [p["SPDXID"] for p in doc["packages"]]
        assert len(ids) == len(set(ids)) == len(status) + 1
        assert all(re.match(r"^SPDXRef-[A-Za-z0-9.-]+$", i) for i in ids)
        pk = next(p for p in doc["packages"] if p["name"] == "systemd")
        assert pk["versionInfo"] == status["systemd:amd64"]["Version"]
        assert pk["externalRefs"][0]["referenceType"] == "purl"
        assert doc["relationships"][0] == {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                                           "relatedSpdxElement": "SPDXRef-OperatingSystem"}
        assert sum(r["relationshipType"] == "CONTAINS" for r in doc["relationships"]) == len(status)

    def test_cli_guest_inspect_sbom(self) -> None:
        image = guest_image.debian_image()
        proc = subprocess.run([sys.executable, "-m", "imagekit", "guest-inspect", str(image), "--sbom", "cyclonedx"],
                              capture_output=True, text=True, timeout=400,
                              cwd=str(Path(__file__).resolve().parent.parent))
        assert proc.returncode == 0, proc.stderr
        bom = json.loads(proc.stdout)
        assert bom["bomFormat"] == "CycloneDX"
        assert any(c["name"] == "apt" for c in bom["components"])
        proc = subprocess.run([sys.executable, "-m", "imagekit", "guest-inspect", str(image), "--json"],
                              capture_output=True, text=True, timeout=400,
                              cwd=str(Path(__file__).resolve().parent.parent))
        assert proc.returncode == 0, proc.stderr
        report = assert_document("guest-inspect", proc.stdout)
        assert report["os"]["distro"] == "debian" and report["package_count"] > 100


class TestGuestErrors:
    pytestmark = needs_guest

    def test_launch_timeout_kills_the_appliance(self, tmp_path: Path) -> None:
        from imagekit.guest import GuestError, _child_qemu_pids, open_image

        image = guest_image.debian_image()
        with pytest.raises(GuestError) as ei:
            open_image(image, readonly=True, fmt="qcow2", launch_timeout=1.0)
        assert "did not start within 1 s" in ei.value.message and ei.value.hint
        assert _child_qemu_pids() == []

    def test_disk_without_os(self, tmp_path: Path) -> None:
        from imagekit.guest import GuestError, open_image

        blank = tmp_path / "blank.raw"
        with open(blank, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        with pytest.raises(GuestError) as ei:
            open_image(blank, readonly=True, fmt="raw")
        assert "no operating system" in ei.value.message


def test_bad_format_and_missing_file(tmp_path: Path) -> None:
    from imagekit.guest import GuestError, open_image

    with pytest.raises(GuestError):
        open_image(tmp_path / "x.vmdk", readonly=True, fmt="vmdk")
    with pytest.raises(GuestError):
        open_image(tmp_path / "missing.qcow2", readonly=True, fmt="qcow2")


# ---------------------------------------------------------------- package URLs (no guest needed)

DEB_INFO = {"package_format": "deb", "os": {"distro": "ubuntu", "major_version": 24, "version": "24.4"}}
RPM_INFO = {"package_format": "rpm", "os": {"distro": "rhel", "major_version": 9, "version": "9.4"}}


def _app(name: str, version: str, release: str = "", epoch: int = 0, arch: str = "x86_64",
         fmt: str = "rpm") -> dict[str, Any]:
    a = {"name": name, "upstream_version": version, "release": release, "epoch": epoch, "arch": arch}
    a["version"] = sbom._full_version({"app2_version": version, "app2_release": release, "app2_epoch": epoch}, fmt)
    return a


def test_purl_deb_with_epoch() -> None:
    app = _app("libfoo", "2.3", "4ubuntu1", epoch=1, arch="amd64", fmt="deb")
    assert app["version"] == "1:2.3-4ubuntu1"
    assert sbom.purl(app, DEB_INFO) == "pkg:deb/ubuntu/libfoo@1%3A2.3-4ubuntu1?arch=amd64&distro=ubuntu-24"


def test_purl_rpm_with_epoch() -> None:
    app = _app("bash", "5.1.8", "9.el9", epoch=2)
    assert app["version"] == "5.1.8-9.el9"
    assert sbom.purl(app, RPM_INFO) == "pkg:rpm/redhat/bash@5.1.8-9.el9?arch=x86_64&distro=rhel-9.4&epoch=2"


def test_windows_apps_have_no_purl_but_are_listed() -> None:
    app: dict[str, Any] = {"name": "Cloudbase-Init", "version": "1.1.4", "arch": "", "summary": None}
    info: dict[str, Any] = {"package_format": None, "applications": [app],
                            "os": {"type": "windows", "distro": "windows", "version": "10.0"}}
    assert sbom.purl(app, info) is None
    bom = sbom.to_cyclonedx(info)
    assert bom["components"][0]["name"] == "Cloudbase-Init" and "purl" not in bom["components"][0]
    doc = sbom.to_spdx(info)
    assert doc["packages"][1]["name"] == "Cloudbase-Init" and "externalRefs" not in doc["packages"][1]
