"""`imagekit check` / `imagekit inspect` through the real CLI: verdicts, exit codes, JSON."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import image_factory as fac


def qcow2(tmp: Path, name: str, *extra: str) -> Path:
    p = tmp / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(p), "16M"], check=True)
    return p


def test_check_accept_exit_0(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "ok.qcow2")
    r = imagekit("check", str(img))
    assert r.code == 0 and r.out.startswith("accept")
    d = imagekit("check", str(img), "--json").json()
    assert d["verdict"] == "accept" and d["format"] == "qcow2"  # type: ignore[index]


def test_check_warn_exit_0(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "dirty.qcow2")
    with open(img, "r+b") as f:  # dirty bit: incompatible_features bit 0
        f.seek(79)
        f.write(b"\x01")
    d = imagekit("--json", "check", str(img))
    assert d.code == 0
    data = d.json()
    assert data["verdict"] == "warn" and "dirty" in [f["code"] for f in data["findings"]]  # type: ignore[index]


def test_check_reject_exit_3_with_codes(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "evil.qcow2", "-b", "/etc/shadow", "-F", "raw")
    r = imagekit("check", str(img))
    assert r.code == 3
    assert "backing-file" in r.out and r.err.startswith("error:") and "hint:" in r.err
    j = imagekit("check", str(img), "--json")
    assert j.code == 3 and j.out.lstrip().startswith("{")


def test_check_declared_format_mismatch(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "disk.raw")
    r = imagekit("--json", "check", str(img), "--format", "raw")
    assert r.code == 3
    assert "format-mismatch" in r.out


def test_check_max_virtual_size(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "big.qcow2")
    assert imagekit("check", str(img), "--max-virtual-size", "8M").code == 3
    assert imagekit("check", str(img), "--max-virtual-size", "1G").code == 0
    assert imagekit("check", str(img), "--max-virtual-size", "lots").code == 2


def test_check_unreadable_exit_1(tmp_path: Path, imagekit) -> None:
    r = imagekit("check", str(tmp_path / "nope.qcow2"))
    assert r.code == 1 and r.err.startswith("error:") and "Traceback" not in r.err
    r = imagekit("check", str(tmp_path))
    assert r.code == 1


def test_inspect_never_trusts_extension(tmp_path: Path, imagekit) -> None:
    src = fac.write_pattern(tmp_path / "x.raw", 8 << 20)
    vmdk = fac.convert(src, tmp_path / "looks-like.qcow2", "vmdk")
    d = imagekit("inspect", str(vmdk), "--json").json()
    assert d["format"] == "vmdk" and d["virtual_size"] == 8 << 20  # type: ignore[index]
    text = imagekit("inspect", str(vmdk))
    assert text.code == 0 and "vmdk" in text.out


def test_inspect_qcow2_details(tmp_path: Path, imagekit) -> None:
    img = qcow2(tmp_path, "s.qcow2", "-o", "compression_type=zstd,lazy_refcounts=on")
    subprocess.run(["qemu-img", "snapshot", "-c", "before-update", str(img)], check=True)
    d = imagekit("--json", "inspect", str(img), "--deep").json()
    q = d["qcow2"]  # type: ignore[index]
    assert q["compat"] == "1.1" and q["compression_type"] == "zstd"
    assert q["features"]["lazy_refcounts"] is True
    assert [s["name"] for s in q["snapshots"]] == ["before-update"]
