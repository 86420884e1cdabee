"""Accelerator choice: the probe really boots a guest, and auto falls back to TCG
exactly when a KVM guest does not run on this host (as on nested virtualisation)."""

from __future__ import annotations

import json

import pytest

from imagekit import accel
from imagekit.errors import UsageError


def test_boot_sector_is_a_valid_boot_sector() -> None:
    assert len(accel.BOOT_SECTOR) == 512 and accel.BOOT_SECTOR.endswith(b"\x55\xaa")


def test_probe_runs_under_tcg() -> None:
    ok, why = accel.probe_guest("tcg", timeout=60)
    assert ok, why


def test_boot_sector_probe_runs_under_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "probe_kernel", lambda: None)
    ok, why = accel.probe_guest("tcg", timeout=30)
    assert ok and "boot sector" in why


def test_explicit_choices_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accel.resolve("tcg").accel == "tcg"
    monkeypatch.setenv("IMAGEKIT_ACCEL", "tcg")
    assert accel.resolve().accel == "tcg"
    with pytest.raises(UsageError):
        accel.resolve("xen")


def test_auto_matches_what_kvm_really_does() -> None:
    """auto picks KVM iff a KVM guest really prints; otherwise TCG with the reason."""
    choice = accel.resolve("auto", use_cache=False)
    if accel._kvm_unusable_reason():
        assert choice.accel == "tcg" and "/dev/kvm" in choice.reason
        return
    kvm_ok, _ = accel.probe_guest("kvm")
    assert choice.accel == ("kvm" if kvm_ok else "tcg")
    assert choice.probed and choice.reason.startswith("KVM probe:")


def test_probe_result_is_cached(session_cache) -> None:
    accel._memo.clear()
    first = accel.resolve("auto")
    accel._memo.clear()
    second = accel.resolve("auto")
    assert second.accel == first.accel and second.cached
    data = json.loads((session_cache / "accel.json").read_text())
    assert data["accel"] == first.accel


def test_doctor_json_reports_accelerator_with_reason(imagekit) -> None:
    r = imagekit("doctor", "--json", "--no-appliance")
    assert r.code == 0, r.err
    d = r.json()
    a = d["accelerator"]
    assert a["accel"] in ("kvm", "tcg") and a["reason"]
    if a["accel"] == "tcg" and a["requested"] == "auto":
        assert "KVM" in a["reason"] or "/dev/kvm" in a["reason"]
    names = {t["name"]: t for t in d["tools"]}
    assert names["qemu-img"]["ok"] and "qemu-img version" in names["qemu-img"]["version"]
    assert d["device_mapper"] in (True, False)


@pytest.mark.guestfs
def test_doctor_launches_the_appliance(imagekit) -> None:
    r = imagekit("--json", "doctor", timeout=600)
    assert r.code == 0, r.err
    ap = r.json()["appliance"]
    assert ap["ok"] is True and ap["launch_seconds"] > 0
