"""Format detection: by content only, polyglots refused, qcow magic never raw, bounded reads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imagekit.errors import ImageReadError
from imagekit.formats.detect import detect, sniff
from tests import image_factory as fac


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("detect")


def test_raw(d: Path) -> None:
    p = fac.write_pattern(d / "disk.raw", 4 * fac.MiB)
    det = detect(p)
    assert (det.format, det.qemu_format, det.matches) == ("raw", "raw", ("raw",))
    assert det.virtual_size == det.file_size == 4 * fac.MiB
    assert not det.findings


def test_qcow2_named_iso_is_qcow2(d: Path) -> None:
    p = fac.create(d / "looks-like.iso", "qcow2", "8M")
    det = detect(p)
    assert det.format == "qcow2" and det.qemu_format == "qcow2"
    assert det.virtual_size == 8 * fac.MiB


@pytest.mark.parametrize("payload", [b"QFI\xfb", b"QFI\xfb\x00\x00\x00\x03", None])
def test_qcow_magic_never_raw_even_tiny(d: Path, payload: bytes | None) -> None:
    data = payload if payload is not None else fac.qcow2_header()  # bare 104-byte header
    p = d / "tiny.img"
    p.write_bytes(data)
    det = detect(p)
    assert det.format == "qcow2"
    assert "qcow2" in det.matches and "raw" not in det.matches


def test_qcow_header_padded_into_big_file(d: Path) -> None:
    p = d / "padded.raw"
    p.write_bytes(fac.qcow2_header() + b"\0" * (2 * fac.MiB))
    assert detect(p).format == "qcow2"


def test_qcow_v1(d: Path) -> None:
    p = d / "v1.img"
    p.write_bytes(fac.qcow2_header(version=1) + b"\0" * 1024)
    det = detect(p)
    assert det.format == "qcow" and det.qemu_format == "qcow"


def test_vhd_dynamic_and_fixed(d: Path) -> None:
    src = fac.write_pattern(d / "src.raw", 4 * fac.MiB)
    dyn = detect(fac.convert(src, d / "dyn.vhd", "vpc", "subformat=dynamic"))
    assert (dyn.format, dyn.qemu_format, dyn.subformat) == ("vhd", "vpc", "dynamic")
    fixed = detect(fac.convert(src, d / "fixed.bin", "vpc", "subformat=fixed"))
    # oslo only probes offset 0 and sees raw; the footer at the end makes it a fixed VHD
    assert (fixed.format, fixed.qemu_format, fixed.subformat) == ("vhd", "vpc", "fixed")
    assert fixed.oslo_format == "raw"
    assert fixed.virtual_size is not None and fixed.virtual_size >= 4 * fac.MiB


@pytest.mark.parametrize(("fmt", "opts", "name"), [
    ("vhdx", (), "vhdx"),
    ("vmdk", ("subformat=monolithicSparse",), "vmdk"),
    ("vmdk", ("subformat=streamOptimized",), "vmdk"),
    ("vdi", (), "vdi"),
])
def test_other_formats(d: Path, fmt: str, opts: tuple[str, ...], name: str) -> None:
    p = fac.create(d / f"x-{fmt}-{len(opts)}.img", fmt, "8M", *opts)
    det = detect(p)
    assert det.format == name and det.matches == (name,)
    assert det.virtual_size is not None and det.virtual_size >= 8 * fac.MiB


def test_iso_plain_and_hybrid(d: Path) -> None:
    plain = detect(fac.iso(d / "plain.iso", d, "plain"))
    assert (plain.format, plain.qemu_format, plain.hybrid) == ("iso", "raw", False)
    hyb = detect(fac.iso(d / "hyb.iso", d, "gpt"))
    assert hyb.format == "iso" and hyb.hybrid and set(hyb.matches) == {"iso", "gpt"}
    assert not hyb.findings
    mbr = detect(fac.iso(d / "hybmbr.iso", d, "mbr"))
    assert mbr.format == "iso" and mbr.hybrid


def test_gpt_raw_disk(d: Path) -> None:
    det = detect(fac.gpt_disk(d / "gpt.raw"))
    assert det.format == "raw" and det.qemu_format == "raw" and det.partition_table == "gpt"
    assert det.oslo_format == "gpt"


def test_polyglot_qcow2_with_mbr(d: Path) -> None:
    data = bytearray(fac.qcow2_header() + b"\0" * 4096)
    data[446 + 4] = 0x83  # a partition entry
    data[510:512] = b"\x55\xaa"
    p = d / "poly.img"
    p.write_bytes(bytes(data))
    det = detect(p)
    assert det.format == "polyglot" and det.qemu_format is None
    assert {"qcow2", "gpt"} <= set(det.matches)
    assert [f.code for f in det.findings] == ["polyglot"]


def test_polyglot_qcow2_with_vhd_footer(d: Path) -> None:
    p = fac.create(d / "q.qcow2", "qcow2", "1M")
    src = fac.create(d / "f.vhd", "vpc", "1M", "subformat=fixed")
    footer = fac.read(src, src.stat().st_size - 512, 512)
    with open(p, "ab") as f:
        f.write(footer)
    det = detect(p)
    assert det.format == "polyglot" and set(det.matches) >= {"qcow2", "vhd"}


def test_text_descriptor_without_createtype(d: Path) -> None:
    p = d / "desc.img"
    p.write_text('# Disk DescriptorFile\nversion=1\nRW 2048 FLAT "/etc/passwd" 0\n')
    assert "vmdk" in sniff(p.read_bytes())
    det = detect(p)
    assert det.format == "vmdk" and det.subformat == "descriptor"


def test_detection_is_bounded_on_big_sparse_file(d: Path) -> None:
    p = d / "big.raw"
    with open(p, "wb") as f:
        f.truncate(64 * 1024**3)  # 64 GiB sparse: a full read would take minutes
    t = time.monotonic()
    det = detect(p)
    assert det.format == "raw" and det.virtual_size == 64 * 1024**3
    assert time.monotonic() - t < 5


def test_missing_and_directory(d: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        detect(d / "nope.img")
    with pytest.raises(ImageReadError, match="directory") as e:
        detect(d)
    assert e.value.hint


def test_text_probe_like_qemu(d: Path) -> None:
    """QEMU probes text as VMDK when the first non-comment line is ``version=N``."""
    p = d / "desc2.img"
    p.write_text('# any comment\n\n   \nversion=1\nRW 2048 FLAT "/etc/shadow" 0\n')
    assert detect(p).format == "vmdk"
    q = d / "notes.txt"
    q.write_text("hello\nversion=1\n")
    assert detect(q).format == "raw"


def test_detection_as_json(tmp_path: Path) -> None:
    """What 'imagekit inspect --json' shows of detection: every field, with its value."""
    p = fac.create(tmp_path / "a.qcow2", "qcow2", "4M")
    det = detect(p)
    assert det.to_dict() == {"format": "qcow2", "qemu_format": "qcow2", "matches": ["qcow2"], "virtual_size": 4 << 20,
                             "actual_size": det.actual_size, "file_size": p.stat().st_size, "oslo_format": "qcow2",
                             "subformat": None, "hybrid": False, "partition_table": None, "findings": []}
    assert isinstance(det.actual_size, int) and det.actual_size > 0
    desc = tmp_path / "desc.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x" 0\n')
    vm_det = detect(desc)
    vm = vm_det.to_dict()
    assert (vm["format"], vm["subformat"]) == ("vmdk", "descriptor")
    assert vm["findings"] == [f.to_dict() for f in vm_det.findings]
    disk = detect(fac.gpt_disk(tmp_path / "g.raw")).to_dict()
    assert (disk["format"], disk["partition_table"]) == ("raw", "gpt")
