"""The disk format registry: every row agrees with itself, with qemu-img, with oslo.utils and with
Glance; every verifier returns a FormatReport; unknown names are usage errors with a hint."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagekit.check import check
from imagekit.errors import UsageError
from imagekit.formats import gpt, iso, qcow2, registry, vdi, vhd, vhdx, vmdk
from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import detect, fi
from imagekit.formats.registry import FORMATS, DiskFormat
from tests import image_factory as fac

ROWS = {row.name: row for row in FORMATS}
# formats `qemu-img create` makes without extra secrets or tools
CREATABLE = ("qcow2", "raw", "vmdk", "vhdx", "vhd", "vdi", "qcow", "qed", "parallels")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def src(d: Path) -> Path:
    return fac.write_pattern(d / "src.raw", 4 * fac.MiB)


def ids(rows: object) -> list[str]:
    return [r.name for r in rows]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the rows themselves


def test_names_are_unique_and_resolve() -> None:
    seen: dict[str, str] = {}
    for row in FORMATS:
        for name in row.names:
            assert name == name.lower() and name not in seen, (name, row.name, seen.get(name))
            seen[name] = row.name
            assert registry.get(name) is row
            assert registry.get(f" {name.upper()} ") is row  # declared names are case- and blank-insensitive
    assert set(registry.known_names()) == set(seen)
    assert registry.get("vpc").name == "vhd" and registry.get("img").name == "raw"
    assert registry.get("gpt").name == "raw"


@pytest.mark.parametrize("row", FORMATS, ids=ids(FORMATS))
def test_row_is_consistent(row: DiskFormat) -> None:
    if row.accepted:
        assert row.verifier and row.glance and row.qemu and row.oslo_name, row
    else:
        assert row.refused and row.verifier is None and row.glance is None, row
        assert not row.writable and not row.customisable
    if row.writable or row.customisable:
        assert row.accepted and row.qemu and row.suffix and row.suffix.startswith(".")
    if row.qemu is not None and row.name != "iso":  # iso is read as raw
        assert registry.by_qemu(row.qemu) is row
    for name in row.oslo:
        assert name in fi.ALL_FORMATS, f"oslo has no inspector {name!r}"
    if row.oslo and row.name != "qcow":  # oslo calls qcow v1 "qcow2"
        assert registry.by_oslo(row.oslo[0]) is row
    assert registry.qemu_name(row.name) == row.qemu


def test_output_names_are_the_cli_choices() -> None:
    """convert -O and recipe output.format: qemu-img's names, in this order."""
    assert registry.output_names() == ("qcow2", "raw", "vmdk", "vhdx", "vpc")
    assert {n: registry.suffix(n) for n in registry.output_names()} == {
        "qcow2": ".qcow2", "raw": ".raw", "vmdk": ".vmdk", "vhdx": ".vhdx", "vpc": ".vhd"}
    assert registry.output_format("vhd") is registry.output_format("vpc") is ROWS["vhd"]
    assert registry.customisable_names() == ("qcow2", "raw")


def test_lookups_by_other_tools_names() -> None:
    assert registry.by_qemu("vpc") is ROWS["vhd"] and registry.by_qemu("raw") is ROWS["raw"]
    assert registry.by_oslo("gpt") is ROWS["raw"] and registry.by_oslo("qcow2") is ROWS["qcow2"]
    assert registry.by_qemu("floppy") is None and registry.by_oslo("floppy") is None
    assert registry.find("floppy") is None and registry.find(None) is None
    assert registry.qemu_name("polyglot") is None


def test_glance_names_are_valid_glance_disk_formats() -> None:
    config = pytest.importorskip("glance.common.config")
    opt = next(o for o in config.image_format_opts if o.name == "disk_formats")
    valid = set(opt.default)
    assert set(registry.glance_names()) <= valid
    assert registry.glance_names() == ("iso", "qcow2", "raw", "vdi", "vhd", "vhdx", "vmdk")
    assert registry.glance_disk_format("vpc") == "vhd" and registry.glance_disk_format("vhd") == "vhd"
    assert registry.glance_disk_format("qcow") is None and registry.glance_disk_format("floppy") is None


@pytest.mark.parametrize("name", ["floppy", "", "qcow3"])
def test_unknown_names_are_usage_errors_with_a_hint(name: str) -> None:
    with pytest.raises(UsageError) as e:
        registry.get(name)
    assert e.value.hint and "qcow2" in e.value.hint and "vpc" in e.value.hint
    with pytest.raises(UsageError) as e:
        registry.output_format(name or "vdi")
    assert e.value.hint and "vpc" in e.value.hint
    with pytest.raises(UsageError):
        registry.suffix("iso")  # not an output


# ---------------------------------------------------------------- against qemu-img


@pytest.mark.parametrize("row", [r for r in FORMATS if r.writable], ids=ids(r for r in FORMATS if r.writable))
def test_writable_formats_are_written_and_detected_back(d: Path, src: Path, row: DiskFormat) -> None:
    assert row.qemu is not None and row.suffix is not None
    out = d / f"written{row.suffix}"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", row.qemu, str(src), str(out)], check=True,
                   timeout=60)
    det = detect(out)
    assert det.format == row.name and det.qemu_format == row.qemu
    assert check(out, declared=row.output_name).verdict == "accept"


@pytest.mark.parametrize("name", CREATABLE)
def test_qemu_checkable_matches_qemu_img_check(d: Path, name: str) -> None:
    row = ROWS[name]
    assert row.qemu is not None
    p = fac.create(d / f"chk-{name}.img", row.qemu, "1M")
    rc = subprocess.run(["qemu-img", "check", "-q", "-f", row.qemu, str(p)], capture_output=True,
                        timeout=60).returncode
    assert rc == (0 if row.qemu_checkable else 63), (name, rc)
    assert detect(p).format == name


# ---------------------------------------------------------------- verifiers


@pytest.fixture(scope="module")
def samples(d: Path, src: Path) -> dict[str, Path]:
    return {
        "qcow2": fac.convert(src, d / "s.qcow2", "qcow2"),
        "raw": fac.gpt_disk(d / "s.raw"),
        "vmdk": fac.convert(src, d / "s.vmdk", "vmdk"),
        "vhdx": fac.convert(src, d / "s.vhdx", "vhdx"),
        "vhd": fac.convert(src, d / "s.vhd", "vpc", "subformat=dynamic"),
        "vdi": fac.convert(src, d / "s.vdi", "vdi"),
        "iso": fac.iso(d / "s.iso", d, "gpt"),
    }


def test_every_accepted_format_has_a_sample(samples: dict[str, Path]) -> None:
    assert set(samples) == {row.name for row in FORMATS if row.accepted}


@pytest.mark.parametrize("row", [r for r in FORMATS if r.accepted], ids=ids(r for r in FORMATS if r.accepted))
def test_every_verifier_returns_a_format_report(samples: dict[str, Path], row: DiskFormat) -> None:
    rep = row.verify(samples[row.name], VerifyOptions(deep=True))
    assert isinstance(rep, FormatReport)
    assert rep.verdict == "accept", rep.findings
    assert rep.virtual_size is None or rep.virtual_size > 0
    assert isinstance(rep.to_dict(), dict)
    v = check(samples[row.name])
    assert v.format == row.name and v.format_report is not None
    shown = v.to_dict()["details"]["format_info"]  # type: ignore[index]
    assert isinstance(shown, dict) and set(shown) == set(rep.to_dict())  # what check --json shows


def test_verifier_modules_return_format_reports(samples: dict[str, Path]) -> None:
    for fn, name in ((qcow2.verify, "qcow2"), (gpt.verify, "raw"), (vmdk.verify, "vmdk"), (vhdx.verify, "vhdx"),
                     (vhd.verify, "vhd"), (vdi.verify, "vdi"), (iso.verify, "iso")):
        assert isinstance(fn(samples[name]), FormatReport), name  # type: ignore[operator]


def test_qcow2_report_typed_extras(d: Path, samples: dict[str, Path]) -> None:
    rep = ROWS["qcow2"].verify(samples["qcow2"])
    assert isinstance(rep, qcow2.Qcow2Report) and rep.compat == "1.1" and rep.snapshots == 0
    assert rep.stats["data_clusters"] > 0
    shallow = ROWS["qcow2"].verify(samples["qcow2"], VerifyOptions(deep=False))
    assert "data_clusters" not in shallow.stats
    small = ROWS["qcow2"].verify(samples["qcow2"], VerifyOptions(max_virtual_size=1 << 20))
    assert "virtual-size-too-large" in small.codes()


def test_refused_formats_have_no_verifier(d: Path) -> None:
    for row in FORMATS:
        if not row.accepted:
            with pytest.raises(UsageError):
                row.verify(d / "anything")
