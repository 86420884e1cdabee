"""Property profiles and the linter (no cloud needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagekit import paths
from imagekit import properties as pm
from imagekit import recipe as rec
from imagekit.errors import UsageError


def codes(props: dict[str, str], recipe: rec.Recipe | None = None) -> set[str]:
    return {f.code for f in pm.lint(props, recipe)}


def error_codes(props: dict[str, str], recipe: rec.Recipe | None = None) -> set[str]:
    return {f.code for f in pm.lint(props, recipe) if f.severity == "error"}


GOOD_LINUX = {"os_type": "linux", "os_distro": "debian", "architecture": "x86_64", "hw_disk_bus": "virtio",
              "hw_vif_model": "virtio", "hw_qemu_guest_agent": "yes", "os_require_quiesce": "yes"}
GOOD_WINDOWS = {"os_type": "windows", "os_distro": "windows", "architecture": "x86_64", "hw_disk_bus": "scsi",
                "hw_scsi_model": "virtio-scsi", "hw_firmware_type": "uefi", "hw_machine_type": "q35",
                "os_secure_boot": "required"}


def test_good_sets_are_clean() -> None:
    assert pm.lint(GOOD_LINUX) == []
    assert pm.lint(GOOD_WINDOWS) == []


@pytest.mark.parametrize("props,code", [
    ({**GOOD_WINDOWS, "hw_firmware_type": "bios"}, "P001"),
    ({**GOOD_LINUX, "os_secure_boot": "required", "hw_machine_type": "q35"}, "P001"),
    ({**GOOD_WINDOWS, "hw_machine_type": "pc"}, "P002"),
    ({**GOOD_LINUX, "hw_disk_bus": "scsi"}, "P003"),
    ({**GOOD_WINDOWS, "hw_scsi_model": "lsilogic"}, "P003"),
    ({**GOOD_WINDOWS, "os_type": "linux"}, "P004"),
    ({k: v for k, v in GOOD_WINDOWS.items() if k != "os_type"}, "P004"),
    ({**GOOD_LINUX, "hw_disk_bus": "floppy"}, "P005"),
    ({**GOOD_LINUX, "hw_vif_model": "virtio-net"}, "P005"),
    ({**GOOD_LINUX, "hw_firmware_type": "efi"}, "P005"),
    ({**GOOD_LINUX, "architecture": "amd64"}, "P005"),
    ({**GOOD_LINUX, "os_type": "bsd"}, "P005"),
    ({**GOOD_LINUX, "hw_qemu_guest_agent": "no"}, "P006"),
    ({k: v for k, v in GOOD_LINUX.items() if k != "hw_qemu_guest_agent"}, "P006"),
    ({**GOOD_LINUX, "hw_qemu_guest_agent": "true"}, "P007"),
    ({**GOOD_LINUX, "os_require_quiesce": "True"}, "P007"),
    ({**GOOD_LINUX, "architecture": "aarch64", "hw_machine_type": "virt"}, "P009"),
    ({**GOOD_LINUX, "hw_machine_type": "virt"}, "P010"),
    ({**GOOD_LINUX, "architecture": "aarch64", "hw_firmware_type": "uefi", "hw_machine_type": "q35"}, "P010"),
    ({**GOOD_LINUX, "os_hash_value": "abc"}, "P011"),
    ({**GOOD_LINUX, "os_glance_importing_to_stores": "fs"}, "P011"),
    ({**GOOD_LINUX, "visibility": "public"}, "P011"),
    ({**GOOD_LINUX, "bad key": "x"}, "P012"),
    ({**GOOD_LINUX, "note": "x" * 300}, "P012"),
])
def test_rule_fires(props: dict[str, str], code: str) -> None:
    findings = pm.lint(props)
    assert code in {f.code for f in findings}, findings
    f = next(f for f in findings if f.code == code)
    assert f.message and f.property
    assert f.severity == "error"


@pytest.mark.parametrize("props,code", [
    ({**GOOD_LINUX, "hw_scsi_model": "virtio-scsi"}, "P013"),
    ({**GOOD_WINDOWS, "os_distro": "ubuntu"}, "P014"),
    ({**GOOD_WINDOWS, "os_secure_boot": "disabled", "hw_machine_type": "pc"}, "P015"),
])
def test_warnings(props: dict[str, str], code: str) -> None:
    found = [f for f in pm.lint(props) if f.code == code]
    assert found and found[0].severity == "warning"
    assert pm.check_lint(props)  # warnings do not raise


def test_at_least_eight_error_rules() -> None:
    assert len(pm.RULES) >= 8


def test_check_lint_raises_with_every_problem() -> None:
    with pytest.raises(pm.PropertyLintError) as ei:
        pm.check_lint({**GOOD_LINUX, "hw_disk_bus": "scsi", "hw_qemu_guest_agent": "maybe"})
    err = ei.value
    assert err.exit_code == 2
    assert any("P003" in p for p in err.problems) and any("P007" in p for p in err.problems)
    assert err.message == "3 inconsistent image properties"
    assert err.hint == ("fix the recipe's glance.properties or the --property options; "
                        "'imagekit properties lint' shows every rule")
    assert [f.code for f in err.findings if f.severity == "error"] == ["P003", "P006", "P007"]
    assert err.to_dict()["findings"] == [f.to_dict() for f in err.findings]
    with pytest.raises(pm.PropertyLintError) as one:
        pm.check_lint({**GOOD_LINUX, "hw_disk_bus": "scsi"})
    assert one.value.message == "1 inconsistent image property"
    bare = pm.PropertyLintError("m")
    assert (bare.problems, bare.findings, bare.hint) == ([], [], None)


@pytest.mark.parametrize("machine", ["q35", "pc-q35-8.2", "pc-q35-rhel9.4.0"])
def test_versioned_q35_machine_types_are_q35(machine: str) -> None:
    assert error_codes({**GOOD_WINDOWS, "hw_machine_type": machine}) == set()
    assert error_codes({**GOOD_WINDOWS, "hw_machine_type": "pc-i440fx-8.2"}) >= {"P002"}


def test_architecture_against_recipe() -> None:
    r = rec.load("debian-12")
    props = pm.build(r, {"architecture": "aarch64", "hw_firmware_type": "uefi", "hw_machine_type": "virt"})
    assert "P008" in error_codes(props, r)


def test_windows_recipe_os_type_needed() -> None:
    r = rec.load("windows-server-2022")
    props = pm.build(r, {"os_type": ""})  # KEY= removes a property
    assert "os_type" not in props
    assert "P004" in error_codes(props, r)


@pytest.mark.parametrize("name", ["debian-12", "ubuntu-22.04", "ubuntu-24.04", "centos7", "windows-server-2022"])
def test_shipped_recipes_lint_clean(name: str) -> None:
    r = rec.load(name)
    props = pm.build(r)
    assert error_codes(props, r) == set(), pm.lint(props, r)


def test_profile_layers_and_provenance() -> None:
    r = rec.load("windows-server-2022")
    props = pm.build(r, {"hw_vif_model": "e1000"})
    assert props["os_type"] == "windows" and props["os_distro"] == "windows" and props["os_version"] == "2022"
    assert props["hw_disk_bus"] == "scsi" and props["hw_scsi_model"] == "virtio-scsi"
    assert props["hw_firmware_type"] == "uefi" and props["hw_machine_type"] == "q35"
    assert props["hw_vif_model"] == "e1000"  # --property wins over the recipe
    assert props["imagekit_recipe"] == "windows-server-2022"
    assert props["imagekit_recipe_digest"] == r.digest
    lin = pm.build(rec.load("debian-12"))
    assert lin["os_type"] == "linux" and lin["os_distro"] == "debian" and lin["hw_disk_bus"] == "virtio"
    assert lin["hw_qemu_guest_agent"] == "yes" and lin["architecture"] == "x86_64"


def test_parse_assignments() -> None:
    assert pm.parse_assignments(["a=1", "b = x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in ("novalue", "=v"):
        with pytest.raises(UsageError) as info:
            pm.parse_assignments([bad])
        assert info.value.message == f"bad property {bad!r}: expected KEY=VALUE"
        assert info.value.hint == "example: --property hw_disk_bus=virtio"


def test_cli_properties_lint(imagekit) -> None:  # type: ignore[no-untyped-def]
    res = imagekit("properties", "lint", "--recipe", "windows-server-2022", "--property", "hw_machine_type=pc",
                   "--property", "os_secure_boot=required", "--property", "hw_qemu_guest_agent=maybe", "--json")
    assert res.code == 2, res.err
    assert "Traceback" not in res.err
    data = res.json()
    assert isinstance(data, dict)
    found = {f["code"] for f in data["findings"] if f["severity"] == "error"}
    assert {"P002", "P007"} <= found
    ok = imagekit("properties", "lint", "--recipe", "debian-12")
    assert ok.code == 0, ok.err


def test_cli_upload_lint_only(imagekit) -> None:  # type: ignore[no-untyped-def]
    res = imagekit("upload", "--lint-only", "--recipe", "debian-12", "--property", "hw_disk_bus=scsi", "--json")
    assert res.code == 2
    assert "P003" in res.out
    ok = imagekit("upload", "--lint-only", "--recipe", "debian-12", "--json")
    assert ok.code == 0, ok.err
    assert ok.json()["properties"]["os_distro"] == "debian"  # type: ignore[index]


def _variant(tmp_path: Path, name: str, change: Callable[[dict[str, Any]], None]) -> rec.Recipe:
    """A shipped recipe with a change (a recipe file in tmp_path)."""
    doc = yaml.safe_load((paths.shipped_dir("recipes") / f"{name}.yaml").read_text())
    change(doc)
    path = tmp_path / f"{name}-variant.yaml"
    path.write_text(yaml.safe_dump(doc))
    return rec.load(path)


def test_profile_is_what_the_os_and_build_make_true(tmp_path: Path) -> None:
    """The profile alone (without the recipe's glance.properties, which repeat most of it in every shipped
    recipe): exact sets, so that no default can change or vanish unnoticed."""
    linux = {"os_type": "linux", "os_distro": "debian", "os_version": "12", "architecture": "x86_64",
             "hw_disk_bus": "virtio", "hw_vif_model": "virtio"}
    assert pm.profile(rec.load("debian-12")) == linux
    win = {"os_type": "windows", "os_distro": "windows", "os_version": "2022", "architecture": "x86_64",
           "hw_disk_bus": "scsi", "hw_scsi_model": "virtio-scsi", "hw_vif_model": "virtio", "hw_machine_type": "q35",
           "hw_qemu_guest_agent": "yes", "os_admin_user": "Admin", "hw_firmware_type": "uefi"}
    assert pm.profile(rec.load("windows-server-2022")) == win
    assert pm.profile(rec.load("windows-11")) == {**win, "os_version": "11", "os_secure_boot": "required",
                                                  "hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"}

    def bios_virtio(doc: dict[str, Any]) -> None:
        doc["build"].update(disk_bus="virtio", firmware="bios")
        doc["glance"]["properties"].update(hw_disk_bus="virtio")
        for k in ("hw_firmware_type", "hw_scsi_model"):
            del doc["glance"]["properties"][k]

    other = {k: v for k, v in win.items() if k not in ("hw_scsi_model", "hw_firmware_type")}
    assert pm.profile(_variant(tmp_path, "windows-server-2022", bios_virtio)) == {**other, "hw_disk_bus": "virtio"}

    def distro(name: str, arch: str = "x86_64") -> Callable[[dict[str, Any]], None]:
        return lambda doc: doc["os"].update(distro=name, arch=arch)

    assert pm.profile(_variant(tmp_path, "debian-12", distro("RedHat")))["os_distro"] == "rhel"
    assert pm.profile(_variant(tmp_path, "debian-12", distro("MyOS")))["os_distro"] == "myos"
    arm = pm.profile(_variant(tmp_path, "debian-12", distro("debian", "aarch64")))
    assert arm == {**linux, "architecture": "aarch64", "hw_firmware_type": "uefi", "hw_machine_type": "virt"}
