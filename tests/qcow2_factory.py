"""Helpers to build real qcow2 images with qemu-img/qemu-io and patch them with ``struct``.

Used by ``tests/test_qcow2.py`` and ``tests/test_qcow2_fuzz.py``.  Everything is
written under a caller-given directory (pytest's ``tmp_path``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"

# header field offsets
H_MAGIC = 0
H_VERSION = 4
H_BACKING_OFFSET = 8
H_BACKING_SIZE = 16
H_CLUSTER_BITS = 20
H_SIZE = 24
H_CRYPT = 32
H_L1_SIZE = 36
H_L1_OFFSET = 40
H_RT_OFFSET = 48
H_RT_CLUSTERS = 56
H_NB_SNAPSHOTS = 60
H_SNAPSHOTS_OFFSET = 64
H_INCOMPAT = 72
H_COMPAT = 80
H_AUTOCLEAR = 88
H_REFCOUNT_ORDER = 96
H_HEADER_LENGTH = 100
H_COMPRESSION_TYPE = 104

COPIED = 1 << 63
COMPRESSED = 1 << 62


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=120)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(QEMU_IMG, *args, check=check)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def check_rc(path: Path) -> int:
    """Exit code of ``qemu-img check -f qcow2``: 0 ok, 2 corruptions, 3 leaks."""
    return qemu_img("check", "-f", "qcow2", str(path), check=False).returncode


def create(path: Path, size: str = "16M", *, opts: str = "", extra: tuple[str, ...] = ()) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, *extra, str(path), size)
    return path


def luks(path: Path, size: str = "16M", attempts: int = 200) -> Path:
    """A LUKS-encrypted qcow2 (key derivation timed at 10 ms).

    qemu-img benchmarks PBKDF2 before it writes a LUKS header, whatever ``iter-time`` says, and
    QEMU before 9.2.1 fails with "Unable to get accurate CPU usage" when the benchmark measures no
    thread CPU time (fixed upstream: "crypto: fix bogus error benchmarking pbkdf on fast
    machines"). Measured here: 12 of 60 creations fail with a test suite running beside them, and
    the failures come in bursts (2 of 90 tests failed with 5 attempts). Only that failure is
    retried; an attempt costs about 50 ms, so 200 attempts ride out any burst (10 s at most)."""
    for attempt in range(attempts):
        try:
            return create(path, size, opts="encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                          extra=("--object", "secret,id=sec0,data=123456"))
        except subprocess.CalledProcessError as exc:
            if "accurate CPU usage" not in str(exc.stderr) or attempt == attempts - 1:
                raise AssertionError(f"qemu-img create (LUKS), attempt {attempt + 1}: {exc.stderr}") from exc
            path.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def with_data(path: Path, size: str = "16M", *, opts: str = "cluster_size=65536",
              writes: tuple[str, ...] = ("write -P 0xab 0 1M",)) -> Path:
    """A qcow2 image with data written by qemu-io (so L2 tables and data clusters exist)."""
    create(path, size, opts=opts)
    if writes:
        qemu_io(path, *writes)
    return path


def compressed(tmp: Path, name: str, *, ctype: str = "zlib", cluster_size: int = 65536, mib: int = 2) -> Path:
    """A compressed qcow2 made by ``qemu-img convert -c`` from a raw file of compressible data."""
    raw = tmp / f"{name}.raw"
    with open(raw, "wb") as f:
        for i in range(mib * 16):
            f.write((bytes([i % 251]) * 1024 + os.urandom(64)) * 60 + b"\0" * (65536 - 60 * 1088))
    out = tmp / f"{name}.qcow2"
    opts = f"cluster_size={cluster_size}"
    if ctype != "zlib":
        opts += f",compression_type={ctype}"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(out))
    raw.unlink()
    return out


class Q2:
    """Read and patch fields of a qcow2 file in place (big-endian, refcount_order 4)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # raw access
    def read(self, off: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, off: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def u32(self, off: int) -> int:
        return int(struct.unpack(">I", self.read(off, 4))[0])

    def u64(self, off: int) -> int:
        return int(struct.unpack(">Q", self.read(off, 8))[0])

    def set_u32(self, off: int, v: int) -> None:
        self.write(off, struct.pack(">I", v))

    def set_u64(self, off: int, v: int) -> None:
        self.write(off, struct.pack(">Q", v))

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def truncate(self, n: int) -> None:
        os.truncate(self.path, n)

    # header
    @property
    def cluster_bits(self) -> int:
        return self.u32(H_CLUSTER_BITS)

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l1_offset(self) -> int:
        return self.u64(H_L1_OFFSET)

    @property
    def rt_offset(self) -> int:
        return self.u64(H_RT_OFFSET)

    @property
    def snapshots_offset(self) -> int:
        return self.u64(H_SNAPSHOTS_OFFSET)

    # L1 / L2
    def l1(self, i: int) -> int:
        return self.u64(self.l1_offset + 8 * i)

    def set_l1(self, i: int, v: int) -> None:
        self.set_u64(self.l1_offset + 8 * i, v)

    def l2_table(self, l1i: int = 0) -> int:
        return self.l1(l1i) & 0x00FFFFFFFFFFFE00

    def l2(self, j: int, l1i: int = 0, width: int = 8) -> int:
        return self.u64(self.l2_table(l1i) + width * j)

    def set_l2(self, j: int, v: int, l1i: int = 0, width: int = 8) -> None:
        self.set_u64(self.l2_table(l1i) + width * j, v)

    # refcounts (16-bit)
    def refblock(self, i: int = 0) -> int:
        return self.u64(self.rt_offset + 8 * i) & ~0x1FF

    def refcount(self, cluster: int) -> int:
        per = self.cs // 2
        return int(struct.unpack(">H", self.read(self.refblock(cluster // per) + 2 * (cluster % per), 2))[0])

    def set_refcount(self, cluster: int, v: int) -> None:
        per = self.cs // 2
        self.write(self.refblock(cluster // per) + 2 * (cluster % per), struct.pack(">H", v))

    def append_cluster(self) -> int:
        """Append one zero cluster (file padded to a cluster boundary); return its index."""
        cs = self.cs
        end = -(-self.size // cs) * cs
        self.truncate(end + cs)
        return end // cs


def assert_same_in_windows(path: Path, report: object, window: int, l2_range: int, **kwargs: object) -> None:
    """verify() cut into windows of ``window`` host clusters (several passes, compared 2 clusters at a time)
    must find exactly what the default (usually one-pass) check found: same verdict, same finding codes in
    the same order, same stats."""
    from imagekit.formats import qcow2
    from imagekit.formats.qcow2 import refcounts

    assert isinstance(report, qcow2.Qcow2Report)
    saved = refcounts.COMPARE_SLICE
    refcounts.COMPARE_SLICE = 2  # the end-of-window comparison in slices of 2 clusters too
    try:
        small = qcow2.verify(path, window_clusters=window, l2_range_clusters=l2_range,
                             **kwargs)  # type: ignore[arg-type]
    finally:
        refcounts.COMPARE_SLICE = saved

    def key(r: qcow2.Qcow2Report) -> tuple[object, ...]:
        stats = {k: v for k, v in r.stats.items() if k not in ("elapsed_ms", "passes")}
        return r.verdict, [(f.code, f.severity) for f in r.findings], stats

    if "time-limit" in small.codes() or "time-limit" in report.codes():
        return
    assert key(small) == key(report), (small.findings, report.findings)
