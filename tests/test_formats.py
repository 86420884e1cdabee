"""Per-format verifiers on real images made by qemu-img / sgdisk / sfdisk / xorriso, and patched copies."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from imagekit.formats import gpt, iso, vhd, vhdx, vmdk
from tests import image_factory as fac


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="module")
def src(d: Path) -> Path:
    return fac.write_pattern(d / "src.raw", 6 * fac.MiB)


def codes(findings: tuple[object, ...], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity == severity}  # type: ignore[attr-defined]


def copy(p: Path, name: str) -> Path:
    dst = p.with_name(name)
    shutil.copyfile(p, dst)
    return dst


# ---------------------------------------------------------------- VHD


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_vhd_good(d: Path, src: Path, sub: str) -> None:
    rep = vhd.verify(fac.convert(src, d / f"good-{sub}.vhd", "vpc", f"subformat={sub}"))
    info, found = rep.format_info, rep.findings
    assert not codes(found, "reject"), found
    assert info["subformat"] == sub
    assert int(info["virtual_size"]) >= 6 * fac.MiB  # type: ignore[call-overload]
    if sub == "dynamic":
        assert int(info["allocated_blocks"]) >= 1  # type: ignore[call-overload]


def test_vhd_bad_checksum(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "badsum.vhd", "vpc", "subformat=dynamic")
    fac.patch(p, 48, b"\x00\x00\x00\x00\x10")  # change current size, leave the checksum stale
    assert "vhd-bad-checksum" in codes(vhd.verify(p).findings, "reject")


def test_vhd_differencing_is_backing_file(d: Path, src: Path) -> None:
    # qemu-img cannot create differencing VHDs: patch the disk type to 4 in both footers
    p = fac.convert(src, d / "diff.vhd", "vpc", "subformat=dynamic")
    size = p.stat().st_size
    for off in (0, size - 512):
        fac.patch(p, off + 60, struct.pack(">I", 4))
        fac.vhd_fix_checksum(p, off)
    rep = vhd.verify(p)
    info, found = rep.format_info, rep.findings
    assert "backing-file" in codes(found, "reject")
    assert "vhd-bad-checksum" not in codes(found)
    assert info["subformat"] == "differencing"


def test_vhd_bat_outside_file(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "bat.vhd", "vpc", "subformat=dynamic")
    fac.patch(p, 512 + 16, struct.pack(">Q", 1 << 40))
    fac.vhd_fix_checksum(p, 512, 1024, 36)
    assert "vhd-bat-outside-file" in codes(vhd.verify(p).findings, "reject")


def test_vhd_truncated_fixed(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "trunc.vhd", "vpc", "subformat=fixed")
    data = p.read_bytes()
    p.write_bytes(data[:4096] + data[-512:])  # keep the footer, drop the data
    assert "vhd-truncated" in codes(vhd.verify(p).findings, "reject")


# ---------------------------------------------------------------- VHDX


def test_crc32c_known_vector() -> None:
    assert vhdx.crc32c(b"123456789") == 0xE3069283


def test_vhdx_good(d: Path, src: Path) -> None:
    rep = vhdx.verify(fac.convert(src, d / "good.vhdx", "vhdx"))
    info, found = rep.format_info, rep.findings
    assert not found, found
    assert info["virtual_size"] == 6 * fac.MiB
    assert int(info["allocated_blocks"]) >= 1  # type: ignore[call-overload]


def test_vhdx_one_bad_header_crc_warns(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "hdr1.vhdx", "vhdx")
    fac.patch(p, 64 * 1024 + 100, b"\xff")
    rep = vhdx.verify(p)
    _, found = rep.format_info, rep.findings
    assert "vhdx-bad-header-crc" in codes(found, "warn")
    assert not codes(found, "reject")


def test_vhdx_both_headers_bad_rejects(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "hdr2.vhdx", "vhdx")
    fac.patch(p, 64 * 1024 + 100, b"\xff")
    fac.patch(p, 128 * 1024 + 100, b"\xff")
    found = codes(vhdx.verify(p).findings, "reject")
    assert {"vhdx-bad-header-crc", "vhdx-no-valid-header"} <= found


def test_vhdx_bad_region_table(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "regi.vhdx", "vhdx")
    fac.patch(p, 192 * 1024 + 40, b"\x01")  # inside the first region entry
    assert "vhdx-bad-region-crc" in codes(vhdx.verify(p).findings, "reject")


# ---------------------------------------------------------------- VMDK


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_vmdk_good(d: Path, src: Path, sub: str) -> None:
    rep = vmdk.verify(fac.convert(src, d / f"good-{sub}.vmdk", "vmdk", f"subformat={sub}"))
    info, found = rep.format_info, rep.findings
    assert not codes(found, "reject"), found
    assert info["subformat"] == sub and info["virtual_size"] == 6 * fac.MiB


def test_vmdk_monolithic_flat_rejected(d: Path) -> None:
    p = fac.create(d / "flat.vmdk", "vmdk", "1M", "subformat=monolithicFlat")
    found = codes(vmdk.verify(p).findings, "reject")
    assert {"vmdk-descriptor-file", "vmdk-flat-extent", "vmdk-create-type"} <= found


def test_vmdk_descriptor_pointing_at_passwd(d: Path) -> None:
    p = d / "evil.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                 'createType="monolithicSparse"\nRW 2048 FLAT "/etc/passwd" 0\n')
    found = codes(vmdk.verify(p).findings, "reject")
    assert {"vmdk-descriptor-file", "vmdk-flat-extent", "vmdk-external-extent"} <= found


def _embedded_patch(p: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    data = p.read_bytes()
    off = data.index(old)
    fac.patch(p, off, new)


def test_vmdk_parent_is_backing_file(d: Path) -> None:
    p = fac.create(d / "parent.vmdk", "vmdk", "1M")
    _embedded_patch(p, b"parentCID=ffffffff", b"parentCID=1234abcd")
    assert "backing-file" in codes(vmdk.verify(p).findings, "reject")


def test_vmdk_create_type_not_allowed(d: Path) -> None:
    p = fac.create(d / "ctype.vmdk", "vmdk", "1M")
    _embedded_patch(p, b'"monolithicSparse"', b'"twoGbMaxExtentSp"')
    assert "vmdk-create-type" in codes(vmdk.verify(p).findings, "reject")


def test_vmdk_grain_directory_outside_file(d: Path) -> None:
    p = fac.create(d / "gd.vmdk", "vmdk", "1M")
    fac.patch(p, 56, struct.pack("<Q", 1 << 30))
    assert "vmdk-gd-outside-file" in codes(vmdk.verify(p).findings, "reject")


def test_vmdk_zero_capacity_header(d: Path) -> None:
    p = fac.create(d / "zero.vmdk", "vmdk", "1M")
    fac.patch(p, 12, struct.pack("<Q", 0))
    assert "vmdk-external-extent" in codes(vmdk.verify(p).findings, "reject")


# ---------------------------------------------------------------- GPT / MBR


def test_gpt_good(d: Path) -> None:
    rep = gpt.verify(fac.gpt_disk(d / "g.raw"))
    info, found = rep.format_info, rep.findings
    assert not found, found
    parts = info["partitions"]
    assert isinstance(parts, list) and len(parts) == 2 and parts[0]["esp"]
    assert info["backup_ok"] is True


def test_gpt_bad_header_crc(d: Path) -> None:
    p = fac.gpt_disk(d / "gcrc.raw")
    fac.patch(p, 512 + 48, b"\x01")  # last usable LBA, CRC left stale
    assert "gpt-bad-header-crc" in codes(gpt.verify(p).findings, "reject")


def test_gpt_bad_array_crc(d: Path) -> None:
    p = fac.gpt_disk(d / "garr.raw")
    fac.patch(p, 1024 + 56, "X".encode("utf-16-le"))  # partition 1 name
    assert "gpt-bad-array-crc" in codes(gpt.verify(p).findings, "reject")


def test_gpt_partition_outside_disk(d: Path) -> None:
    p = fac.gpt_disk(d / "gout.raw")
    with open(p, "r+b") as f:  # truncate the disk: partition 2 and the backup now lie beyond the end
        f.truncate(8 * fac.MiB)
    found = gpt.verify(p).findings
    assert {"gpt-bad-header"} <= codes(found, "reject")
    assert "gpt-backup-missing" in codes(found, "warn")


def test_mbr_disk(d: Path) -> None:
    rep = gpt.verify(fac.mbr_disk(d / "m.raw"))
    info, found = rep.format_info, rep.findings
    assert info["partition_table"] == "mbr" and not found
    mbr = info["mbr"]
    assert isinstance(mbr, dict) and mbr["partitions"][0]["type"] == 0x83


# ---------------------------------------------------------------- ISO


def test_iso_plain(d: Path) -> None:
    rep = iso.verify(fac.iso(d / "p.iso", d, "plain"))
    info, found = rep.format_info, rep.findings
    assert not found
    assert info["volume_id"] == "IMAGEKIT" and info["hybrid"] is False and info["installer_only"] is True


def test_iso_hybrid_gpt_efi(d: Path) -> None:
    rep = iso.verify(fac.iso(d / "h.iso", d, "gpt"))
    info, found = rep.format_info, rep.findings
    assert not codes(found, "reject")
    assert info["hybrid"] is True and info["hybrid_table"] == "gpt"
    assert info["bootable_as_disk"] is True
    et = info["el_torito"]
    assert isinstance(et, dict) and et["efi"] is True


def test_iso_truncated(d: Path) -> None:
    p = fac.iso(d / "t.iso", d, "plain")
    with open(p, "r+b") as f:
        f.truncate(40 * 1024)
    assert "iso-truncated" in codes(iso.verify(p).findings, "reject")


def test_vmdk_text_descriptor_is_read_up_to_the_first_nul(d: Path) -> None:
    """A text descriptor is refused, and what it says is reported exactly: read from byte 0 up to the
    first NUL (a second descriptor hidden after it is not read), bytes outside ASCII tolerated, and a
    sparse extent in another file named for what it is."""
    p = d / "desc.vmdk"
    p.write_bytes(b'version=1\n# comment \xff\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicSparse"\n'
                  b'RW 2048 SPARSE "data.vmdk"\n\x00RW 8 SPARSE "more.vmdk"\n\x00')
    rep = vmdk.verify(p)
    assert rep.format_info["subformat"] == "descriptor"
    assert rep.format_info["descriptor"] == {
        "fields": {"version": "1", "CID": "12345678", "parentCID": "ffffffff", "createType": "monolithicSparse"},
        "extents": [{"access": "RW", "sectors": 2048, "type": "SPARSE", "file": "data.vmdk", "offset": 0}],
        "unknown_lines": []}
    assert [(f.code, f.severity) for f in rep.findings] == [("vmdk-descriptor-file", "reject"),
                                                           ("vmdk-external-extent", "reject")]
    assert "CVE-2022-47951" in rep.findings[0].message
    assert "'data.vmdk'" in rep.findings[1].message
