"""Property test: verify() on mutated real qcow2 images never raises and always terminates.

A few valid images are built once per module with qemu-img; hypothesis then
overwrites header fields, header-extension bytes and bytes of the L1, L2,
refcount and snapshot tables with hostile values (boundary numbers, offsets
just past EOF, cluster-aligned offsets that hit other metadata).  verify()
must return a report (never raise: the file is readable) within its
``time_limit``.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagekit.formats import qcow2
from tests import qcow2_factory as qf

pytestmark = pytest.mark.skipif(not Path(qf.QEMU_IMG).exists(), reason="qemu-img not installed")

TIME_LIMIT = 10.0

# (offset, width) of every fixed header field
HEADER_FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
                 (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1)]


class Base:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        q = qf.Q2(path)
        self.cs = q.cs
        self.regions: list[tuple[int, int]] = [(0, min(len(self.data), 4096))]  # header + extensions
        self.regions.append((q.l1_offset, 64))
        self.regions.append((q.rt_offset, 64))
        self.regions.append((q.refblock(), 256))
        if q.l2_table():
            self.regions.append((q.l2_table(), 512))
        if q.u32(qf.H_NB_SNAPSHOTS):
            self.regions.append((q.snapshots_offset, 128))


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Base]:
    d = tmp_path_factory.mktemp("fuzzbase")
    v3 = qf.with_data(d / "v3.qcow2", size="8M", writes=("write -P 0xab 0 512k", "write -P 1 4M 64k"))
    snap = qf.with_data(d / "snap.qcow2", size="8M", opts="cluster_size=4096", writes=("write -P 1 0 256k",))
    qf.qemu_img("snapshot", "-c", "s", str(snap))
    qf.qemu_io(snap, "write -P 2 0 64k")
    xl2 = qf.with_data(d / "xl2.qcow2", size="8M", opts="extended_l2=on,cluster_size=65536",
                       writes=("write -P 1 0 256k", "write -z 1M 64k"))
    comp = qf.compressed(d, "comp", cluster_size=4096, mib=1)
    v2 = qf.with_data(d / "v2.qcow2", size="8M", opts="compat=0.10,cluster_size=512",
                      writes=("write -P 1 0 64k",))
    return [Base(p) for p in (v3, snap, xl2, comp, v2)]


def _value(draw: st.DrawFn, width: int, file_size: int, cs: int) -> int:
    top = (1 << (8 * width)) - 1
    choice = draw(st.sampled_from(["small", "edge", "eof", "aligned", "any", "flip"]))
    if choice == "small":
        v = draw(st.integers(0, 70))
    elif choice == "edge":
        v = draw(st.sampled_from([0, 1, top, top >> 1, (top >> 1) + 1, 1 << 62, 1 << 63, 0x7FFFFFFF]))
    elif choice == "eof":
        v = file_size + draw(st.integers(-2 * cs, 2 * cs))
    elif choice == "aligned":
        v = draw(st.integers(0, file_size // cs + 4)) * cs | draw(st.sampled_from([0, 1 << 63, 1 << 62, 1]))
    elif choice == "flip":
        v = 1 << draw(st.integers(0, 8 * width - 1))
    else:
        v = draw(st.integers(0, top))
    return v & top


@st.composite
def mutation(draw: st.DrawFn, base: Base) -> tuple[int, bytes, bool]:
    kind = draw(st.sampled_from(["header", "table", "table", "byte", "truncate"]))
    n = len(base.data)
    if kind == "header":
        off, width = draw(st.sampled_from(HEADER_FIELDS))
        v = _value(draw, width, n, base.cs)
        return off, v.to_bytes(width, "big"), False
    if kind == "table":
        start, length = draw(st.sampled_from(base.regions))
        off = start + 8 * draw(st.integers(0, max(0, length // 8 - 1)))
        return off, struct.pack(">Q", _value(draw, 8, n, base.cs)), False
    if kind == "byte":
        off = draw(st.integers(0, n - 1))
        return off, bytes([draw(st.integers(0, 255))]), False
    return draw(st.integers(0, n)), b"", True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_verify_never_raises(bases: list[Base], tmp_path: Path, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(bases))
    muts = data.draw(st.lists(mutation(base), min_size=1, max_size=4))
    buf = bytearray(base.data)
    for off, b, trunc in muts:
        if trunc:
            del buf[off:]
        elif off < len(buf):
            buf[off:off + len(b)] = b
    p = tmp_path / "fuzz.qcow2"
    p.write_bytes(bytes(buf))
    r = qcow2.verify(p, time_limit=TIME_LIMIT)
    assert isinstance(r, qcow2.Qcow2Report)
    qf.assert_same_in_windows(p, r, 64, 32, time_limit=TIME_LIMIT)  # several passes: same result
    assert r.stats["elapsed_ms"] <= (TIME_LIMIT + 5) * 1000
    assert len(r.findings) <= 40 * qcow2.MAX_FINDINGS_PER_CODE
    r.to_dict()
    for f in r.findings:
        assert f.severity in ("info", "warn", "reject") and f.code
    if r.info is None:
        assert r.verdict == "reject"
    shallow = qcow2.verify(p, deep=False)
    assert (shallow.info is None) == (r.info is None)


def test_fuzz_base_images_are_valid(bases: list[Base], tmp_path: Path) -> None:
    for i, b in enumerate(bases):
        p = tmp_path / f"b{i}.qcow2"
        p.write_bytes(b.data)
        r = qcow2.verify(p)
        assert r.verdict == "accept", (i, r.findings)
    shutil.rmtree(tmp_path, ignore_errors=True)
