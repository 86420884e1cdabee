"""Convert: real inputs of every format (made with qemu-img / xorriso) to verified
qcow2; the output's content equals the input's; the error paths lose nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagekit import convert as conv
from imagekit.errors import ImageReadError, OutputExistsError, UnsafeImageError
from imagekit.formats.qcow2 import Qcow2Report
from tests import image_factory as fac
from tests.conftest import ROOT

MiB = 1 << 20


def raw_with_data(path: Path, size: int = 32 * MiB) -> Path:
    return fac.write_pattern(path, size)


def guest_bytes(path: Path, fmt: str) -> str:
    """sha256 of the guest-visible content, read through qemu-img (independent of imagekit)."""
    out = path.with_suffix(path.suffix + ".readback.raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True, timeout=120)
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part"))


# input format -> (maker, qemu -f name for reading the input back)
def make_input(kind: str, tmp: Path) -> tuple[Path, str]:
    base = raw_with_data(tmp / "base.raw")
    if kind == "raw":
        return base, "raw"
    if kind == "qcow2-v2":
        return fac.convert(base, tmp / "in.qcow2", "qcow2", "compat=0.10"), "qcow2"
    if kind == "qcow2-zstd":
        subprocess.run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                        str(base), str(tmp / "in.qcow2")], check=True, timeout=60)
        return tmp / "in.qcow2", "qcow2"
    if kind == "vmdk-sparse":
        return fac.convert(base, tmp / "in.vmdk", "vmdk", "subformat=monolithicSparse"), "vmdk"
    if kind == "vmdk-stream":
        return fac.convert(base, tmp / "in.vmdk", "vmdk", "subformat=streamOptimized"), "vmdk"
    if kind == "vhd-dynamic":
        return fac.convert(base, tmp / "in.vhd", "vpc", "subformat=dynamic"), "vpc"
    if kind == "vhd-fixed":
        return fac.convert(base, tmp / "in.vhd", "vpc", "subformat=fixed"), "vpc"
    if kind == "vhdx":
        return fac.convert(base, tmp / "in.vhdx", "vhdx"), "vhdx"
    if kind == "vdi":
        return fac.convert(base, tmp / "in.vdi", "vdi"), "vdi"
    raise AssertionError(kind)


KINDS = ["raw", "qcow2-v2", "qcow2-zstd", "vmdk-sparse", "vmdk-stream", "vhd-dynamic", "vhd-fixed", "vhdx", "vdi"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_format_converts_to_identical_qcow2(tmp_path: Path, kind: str) -> None:
    src, fmt = make_input(kind, tmp_path)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    res = conv.convert(src, tmp_path / "out.qcow2")
    out = tmp_path / "out.qcow2"
    assert res.output.path == str(out) and out.exists()
    assert res.output.format == "qcow2" and res.output.compat == "1.1"
    assert res.output_verdict.verdict == "accept", res.output_verdict.codes()
    assert res.qemu_check == "consistent" and res.compare == "identical"
    assert res.output.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert guest_bytes(out, "qcow2") == guest_bytes(src, fmt)  # same guest-visible bytes
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # input untouched
    assert res.output.virtual_size >= 32 * MiB
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("fmt", "suffix"), [("raw", ".raw"), ("vmdk", ".vmdk"), ("vhdx", ".vhdx"), ("vpc", ".vhd")])
def test_output_formats(tmp_path: Path, fmt: str, suffix: str) -> None:
    src = fac.convert(raw_with_data(tmp_path / "base.raw"), tmp_path / "in.qcow2", "qcow2")
    res = conv.convert(src, None, conv.ConvertOptions(out_format=fmt))
    assert res.output.path == str(tmp_path / f"in{suffix}")  # default output: next to the input
    assert res.compare == "identical" and res.output_verdict.ok


def test_qcow2_options_compat_cluster_compression(tmp_path: Path) -> None:
    src = raw_with_data(tmp_path / "base.raw")
    opts = conv.ConvertOptions(compat="0.10", cluster_size=4096, compress="zlib")
    res = conv.convert(src, tmp_path / "o.qcow2", opts)
    rep = res.output_verdict.format_report
    assert isinstance(rep, Qcow2Report) and rep.info is not None
    assert rep.info.version == 2 and rep.info.cluster_size == 4096
    assert rep.stats["compressed_clusters"] > 0


def test_qcow2_rewritten_clean_drops_leaks_dirty_and_snapshots(tmp_path: Path) -> None:
    src = fac.convert(raw_with_data(tmp_path / "base.raw"), tmp_path / "in.qcow2", "qcow2", "lazy_refcounts=on")
    subprocess.run(["qemu-img", "snapshot", "-c", "snap1", str(src)], check=True, timeout=30)
    # set the dirty bit (incompatible feature bit 0, header offset 72)
    with open(src, "r+b") as f:
        f.seek(72 + 7)
        low = f.read(1)[0]
        f.seek(72 + 7)
        f.write(bytes([low | 1]))
    res = conv.convert(src, tmp_path / "out.qcow2")
    rep = res.output_verdict.format_report
    assert isinstance(rep, Qcow2Report) and rep.info is not None
    assert rep.info.dirty is False and list(rep.info.snapshots) == []
    assert any("snapshot" in n for n in res.notes)
    assert "dirty" in res.input_verdict.codes()
    kept = conv.convert(src, tmp_path / "kept.qcow2", conv.ConvertOptions(keep_snapshots=True))
    krep = kept.output_verdict.format_report
    assert isinstance(krep, Qcow2Report) and krep.info is not None
    assert [s["name"] for s in krep.info.snapshots] == ["snap1"] and krep.info.dirty is False


def test_hybrid_iso_becomes_a_disk(tmp_path: Path) -> None:
    iso = fac.iso(tmp_path / "hybrid.iso", tmp_path, mode="gpt")
    res = conv.convert(iso, tmp_path / "hybrid.qcow2")
    assert res.input.format == "iso" and any("hybrid" in n for n in res.notes)
    assert guest_bytes(tmp_path / "hybrid.qcow2", "qcow2") == guest_bytes(iso, "raw")


def test_installer_iso_explained_and_needs_force(tmp_path: Path, imagekit) -> None:
    iso = fac.iso(tmp_path / "installer.iso", tmp_path, mode="plain")
    r = imagekit("convert", str(iso))
    assert r.code == 2
    assert "cannot boot as a disk" in r.err and "--disk-format iso" in r.err
    assert "install media" in r.err and not (tmp_path / "installer.qcow2").exists()
    forced = imagekit("--json", "convert", str(iso), "--force")
    assert forced.code == 0, forced.err
    data = forced.json()
    assert any("will not boot" in n for n in data["notes"])  # type: ignore[index]


def test_json_report(tmp_path: Path, imagekit) -> None:
    src = raw_with_data(tmp_path / "disk.img")
    r = imagekit("convert", str(src), "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["input"]["format"] == "raw" and d["output"]["format"] == "qcow2"  # type: ignore[index]
    assert d["output"]["virtual_size"] == 32 * MiB and d["output"]["compat"] == "1.1"  # type: ignore[index]
    out = tmp_path / "disk.qcow2"
    assert d["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()  # type: ignore[index]
    assert d["output"]["size"] == out.stat().st_size and d["verdict"] == "accept"  # type: ignore[index]


# ---------------------------------------------------------------- errors that lose nothing


def test_unsafe_input_refused_before_qemu_img(tmp_path: Path, imagekit) -> None:
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile), "1M"],
                   check=True)
    with pytest.raises(UnsafeImageError) as info:
        conv.convert(hostile, tmp_path / "out.qcow2")
    assert "backing-file" in info.value.message
    r = imagekit("convert", str(hostile), "-o", str(tmp_path / "out.qcow2"))
    assert r.code == 3 and "backing-file" in r.err
    assert not (tmp_path / "out.qcow2").exists() and leftovers(tmp_path) == []


def test_raw_declared_qcow2_inside_a_raw_name_is_not_raw(tmp_path: Path) -> None:
    """A qcow2 named .img is converted as qcow2 (detected), never as raw."""
    src = fac.convert(raw_with_data(tmp_path / "base.raw"), tmp_path / "disk.img", "qcow2")
    res = conv.convert(src, tmp_path / "out.qcow2")
    assert res.input.format == "qcow2" and res.compare == "identical"


def test_unreadable_input(tmp_path: Path, imagekit) -> None:
    with pytest.raises(ImageReadError):
        conv.convert(tmp_path / "missing.raw")
    r = imagekit("convert", str(tmp_path / "missing.raw"))
    assert r.code == 1 and r.err.startswith("error:") and "Traceback" not in r.err


def test_output_exists_needs_force(tmp_path: Path) -> None:
    src = raw_with_data(tmp_path / "d.raw")
    out = tmp_path / "d.qcow2"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        conv.convert(src, out)
    assert out.read_bytes() == b"precious"
    conv.convert(src, out, conv.ConvertOptions(force=True))
    assert out.read_bytes()[:4] == b"QFI\xfb"


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 8 MiB tmpfs mount (needs root, as the whole suite does for apt/DIB)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_leaves_nothing(tmp_path: Path, small_tmpfs: Path, imagekit) -> None:
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(24 * MiB))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    r = imagekit("convert", str(src), "-o", str(small_tmpfs / "out.qcow2"))
    assert r.code == 1
    assert "disk filled up" in r.err and "hint:" in r.err
    assert list(small_tmpfs.iterdir()) == []  # neither the output nor a temporary file
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_interrupted_conversion_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(192 * MiB))  # incompressible: zlib makes the conversion take seconds
    out = tmp_path / "out.qcow2"
    proc = subprocess.Popen([sys.executable, "-m", "imagekit", "convert", str(src), "-o", str(out),
                             "--compress", "zlib"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # wait until qemu-img is writing the temporary file
        if leftovers(tmp_path) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert leftovers(tmp_path), "the conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
    # no qemu-img left running on our files
    ps = subprocess.run(["pgrep", "-af", "qemu-img convert"], capture_output=True, text=True).stdout
    assert str(src) not in ps
