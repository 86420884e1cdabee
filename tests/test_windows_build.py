"""The ``windows`` build method: recipe validation, Glance properties and their linter, the refusal of
TCG, the whole builder run with stand-ins, and the real end-to-end build when real media are given.

The builder run (``test_builder_runs_every_stage_with_stand_ins``) uses the stand-ins of
``tests/windows_standins.py``: an install ISO holding a real WIM (wimlib) and a bootable UEFI
shell script that follows the install protocol, a virtio-win folder, an MSI-shaped file. Everything
before the install (downloads from file:// URLs, edition check, driver check, answer ISO) and
after it (the offline checks) is real; the stand-in guest leaves the disk empty, so the offline
check fails with ``not-windows``, which is what a build must do with such a disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imagekit import accel, builders, cache, pipeline
from imagekit import properties as pm
from imagekit import recipe as rec
from imagekit.accel import AccelChoice
from imagekit.builders.base import BuildContext, ToolVersions, run_builder
from imagekit.builders.windows import WindowsBuild, WindowsNeedsKvm, disk_bus
from imagekit.errors import RecipeError
from imagekit.windows import offline
from imagekit.windows.isofs import MediaError
from tests import windows_standins as ws
from tests.conftest import ROOT
from tests.guest_image import HAVE_GUESTFS
from tests.test_signals import tagged_processes

TCG = AccelChoice("tcg", "tcg", "chosen by the test")
WINDOWS_RECIPES = ["windows-server-2022", "windows-server-2019", "windows-11", "windows-10"]


def recipe_text(build: str = "", os_version: str = "2022", glance: str = "") -> str:
    return f"""name: win
description: a windows recipe
os: {{type: windows, distro: windows, version: "{os_version}"}}
disk_size: 8G
build:
  method: windows
  image_name: Windows Server 2022 SERVERSTANDARD
  install_media: {{url: http://127.0.0.1/w.iso, trust: first-use}}
  virtio_drivers: {{url: http://127.0.0.1/v.iso, trust: first-use}}
  cloudbase_init: {{url: http://127.0.0.1/c.msi, trust: first-use}}
{build}{glance}"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "win.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        rec.load(path)
    return err.value.problems


def load(tmp_path: Path, text: str) -> rec.Recipe:
    path = tmp_path / "win.yaml"
    path.write_text(text)
    return rec.load(path)


@pytest.mark.parametrize("name", WINDOWS_RECIPES)
def test_shipped_windows_recipes(name: str) -> None:
    r = rec.load(name)
    assert isinstance(r.build, WindowsBuild)
    release = r.build.release(r.os.version)
    assert release.os_id == {"windows-server-2022": "2k22", "windows-server-2019": "2k19", "windows-11": "w11",
                             "windows-10": "w10"}[name]
    src = r.build.install_media
    assert src.url.startswith("https://software-static.download.prss.microsoft.com/") and src.sha256
    assert r.build.cloudbase_init.url.startswith("https://cloudbase.it/") and r.build.cloudbase_init.trust == "first-use"
    props = pm.build(r)
    assert [f for f in pm.lint(props, r) if f.severity == "error"] == []
    assert props["os_admin_user"] == "Admin" and props["hw_qemu_guest_agent"] == "yes"
    assert props["hw_disk_bus"] == disk_bus(r) == "scsi"
    if name == "windows-11":
        assert r.build.tpm and r.build.secure_boot and r.build.rdp
        assert (props["hw_tpm_version"], props["hw_tpm_model"], props["os_secure_boot"]) == ("2.0", "tpm-crb", "required")
        assert pm.lint(props, r) == []  # no P019 warning either
    if not release.server:
        assert r.build.rdp  # cloud desktops


@pytest.mark.parametrize(("build", "version", "glance", "expected"), [
    ("  os_id: 2k19\n", "2022", "", "build.os_id 2k19 is not os.version 2022"),
    ("", "2016", "", "os.version '2016' names no Windows release imagekit knows"),
    ("", "11", "", "Windows 11 needs a TPM 2.0 and Secure Boot"),
    ("  disk_bus: virtio\n", "2022", "glance: {properties: {hw_disk_bus: scsi}}\n",
     "build.disk_bus virtio differs from glance.properties.hw_disk_bus scsi"),
    ("", "2022", "glance: {properties: {hw_disk_bus: usb}}\n", "'usb' is not a bus Windows can be built on"),
    ("  secure_boot: true\n  firmware: bios\n", "2022", "", "secure_boot needs firmware: uefi"),
    ("  timezone: Mars/Olympus\n", "2022", "", "build.timezone: 'Mars/Olympus' has no Windows time zone"),
    ("  language: english\n", "2022", "", "build.language: 'english' is not a Windows language tag"),
    ("  product_key: ABCDE-12345\n", "2022", "", "build.product_key: a product key is five groups"),
    ("  memory: 512M\n", "2022", "", "build.memory: Windows needs at least 1G"),
    ("  install_timeout: soon\n", "2022", "", "build.install_timeout: 'soon' is not a duration"),
    ("  virtio_drivers_dir: /nonexistent/virtio\n", "2022", "", "build.virtio_drivers_dir: /nonexistent/virtio is not"),
])
def test_windows_build_validation(tmp_path: Path, build: str, version: str, glance: str, expected: str) -> None:
    found = problems(tmp_path, recipe_text(build, version, glance))
    assert any(expected in p for p in found), found


def test_steps_in_a_windows_recipe_are_checked_for_windows(tmp_path: Path) -> None:
    steps = """customise:
  - {op: write, path: /x.txt, content: a, mode: '0644'}
  - {op: hostname, hostname: a-much-too-long-name.example.org}
  - {op: timezone, timezone: Mars/Olympus}
  - {op: registry, key: 'HKCU\\Software\\x', values: [{name: a, data: b}]}
  - {op: registry, key: 'HKLM\\SOFTWARE\\x', values: [{name: a, type: REG_DWORD, data: '1'}]}
  - {op: registry, key: 'HKLM\\SOFTWARE\\x', values: [{name: a, type: REG_MULTI_SZ, data: one}]}
  - {op: registry, key: 'HKLM\\SOFTWARE\\x', values: [{name: a, type: REG_BINARY, data: xyz}]}
  - {op: registry, key: 'HKLM\\SOFTWARE\\x', delete_key: true, delete: [a]}
  - {op: registry, key: 'HKLM\\SOFTWARE'}
  - {op: firstboot-powershell, name: 'bad name!', script: x}
  - {op: rdp, enabled: 'yes'}
  - {op: locale, locale: de_DE.UTF-8}
"""
    found = problems(tmp_path, recipe_text() + steps)
    expected = ["customise[0]: mode and owner do not apply to Windows guests",
                "customise[1].hostname: a Windows computer name has at most 15 characters",
                "customise[2].timezone: 'Mars/Olympus' has no Windows time zone",
                "customise[3].key: 'HKCU\\Software\\x' is not under HKLM\\SOFTWARE",
                "customise[4].values[0]: a: REG_DWORD data must be an integer",
                "customise[5].values[0]: a: REG_MULTI_SZ data is a list of strings",
                "customise[6].values[0]: a: REG_BINARY data is hexadecimal bytes",
                "customise[7]: delete_key removes the key",
                "customise[8].key: 'HKLM\\SOFTWARE' is the root of a hive",
                "customise[9].name: 'bad name!' is not a script name",
                "customise[10].enabled:",
                "customise[11]: step 'locale' does not apply to windows guests"]
    for want in expected:
        assert any(p.startswith(want) for p in found), (want, found)
    linux = (ROOT / "recipes/debian-12.yaml").read_text() + \
        "customise+:\n  - {op: rdp, enabled: true}\n  - {op: write, path: /x, content: a, mode: '0600'}\n"
    found = problems(tmp_path, linux)
    assert any("step 'rdp' does not apply to linux guests (it applies to: windows)" in p for p in found), found
    assert not any("customise" in p and "mode" in p for p in found)  # mode is fine on Linux


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize(("overrides", "code", "severity"), [
    ({"os_admin_user": "Administrator"}, "P016", "error"),
    ({"os_admin_user": ""}, "P016", "error"),  # unset: Nova's default, Administrator
    ({"hw_disk_bus": "virtio"}, "P017", "error"),
    ({"hw_disk_bus": ""}, "P017", "error"),
    ({"hw_firmware_type": "bios", "os_secure_boot": ""}, "P020", "error"),
    ({"hw_tpm_model": "tpm-crb", "hw_tpm_version": "1.2"}, "P018", "error"),
    ({"hw_tpm_model": "tpm-tis"}, "P021", "warning"),
    ({"hw_tpm_version": "3.0"}, "P005", "error"),
    ({"os_secure_boot": "optional", "hw_firmware_type": "bios"}, "P001", "error"),
    ({"os_secure_boot": "optional", "hw_machine_type": "pc"}, "P002", "error"),
    ({"os_secure_boot": "required", "hw_machine_type": "pc-i440fx-7.2"}, "P002", "error"),
])
def test_windows_property_rules(overrides: dict[str, str], code: str, severity: str) -> None:
    r = rec.load("windows-server-2022")
    findings = [f for f in pm.lint(pm.build(r, overrides), r) if f.code == code]
    assert findings and findings[0].severity == severity, pm.lint(pm.build(r, overrides), r)
    assert code in pm.RULES


def test_windows_11_without_tpm_or_secure_boot_is_warned_about() -> None:
    r = rec.load("windows-11")
    for overrides in ({"hw_tpm_version": "", "hw_tpm_model": ""}, {"os_secure_boot": ""}):
        found = {f.code: f.severity for f in pm.lint(pm.build(r, overrides), r)}
        assert found.get("P019") == "warning", found


def test_profile_follows_the_build() -> None:
    r = rec.load("windows-10")
    data = r.model_dump(mode="json", exclude_none=True)
    data["build"].update(disk_bus="virtio", tpm=True, firmware="bios")
    data["glance"]["properties"].pop("hw_disk_bus")
    data["glance"]["properties"].pop("hw_scsi_model")
    data["glance"]["properties"]["hw_firmware_type"] = "bios"
    data["build"]["cloudbase_init"]["user"] = "Administrator"
    r2 = rec.validate_data(data)
    props = pm.build(r2)
    assert props["hw_disk_bus"] == "virtio" and "hw_scsi_model" not in props
    assert props["os_admin_user"] == "Administrator" and props["hw_tpm_version"] == "2.0"
    assert "os_secure_boot" not in props
    assert [f.code for f in pm.lint(props, r2) if f.severity == "error"] == []


# ---------------------------------------------------------------- the builder


def test_tcg_is_refused_before_anything_is_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagekit import download

    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "fetch", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    fell_back = AccelChoice("tcg", "auto", "KVM probe: a KVM guest printed nothing within 10 s")
    with pytest.raises(WindowsNeedsKvm) as err:
        pipeline.build(rec.load("windows-server-2022"), tmp_path / "out", pipeline.BuildOptions(accel=fell_back))
    assert "--accel tcg" in (err.value.hint or "") and err.value.exit_code == 1
    assert cache.entries() == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_cache_inputs_name_the_inputs_and_the_bus() -> None:
    r = rec.load("windows-server-2022")
    inputs = builders.get("windows").cache_inputs(r, ToolVersions("t", qemu_img="q"))
    assert inputs["inputs"]["install_media"] == "sha256:" + (r.build.install_media.sha256 or "")  # type: ignore[attr-defined]
    assert inputs["inputs"]["virtio_drivers"] == "first-use" and inputs["disk_bus"] == "scsi"
    assert len(inputs["provisioning"]) == 64


def standin_recipe(tmp_path: Path, image_name: str = "Windows Server 2022 SERVERSTANDARD") -> rec.Recipe:
    iso = ws.install_iso(tmp_path / "install.iso", udf=False, startup="ok")
    ws.virtio_tree(tmp_path / "virtio-win", os_ids=("2k22",))  # virtio_drivers_dir, relative to the recipe
    msi = ws.fake_msi(tmp_path / "CloudbaseInitSetup.msi")
    return load(tmp_path, f"""name: win-standin
description: the windows build method with stand-in media
os: {{type: windows, distro: windows, version: "2022"}}
disk_size: 1G
build:
  method: windows
  image_name: {image_name}
  install_media: {{url: "file://{iso}", trust: first-use}}
  virtio_drivers_dir: virtio-win
  cloudbase_init: {{url: "file://{msi}", trust: first-use, user: Administrator}}
  memory: 1G
  cpus: 1
  install_timeout: 3m
  powershell: "Write-Host 'from the recipe'"
""")


@pytest.mark.skipif(shutil.which("wimlib-imagex") is None, reason="wimtools is needed")
def test_a_wrong_edition_stops_the_build_before_anything_boots(tmp_path: Path) -> None:
    r = standin_recipe(tmp_path, image_name="Windows Server 2022 SERVERWEB")
    out = tmp_path / "base.qcow2"
    with pytest.raises(MediaError, match="'Windows Server 2022 SERVERWEB' is not in"):
        run_builder(builders.get("windows"), r, out, BuildContext(accel=TCG, tools=ToolVersions("t")))
    assert not out.exists()
    assert not list((Path(os.environ["IMAGEKIT_STATE_DIR"]) / "windows-builds").iterdir())  # nothing to keep


@pytest.mark.slow
@pytest.mark.guestfs
@pytest.mark.skipif(not HAVE_GUESTFS, reason="the guestfs Python binding is not importable")
@pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file() or shutil.which("wimlib-imagex") is None,
                    reason="OVMF and wimtools are needed")
def test_builder_runs_every_stage_with_stand_ins(tmp_path: Path) -> None:
    r = standin_recipe(tmp_path)
    out = tmp_path / "base.qcow2"
    phases: list[str] = []
    ctx = BuildContext(accel=TCG, tools=ToolVersions("t"), phase=phases.append)
    with pytest.raises(offline.OfflineCheckFailed) as err:
        run_builder(builders.get("windows"), r, out, ctx)
    assert [f.code for f in err.value.findings] == ["not-windows"]
    assert not out.exists()  # the partial image is rolled back
    for want in ("checking the install media, the drivers and the MSI", "writing the answer ISO",
                 "installing Windows Server 2022 SERVERSTANDARD (Windows Server 2022) on a scsi disk",
                 "provisioning: sysprep", "checking the installed image offline"):
        assert want in phases, (want, phases)
    work = Path(os.environ["IMAGEKIT_CACHE_DIR"]) / "work"
    assert not [p for p in work.glob("windows-*")], "the work folder (answer ISO, firmware variables) is removed"
    records = list((Path(os.environ["IMAGEKIT_STATE_DIR"]) / "windows-builds").iterdir())
    assert len(records) == 1
    kept = {p.name for p in records[0].iterdir()}
    assert {"autounattend.xml", "provision.ps1", "user.ps1", "cloudbase-init.conf", "cloudbase-init-unattend.conf",
            "serial.log"} <= kept
    xml = (records[0] / "autounattend.xml").read_text()
    assert "<Value>****</Value>" in xml and xml.count("****") == 2  # both forms of the password masked
    assert "USERNAME=\"Administrator\"" in (records[0] / "provision.ps1").read_text()
    assert "IMAGEKIT-STAGE sysprep" in (records[0] / "serial.log").read_text(errors="replace")
    assert tagged_processes(str(work)) == []


# ---------------------------------------------------------------- the real thing


def _real_inputs() -> dict[str, str] | str:
    env = {k: os.environ.get(k, "") for k in ("IMAGEKIT_WINDOWS_ISO", "IMAGEKIT_VIRTIO_WIN",
                                               "IMAGEKIT_CLOUDBASE_INIT_MSI")}
    missing = [k for k, v in env.items() if not v or not Path(v).exists()]
    if missing:
        return f"real Windows media are not given ({', '.join(missing)} must point at real files)"
    if not os.path.exists("/dev/kvm"):
        return "KVM is not available (/dev/kvm does not exist)"
    works, why = accel.probe_guest("kvm")
    if not works:
        return f"KVM does not work here: {why}"
    return env


@pytest.mark.slow
@pytest.mark.guestfs
def test_real_windows_server_2022_build(tmp_path: Path) -> None:
    """A real build: IMAGEKIT_WINDOWS_ISO (Server 2022 evaluation ISO), IMAGEKIT_VIRTIO_WIN (virtio-win ISO
    or its folder), IMAGEKIT_CLOUDBASE_INIT_MSI; KVM must work. Takes 20-60 minutes."""
    env = _real_inputs()
    if isinstance(env, str):
        pytest.skip(env)
    virtio = Path(env["IMAGEKIT_VIRTIO_WIN"]).resolve()
    drivers = f"virtio_drivers: null\n  virtio_drivers_dir: {virtio}" if virtio.is_dir() else \
        f'virtio_drivers: {{url: "file://{virtio}", trust: first-use}}'
    r = load(tmp_path, f"""extends: windows-server-2022
name: windows-server-2022-e2e
build:
  install_media: {{url: "file://{env['IMAGEKIT_WINDOWS_ISO']}", trust: first-use}}
  {drivers}
  cloudbase_init: {{url: "file://{env['IMAGEKIT_CLOUDBASE_INIT_MSI']}", trust: first-use}}
  install_timeout: 2h
""")
    res = pipeline.build(r, tmp_path / "out", pipeline.BuildOptions(accel=AccelChoice("kvm", "kvm", "e2e")))
    assert res.verdict in ("accept", "warn")
    built = next(s for s in res.stages if s.name == "build")
    facts = built.result.facts  # type: ignore[union-attr]
    assert facts.os_id == "2k22" and facts.stages[-1] == "sysprep"
    assert set(facts.checks) == {"wrong-release", "not-generalized", "cloudbase-init-missing",
                                 "storage-driver-not-boot-start", "network-driver-missing", "build-password-left"}
