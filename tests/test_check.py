"""check() and inspect(): verdicts and finding codes on real images."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from imagekit.check import check, normalize_format
from imagekit.errors import ImageReadError, UsageError
from imagekit.inspect import inspect
from tests import image_factory as fac


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check")


@pytest.fixture(scope="module")
def src(d: Path) -> Path:
    return fac.write_pattern(d / "src.raw", 4 * fac.MiB)


@pytest.fixture(scope="module")
def qcow2_img(d: Path, src: Path) -> Path:
    return fac.convert(src, d / "disk.qcow2", "qcow2")


# ---------------------------------------------------------------- accepted images


@pytest.mark.parametrize(("fmt", "opts", "declared"), [
    ("vpc", ("subformat=dynamic",), "vpc"),
    ("vpc", ("subformat=fixed",), "vhd"),
    ("vhdx", (), "vhdx"),
    ("vmdk", ("subformat=monolithicSparse",), "vmdk"),
    ("vmdk", ("subformat=streamOptimized",), "vmdk"),
    ("vdi", (), "vdi"),
])
def test_good_images_accepted(d: Path, src: Path, fmt: str, opts: tuple[str, ...], declared: str) -> None:
    p = fac.convert(src, d / f"ok-{fmt}-{'-'.join(opts) or 'x'}.img", fmt, *opts)
    v = check(p, declared=declared)
    assert v.verdict == "accept", v.findings
    assert v.format == normalize_format(declared)
    json.dumps(v.to_dict())
    assert v.detection is not None and v.format_report is not None
    assert "detection" in v.to_dict()["details"] and "format_info" in v.to_dict()["details"]


def test_raw_accepted_and_alias_img(d: Path, src: Path) -> None:
    v = check(src, declared="img")
    assert v.verdict == "accept" and v.format == "raw"


def test_raw_gpt_disk_accepted(d: Path) -> None:
    v = check(fac.gpt_disk(d / "gpt.raw"), declared="raw")
    assert v.verdict == "accept", v.findings
    assert v.format_report is not None
    info = v.format_report.format_info
    assert isinstance(info, dict) and info["partition_table"] == "gpt"


def test_qcow2_accepted(qcow2_img: Path) -> None:
    v = check(qcow2_img, declared="qcow2")
    assert v.verdict == "accept", v.findings


# ---------------------------------------------------------------- format probing / polyglots


def test_qcow2_declared_raw_is_format_mismatch(qcow2_img: Path) -> None:
    v = check(qcow2_img, declared="raw")
    assert v.verdict == "reject"
    mm = [f for f in v.findings if f.code == "format-mismatch"]
    assert mm and mm[0].severity == "reject" and "CVE-2015-1850" in mm[0].message


def test_qcow2_header_padded_declared_raw(d: Path) -> None:
    p = d / "padded.raw"
    p.write_bytes(fac.qcow2_header() + b"\0" * (1024 * 1024))
    v = check(p, declared="raw")
    assert v.format == "qcow2" and v.verdict == "reject"
    assert "format-mismatch" in v.codes()


def test_tiny_qcow_magic_never_raw(d: Path) -> None:
    p = d / "tiny.raw"
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    v = check(p, declared="raw")
    assert v.format == "qcow2" and v.verdict == "reject"
    assert {"format-mismatch", "format-inspector-safety"} <= set(v.codes())


def test_polyglot_rejected(d: Path) -> None:
    data = bytearray(fac.qcow2_header() + b"\0" * 4096)
    data[446 + 4] = 0x83
    data[510:512] = b"\x55\xaa"
    p = d / "poly.img"
    p.write_bytes(bytes(data))
    v = check(p)
    assert v.verdict == "reject" and v.codes() == ["polyglot"]


def test_declared_vmdk_but_raw(src: Path) -> None:
    v = check(src, declared="vmdk")
    assert v.verdict == "reject" and "format-mismatch" in v.codes()


def test_fixed_vhd_declared_raw_warns(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "fixed.vhd", "vpc", "subformat=fixed")
    v = check(p, declared="raw")
    assert v.verdict == "warn" and v.codes() == ["format-mismatch"]


# ---------------------------------------------------------------- references to other files


def test_qcow2_backing_file_rejected(d: Path, qcow2_img: Path) -> None:
    p = d / "child.qcow2"
    fac.qemu_img("create", "-q", "-f", "qcow2", "-b", qcow2_img, "-F", "qcow2", p)
    v = check(p, declared="qcow2")
    assert v.verdict == "reject"
    assert "format-inspector-safety" in v.codes()  # oslo: "Image has a backing file"
    assert "backing-file" in v.codes()  # imagekit's qcow2 verifier


def test_vmdk_flat_extent_rejected(d: Path) -> None:
    p = fac.create(d / "flat.vmdk", "vmdk", "1M", "subformat=monolithicFlat")
    v = check(p, declared="vmdk")
    assert v.verdict == "reject"
    assert {"vmdk-descriptor-file", "vmdk-flat-extent", "format-inspector-safety"} <= set(v.codes())


def test_vmdk_descriptor_etc_passwd(d: Path) -> None:
    p = d / "passwd.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                 'createType="monolithicSparse"\nRW 16 FLAT "/etc/passwd" 0\n')
    v = check(p)  # nothing declared: still detected and refused
    assert v.format == "vmdk" and v.verdict == "reject"
    assert {"vmdk-external-extent", "vmdk-flat-extent", "format-inspector-safety"} <= set(v.codes())


def test_differencing_vhd_rejected(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "diff.vhd", "vpc", "subformat=dynamic")
    size = p.stat().st_size
    for off in (0, size - 512):
        fac.patch(p, off + 60, struct.pack(">I", 4))
        fac.vhd_fix_checksum(p, off)
    v = check(p, declared="vpc")
    assert v.verdict == "reject" and "backing-file" in v.codes()


# ---------------------------------------------------------------- corrupt structures


def test_vhd_bad_checksum_rejected(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "sum.vhd", "vpc", "subformat=dynamic")
    fac.patch(p, 0x30, b"\x7f")
    v = check(p, declared="vhd")
    assert v.verdict == "reject" and "vhd-bad-checksum" in v.codes()


def test_vhdx_bad_header_crc_rejected(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "crc.vhdx", "vhdx")
    fac.patch(p, 64 * 1024 + 200, b"\x01")
    fac.patch(p, 128 * 1024 + 200, b"\x01")
    v = check(p, declared="vhdx")
    assert v.verdict == "reject" and "vhdx-bad-header-crc" in v.codes()


def test_gpt_bad_crc_rejected(d: Path) -> None:
    p = fac.gpt_disk(d / "badcrc.raw")
    fac.patch(p, 512 + 40, b"\x05")  # first usable LBA
    v = check(p, declared="raw")
    assert v.verdict == "reject" and "gpt-bad-header-crc" in v.codes()


def test_empty_file_rejected(d: Path) -> None:
    p = d / "empty.img"
    p.write_bytes(b"")
    assert "empty-image" in check(p).codes()


# ---------------------------------------------------------------- ISO


def test_iso_plain_and_hybrid(d: Path) -> None:
    v = check(fac.iso(d / "plain.iso", d, "plain"), declared="iso")
    assert v.verdict == "accept", v.findings
    h = check(fac.iso(d / "hybrid.iso", d, "gpt"), declared="iso")
    assert h.verdict == "accept", h.findings
    det = h.detection
    assert det is not None and det.hybrid is True
    assert h.format_report is not None
    info = h.format_report.format_info
    assert isinstance(info, dict) and info["bootable_as_disk"] is True


def test_iso_declared_raw_warns(d: Path) -> None:
    v = check(fac.iso(d / "asraw.iso", d, "plain"), declared="raw")
    assert v.verdict == "warn" and v.codes() == ["format-mismatch"]


# ---------------------------------------------------------------- unsupported, limits, names, errors


def test_qcow_v1_unsupported(d: Path) -> None:
    p = d / "v1.qcow"
    p.write_bytes(fac.qcow2_header(version=1) + b"\0" * 4096)
    v = check(p)
    assert v.format == "qcow" and "unsupported-format" in v.codes()


def test_luks_unsupported(d: Path) -> None:
    hdr = bytearray(4096)
    hdr[0:8] = b"LUKS\xba\xbe\x00\x01"
    hdr[8:11] = b"aes"
    struct.pack_into(">I", hdr, 104, 4096)
    p = d / "enc.img"
    p.write_bytes(bytes(hdr) + b"\0" * 8192)
    v = check(p, declared="raw")
    assert v.format == "luks" and v.verdict == "reject"
    assert {"unsupported-format", "format-mismatch"} <= set(v.codes())


def test_virtual_size_too_large(d: Path, src: Path) -> None:
    p = fac.convert(src, d / "big.vhdx", "vhdx")
    v = check(p, max_virtual_size=1024 * 1024)
    assert v.verdict == "reject" and "virtual-size-too-large" in v.codes()


def test_json_filename_rejected(d: Path, src: Path) -> None:
    p = d / 'json:{"driver":"raw"}'
    p.write_bytes(src.read_bytes())
    assert "json-filename" in check(p).codes()


def test_unknown_declared_format() -> None:
    with pytest.raises(UsageError):
        check("/etc/hostname", declared="floppy")


def test_path_errors(d: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        check(d / "missing.img")
    with pytest.raises(ImageReadError, match="directory"):
        check(d)
    p = d / "noread.img"
    p.write_bytes(b"x" * 1024)
    p.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(ImageReadError, match="not readable"):
            check(p)


# ---------------------------------------------------------------- inspect


@pytest.mark.parametrize(("fmt", "opts"), [("vpc", ("subformat=dynamic",)), ("vmdk", ()), ("raw", ())])
def test_inspect_non_qcow2(d: Path, src: Path, fmt: str, opts: tuple[str, ...]) -> None:
    p = fac.convert(src, d / f"insp-{fmt}.img", fmt, *opts)
    out = inspect(p)
    json.dumps(out)
    assert out["format"] == ("vhd" if fmt == "vpc" else fmt)
    assert out["file_size"] == p.stat().st_size
    alloc = out["allocation"]
    assert isinstance(alloc, dict) and alloc.get("source") == "qemu-img map", alloc
    assert int(alloc["data_bytes"]) > 0


def test_inspect_qcow2(qcow2_img: Path) -> None:
    out = inspect(qcow2_img)
    json.dumps(out)
    assert out["format"] == "qcow2"
    q = out["qcow2"]
    assert isinstance(q, dict) and q["cluster_size"] == 65536 and q["backing_file"] in (None, "")
    assert isinstance(out["allocation"], dict) and "data_bytes" in out["allocation"]
    deep = inspect(qcow2_img, deep=True)
    json.dumps(deep)
    assert isinstance(deep["allocation"], dict) and deep["allocation"]["source"] == "verify"


def test_stream_optimized_with_footer_accepted(d: Path, src: Path) -> None:
    """The 'grain directory at end' layout: oslo's footer check needs the file's tail, read bounded."""
    p = fac.convert(src, d / "footer.vmdk", "vmdk", "subformat=streamOptimized")
    header = p.read_bytes()[:512]
    fac.patch(p, 56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
    marker = struct.pack("<QII", 1, 0, 3) + b"\0" * 496
    with open(p, "ab") as f:
        f.write(marker + header + b"\0" * 512)
    v = check(p, declared="vmdk")
    assert v.verdict == "accept", v.findings
    assert v.format_report is not None
    info = v.format_report.format_info
    assert isinstance(info, dict) and info["footer_gd_offset"] == struct.unpack_from("<Q", header, 56)[0]
    safety = v.oslo_safety
    assert safety is not None and safety.failures == ()


def test_fifo_is_not_an_image(d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p)
    with pytest.raises(ImageReadError, match="not a regular file"):
        check(p)
