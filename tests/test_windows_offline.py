"""Offline checks, Windows customise steps and ``inspect --guest`` on a phony Windows Server 2022 disk.

The disk is built the way libguestfs builds its own test guests (``tests/windows_phony.py``:
GPT with ESP/MSR/NTFS, SOFTWARE and SYSTEM hives written with hivex, a PE32+ ``cmd.exe``
stub), once per machine and cached; libguestfs' inspection reports it as ``win2k22``. The
"finished" disk passes every check; qcow2 overlays of it, each missing one piece, fail with
that piece's finding. All of them are checked in one appliance run. Customise steps are read
back with hivex's own command-line tool (``hivexget``) and libguestfs, not with imagekit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagekit.accel import AccelChoice
from imagekit.customise import customise
from imagekit.guest import GuestSession, open_image
from imagekit.steps import parse_step_texts
from imagekit.windows import catalog, offline, unattend
from tests import windows_phony as phony
from tests.guest_image import HAVE_GUESTFS

TCG = AccelChoice("tcg", "tcg", "chosen by the test")
try:
    import hivex  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401

    HAVE_HIVEX = True
except ImportError:
    HAVE_HIVEX = False

pytestmark = [
    pytest.mark.guestfs, pytest.mark.slow,
    pytest.mark.skipif(not HAVE_GUESTFS, reason="the guestfs Python binding is not importable"),
    pytest.mark.skipif(not HAVE_HIVEX, reason="the hivex Python binding is not importable (python3-hivex)"),
]
EXPECT = offline.Expectation(catalog.release("2k22"), "scsi", unattend.password_forms(phony.BUILD_PASSWORD))
# variant -> the finding it must produce
MISSING = {
    "not-generalized": "not-generalized",
    "no-cloudbase-init": "cloudbase-init-missing",
    "storage-not-boot-start": "storage-driver-not-boot-start",
    "no-network-driver": "network-driver-missing",
    "password-left": "build-password-left",
    "autologon-left": "build-password-left",
}


@pytest.fixture(scope="module")
def phony_image() -> Path:
    """The finished phony Windows Server 2022 disk (built once per machine, cached)."""
    return phony.phony_image()


@pytest.fixture(scope="module")
def finished(phony_image: Path) -> Iterator[GuestSession]:
    """The finished disk opened the way the build checks its result: read-only, inspected, mounted."""
    with open_image(phony_image, readonly=True, fmt="qcow2", accel=TCG) as s:
        yield s


@pytest.fixture(scope="module")
def variants(phony_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GuestSession]]:
    """One overlay per missing piece, made and checked in one appliance run (``windows_phony.variants``)."""
    g, sessions = phony.variants(phony_image, tmp_path_factory.mktemp("win-variants"), list(MISSING))
    try:
        yield sessions
    finally:
        g.close()


def test_the_finished_disk_is_windows_2022_and_passes_every_check(finished: GuestSession) -> None:
    s = finished
    assert (s.os_type, s.distro, s.info("osinfo"), s.info("product_variant")) == ("windows", "windows", "win2k22",
                                                                                   "Server")
    assert s.info("arch") == "x86_64"  # from the PE32+ cmd.exe stub
    assert {k: s.info(k) for k in phony.FACTS} == phony.FACTS  # what the overlays' sessions answer
    report = offline.check_session(s, EXPECT)
    assert report.findings == () and report.ok
    assert set(report.passed) == set(MISSING.values()) | {"wrong-release"}
    assert (report.osinfo, report.build, report.edition, report.image_state) == \
        ("win2k22", 20348, "ServerStandardEval", offline.GENERALIZED)


@pytest.mark.parametrize("variant", list(MISSING))
def test_each_missing_piece_fails_with_its_finding(variants: dict[str, GuestSession], variant: str) -> None:
    report = offline.check_session(phony.mount_variant(variants[variant]), EXPECT)
    assert [f.code for f in report.findings] == [MISSING[variant]], report.findings
    assert report.findings[0].message
    with pytest.raises(offline.OfflineCheckFailed) as err:
        offline.require(report, variant)
    assert err.value.code == "windows-offline-check" and MISSING[variant] in err.value.message
    assert err.value.to_dict()["findings"] == [{"code": f.code, "message": f.message} for f in report.findings]


def test_the_image_must_be_the_release_and_bus_of_the_recipe(finished: GuestSession) -> None:
    s = finished
    other = offline.check_session(s, offline.Expectation(catalog.release("2k19"), "scsi"))
    assert [f.code for f in other.findings] == ["wrong-release"]
    assert "inspection says win2k22" in other.findings[0].message and "build is 20348" in other.findings[0].message
    desktop = offline.check_session(s, offline.Expectation(catalog.release("w11"), "scsi"))
    assert "Server installation" in desktop.findings[0].message
    virtio = offline.check_session(s, offline.Expectation(catalog.release("2k22"), "virtio"))
    assert [f.code for f in virtio.findings] == ["storage-driver-not-boot-start"]
    assert "viostor" in virtio.findings[0].message and "Start=3" in virtio.findings[0].message
    assert offline.check_session(s, offline.Expectation(catalog.release("2k22"), "sata")).ok  # Windows' own driver


# ---------------------------------------------------------------- customise steps, read back


STEPS = [
    r"{op: registry, key: 'HKLM\SOFTWARE\Contoso\Agent', values: [{name: Port, type: REG_DWORD, data: 8443},"
    r" {name: Servers, type: REG_MULTI_SZ, data: [a.example, b.example]}, {name: Home, data: 'C:\Contoso'}]}",
    r"{op: registry, key: 'HKLM\SYSTEM\CurrentControlSet\Services\QEMU-GA', delete: [Type, NotThere]}",
    r"{op: registry, key: 'HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\{7E3B2F1A-0C4D-4B8E-9F6A-5D2C1B0A9F88}',"
    r" delete_key: true}",
    "{op: write, path: /programdata/Contoso/agent.conf, content: \"port=8443\\r\\n\"}",
    "{op: mkdir, path: /Windows/TEMP/contoso}",
    "{op: delete, path: /WINDOWS/Panther/unattend.xml}",
    "{op: firstboot-powershell, name: 20-join, script: \"Write-Output joined\"}",
    "{op: hostname, hostname: desk-42.example.org}",
    "{op: timezone, timezone: Europe/Berlin}",
    "{op: rdp, enabled: true}",
]


def hivexget(hive: Path, key: str, value: str | None = None) -> str:
    argv = ["hivexget", str(hive), key] + ([value] if value is not None else [])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return res.stdout.strip() if res.returncode == 0 else f"<{res.returncode}: {res.stderr.strip()}>"


@pytest.fixture(scope="module")
def customised(phony_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("win-custom")
    out = d / "custom.qcow2"
    seen: dict[str, Any] = {"results": None}

    def read_back(s: GuestSession) -> None:
        for name in ("SOFTWARE", "SYSTEM"):
            s.g.download(f"/Windows/System32/config/{name}", str(d / name))
        seen["agent.conf"] = bytes(s.g.read_file("/ProgramData/Contoso/agent.conf"))
        seen["dirs"] = s.g.ls("/Windows/Temp")
        seen["panther"] = s.g.ls("/Windows/Panther")
        seen["local_scripts"] = {n: bytes(s.g.read_file(f"/{phony.CBI}/LocalScripts/{n}"))
                                 for n in s.g.ls(f"/{phony.CBI}/LocalScripts")}

    seen["results"] = customise(phony_image, parse_step_texts(STEPS, "."), output=out, accel=TCG, after=read_back)
    seen["dir"], seen["image"] = d, out
    return seen


def test_windows_steps_read_back(customised: dict[str, Any]) -> None:
    if shutil.which("hivexget") is None:
        pytest.skip("hivexget (libhivex-bin) is not installed")
    d: Path = customised["dir"]
    sw, sy = d / "SOFTWARE", d / "SYSTEM"
    assert hivexget(sw, "\\Contoso\\Agent", "Port") == "8443"
    assert hivexget(sw, "\\Contoso\\Agent", "Home") == "C:\\Contoso"
    assert "a.example" in hivexget(sw, "\\Contoso\\Agent", "Servers")
    ga = hivexget(sy, "\\ControlSet001\\Services\\QEMU-GA")
    assert "ImagePath" in ga and '"Type"' not in ga and '"Start"' in ga
    assert hivexget(sw, "\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\{7E3B2F1A-0C4D-4B8E-9F6A-5D2C1B0A9F88}") \
        .startswith("<")  # the key is gone
    assert hivexget(sy, "\\ControlSet001\\Control\\ComputerName\\ComputerName", "ComputerName") == "DESK-42"
    assert hivexget(sy, "\\ControlSet001\\Services\\Tcpip\\Parameters", "Hostname") == "desk-42"
    assert hivexget(sy, "\\ControlSet001\\Services\\Tcpip\\Parameters", "Domain") == "example.org"
    tz = "\\ControlSet001\\Control\\TimeZoneInformation"
    assert hivexget(sy, tz, "TimeZoneKeyName") == "W. Europe Standard Time"
    assert hivexget(sy, tz, "Bias") == "-60"  # minutes west of UTC
    assert hivexget(sy, tz, "StandardName") == "@tzres.dll,-322"
    assert hivexget(sy, "\\ControlSet001\\Control\\Terminal Server", "fDenyTSConnections") == "0"
    rule = hivexget(sy, "\\ControlSet001\\Services\\SharedAccess\\Parameters\\FirewallPolicy\\FirewallRules",
                    "RemoteDesktop-UserMode-In-TCP")
    assert "|Active=TRUE|" in rule
    assert customised["agent.conf"] == b"port=8443\r\n"
    assert "contoso" in customised["dirs"]
    assert "unattend.xml" not in customised["panther"]
    assert customised["local_scripts"]["20-join.ps1"] == "\ufeffWrite-Output joined".encode()
    assert [r.ok for r in customised["results"]] == [True] * len(STEPS)


def test_inspect_guest_shows_edition_build_applications_and_drivers(customised: dict[str, Any], imagekit) -> None:  # type: ignore[no-untyped-def]
    res = imagekit("--accel", "tcg", "inspect", str(customised["image"]), "--guest", "--json", timeout=600)
    assert res.code == 0, res.err
    info = res.json()
    assert isinstance(info, dict)
    assert info["os"]["osinfo"] == "win2k22" and info["os"]["hostname"] == "desk-42"
    w = info["windows"]
    assert (w["edition_id"], w["installation_type"], w["build"]) == ("ServerStandardEval", "Server", "20348.2849")
    assert w["image_state"] == offline.GENERALIZED and w["computer_name"] == "DESK-42"
    assert {(d["name"], d["driver_class"], d["provider"], d["version"]) for d in w["drivers"]} == {
        ("netkvm", "Net", "Red Hat, Inc.", "100.95.104.26200"),
        ("vioscsi", "SCSIAdapter", "Red Hat, Inc.", "100.95.104.26200")}
    assert "vioscsi" in w["boot_drivers"] and "viostor" not in w["boot_drivers"]
    apps = {a["display_name"] for a in info["applications"]}
    assert "Cloudbase-Init 1.1.6" in apps and "QEMU guest agent" not in apps  # its key was deleted by a step
    assert info["cloudbase_init"] is True
    customised["report"] = info
    assert json.loads(res.out)  # exactly one JSON document


def test_inspect_guest_human_output_for_windows(customised: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The display of the same report (the appliance is not launched again: the report is the JSON one)."""
    from click.testing import CliRunner

    from imagekit import sbom
    from imagekit.cli import cli

    info = customised.get("report")
    if info is None:
        pytest.skip("needs the report of test_inspect_guest_shows_edition_build_applications_and_drivers")
    monkeypatch.setattr(sbom, "inspect_guest", lambda *_a, **_k: info)
    res = CliRunner().invoke(cli, ["--accel", "tcg", "inspect", str(customised["image"]), "--guest"])
    assert res.exit_code == 0, res.output
    for text in ("edition       ServerStandardEval (Server), build 20348.2849", "netkvm 100.95.104.26200 (Net, Red Hat",
                 "boot drivers  ", "Cloudbase-Init 1.1.6", "image state   IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"):
        assert text in res.output, res.output
