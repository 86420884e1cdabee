"""Persistent dirty bitmaps in the deep qcow2 check, at their limits: real qemu-img images with bitmaps,
valid edge cases that must be accepted and single-field corruptions that must be rejected with the right
finding code (QEMU's ``docs/interop/qcow2.txt``, "Bitmaps extension", "Bitmap directory", "Bitmap table").

The expected findings are exact (every code and its severity): a corruption must be reported by the check
that owns it, and a broken bitmap directory must not also be walked (no spurious findings from garbage,
no leak warnings for clusters it references). Where QEMU has an opinion it is asked too: ``qemu-img check``
exits 0 on the valid images and cannot open (1) or finds corrupt (2) the rejected ones, except where
imagekit is stricter on purpose.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from imagekit.formats import qcow2
from tests import qcow2_factory as qf
from tests.qcow2_factory import COPIED, Q2

pytestmark = pytest.mark.skipif(not Path(qf.QEMU_IMG).exists(), reason="qemu-img not installed")

EXT_BITMAPS = 0x23852875
AUTOCLEAR_BITMAPS = 1
BME_MAX_TABLE_SIZE = 0x8000000
MAX_BITMAPS = 65535
MAX_DIR_SIZE = 1024 * MAX_BITMAPS
CHUNK = 1 << 16  # bitmap table entries the check decodes at a time
HUGE_TABLE = CHUNK + 4  # a bitmap table of two chunks, the second one short
LONG_NAME = "n" * 1023  # BME_MAX_NAME_SIZE


class BQ(Q2):
    """A qcow2 with a bitmaps extension: its fields, directory entries and bitmap tables."""

    @property
    def ext(self) -> int:
        """Offset of the bitmaps extension's data (nb_bitmaps u32, reserved u32, dir size u64, dir offset u64)."""
        off = self.u32(qf.H_HEADER_LENGTH)
        while True:
            t, n = struct.unpack(">II", self.read(off, 8))
            if t == EXT_BITMAPS:
                return off + 8
            assert t != 0, "no bitmaps extension"
            off += 8 + ((n + 7) & ~7)

    @property
    def dsize(self) -> int:
        return self.u64(self.ext + 8)

    @property
    def doff(self) -> int:
        return self.u64(self.ext + 16)

    def entry(self, i: int) -> int:
        """File offset of directory entry ``i``."""
        pos = self.doff
        for _ in range(i):
            extra, name_size = self.u32(pos + 20), struct.unpack(">H", self.read(pos + 18, 2))[0]
            pos += (24 + extra + name_size + 7) & ~7
        return pos

    def toff(self, i: int) -> int:
        return self.u64(self.entry(i))

    def tsize(self, i: int) -> int:
        return self.u32(self.entry(i) + 8)

    def table(self, i: int) -> list[int]:
        n = self.tsize(i)
        return list(struct.unpack(f">{n}Q", self.read(self.toff(i), 8 * n)))

    def set_table_entry(self, i: int, j: int, v: int) -> None:
        self.set_u64(self.toff(i) + 8 * j, v)

    def first_data(self, i: int = 0) -> tuple[int, int]:
        """(index, entry) of bitmap ``i``'s first table entry that points at a data cluster."""
        return next((j, e) for j, e in enumerate(self.table(i)) if e)

    def move_table(self, i: int, entries: list[int], *, pad: bool = True) -> int:
        """Write ``entries`` as bitmap ``i``'s table at the first cluster boundary at or after EOF (the file
        ends right after the table unless ``pad``); refcounts follow: 1 on the new clusters, 0 on the old."""
        cs = self.cs
        old, old_size = self.toff(i), self.tsize(i)
        start = -(-self.size // cs) * cs
        data = struct.pack(f">{len(entries)}Q", *entries)
        self.truncate(start)
        self.write(start, data)
        if pad:
            self.truncate(-(-self.size // cs) * cs)
        for c in range(old // cs, -(-(old + 8 * old_size) // cs)):
            self.set_refcount(c, 0)
        for c in range(start // cs, -(-(start + len(data)) // cs)):
            self.set_refcount(c, 1)
        self.set_u64(self.entry(i), start)
        self.set_u32(self.entry(i) + 8, len(entries))
        return start


def _build(d: Path, name: str, size: str, opts: str, bitmaps: list[tuple[str, str | None]],
           writes: tuple[str, ...] = ()) -> Path:
    p = qf.create(d / f"{name}.qcow2", size, opts=opts)
    for bname, gran in bitmaps:
        qf.qemu_img("bitmap", "--add", *(("-g", gran) if gran else ()), str(p), bname)
    if writes:
        qf.qemu_io(p, *writes)  # the bitmaps are enabled: the writes dirty them, so their tables get data clusters
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qcow2bitmaps")
    return {
        # 64 KiB clusters, one bitmap, a one-entry table pointing at one data cluster
        "bm": _build(d, "bm", "16M", "cluster_size=65536", [("b0", None)], ("write -P 1 0 1M",)),
        # 512-byte clusters: b0 (granularity 512, bits 9) has a 64-entry table (one full cluster) with data
        # clusters at entries 0, 20 and 63 and zero entries between them; b1 an 8-entry table
        "small": _build(d, "small", "128M", "cluster_size=512", [("b0", "512"), ("b1", None)],
                        ("write -P 1 0 64k", "write -P 2 40M 64k", "write -P 3 127M 512")),
        # names of 1 and of 1023 bytes (the limits), granularity 2 GiB (bits 31, the largest)
        "names": _build(d, "names", "16M", "cluster_size=65536",
                        [("a", None), (LONG_NAME, None), ("g31", "2147483648")], ("write -P 1 0 1M",)),
        # 4 KiB clusters and a virtual size whose bitmap table at granularity 512 has HUGE_TABLE entries (more
        # than one chunk, within QEMU's 512 MiB of bitmap data); made at granularity 2 GiB (a 1-entry table),
        # which the two-chunk case turns into granularity 512 with the full table
        "huge": _build(d, "huge", str(HUGE_TABLE << 24), "cluster_size=4096", [("b0", "2147483648")]),
    }


def _copy(images: dict[str, Path], tmp_path: Path, name: str) -> BQ:
    dst = tmp_path / f"{name}.qcow2"
    shutil.copy(images[name], dst)
    return BQ(dst)


def codes(r: qcow2.Qcow2Report) -> dict[str, str]:
    d: dict[str, str] = {}
    for f in r.findings:
        d.setdefault(f.code, f.severity)
    return d


def _verdict(c: dict[str, str]) -> str:
    sev = set(c.values())
    return "reject" if "reject" in sev else "warn" if "warn" in sev else "accept"


# --------------------------------------------------------------------------- valid images


@pytest.mark.parametrize("name", ["bm", "small", "names", "huge"])
def test_valid_bitmap_images_have_no_findings(images: dict[str, Path], name: str) -> None:
    """Names of 1 and 1023 bytes, granularity bits 9 and 31, tables with zero entries between data
    clusters, a table filling its cluster exactly: no finding at all (not even an info), as QEMU."""
    r = qcow2.verify(images[name])
    assert r.findings == () and r.verdict == "accept", r.findings
    assert r.stats["leaked_clusters"] == 0 and r.stats["overlapping_clusters"] == 0
    assert qf.check_rc(images[name]) == 0


def test_valid_images_really_have_the_edge_cases(images: dict[str, Path]) -> None:
    """The valid images above hold what the other tests rely on."""
    names = BQ(images["names"])
    sizes = [struct.unpack(">H", names.read(names.entry(i) + 18, 2))[0] for i in range(3)]
    assert sizes == [1, 1023, 3] and names.read(names.entry(2) + 17, 1) == b"\x1f"
    small = BQ(images["small"])
    assert small.read(small.entry(0) + 17, 1) == b"\x09" and small.tsize(0) * 8 == small.cs
    t = small.table(0)
    assert t[0] and t[20] and t[63] and not any(t[1:20]) and not any(t[21:63])
    huge = BQ(images["huge"])
    assert huge.tsize(0) == 1 and huge.read(huge.entry(0) + 17, 1) == b"\x1f"


# --------------------------------------------------------------------------- one field broken, exact findings

Patch = Callable[[BQ], None]
R, INFO, W = "reject", "info", "warn"


def _grow(q: BQ, nb: int, dsize: int) -> None:
    """Declare ``nb`` bitmaps in a directory of ``dsize`` bytes that the file really holds (zeros after
    the real entry; the new clusters refcounted)."""
    q.set_u32(q.ext, nb)
    q.set_u64(q.ext + 8, dsize)
    end = q.doff + dsize
    first_new = -(-q.size // q.cs)
    q.truncate(end)
    for c in range(first_new, -(-end // q.cs)):
        q.set_refcount(c, 1)


def _name_size(q: BQ, i: int, n: int) -> None:
    q.write(q.entry(i) + 18, struct.pack(">H", n))


def _empty_name(q: BQ) -> None:
    """The only bitmap's name size 0, the directory cut to its 24-byte entry (exactly 24 * nb bytes)."""
    _name_size(q, 0, 0)
    q.set_u64(q.ext + 8, 24)


def _directory_in_cluster_1(q: BQ) -> None:
    """Move the refcount table away from cluster 1 and the bitmap directory into it: doff == cluster size."""
    cs, old_rt, old_dir, dsize = q.cs, q.rt_offset, q.doff, q.dsize
    assert old_rt == cs and q.u32(qf.H_RT_CLUSTERS) == 1
    new_rt = q.append_cluster() * cs
    q.write(new_rt, q.read(old_rt, cs))
    q.set_u64(qf.H_RT_OFFSET, new_rt)
    q.set_refcount(new_rt // cs, 1)
    q.write(cs, q.read(old_dir, dsize).ljust(cs, b"\0"))
    q.set_u64(q.ext + 16, cs)
    q.set_refcount(old_dir // cs, 0)


def _tables_at_eof(q: BQ, short: int = 0) -> None:
    """Both tables of "small" moved to the end of the file: b0's (exactly one cluster) right before b1's,
    b1's ending exactly at EOF (or ``short`` bytes after it)."""
    q.move_table(0, q.table(0))
    start = q.move_table(1, q.table(1), pad=False)
    assert q.size == start + 8 * q.tsize(1)
    if short:
        q.truncate(q.size - short)


def _huge_table(q: BQ) -> None:
    """Granularity 512 and the table of HUGE_TABLE entries the virtual size needs: valid all-ones entry in
    the first chunk; reserved bits in the first entry of the second chunk, its last entry past EOF."""
    entries = [0] * HUGE_TABLE
    entries[0] = 1
    entries[CHUNK] = 2
    entries[-1] = 1 << 40
    q.write(q.entry(0) + 17, b"\x09")
    q.move_table(0, entries)


CASES: list[tuple[str, str, Patch, dict[str, str], int | None]] = [
    # (id, base image, patch, exact findings {code: severity}, qemu-img check exit code or None: not asked)
    # the bitmaps extension
    ("autoclear-bit-clear", "bm", lambda q: q.set_u64(qf.H_AUTOCLEAR, 0), {"bitmaps-inconsistent": INFO,
                                                                          "leaked-clusters": W}, 3),
    ("ext-reserved", "bm", lambda q: q.set_u32(q.ext + 4, 1), {"bad-extension": R}, 1),
    ("nb-zero", "bm", lambda q: q.set_u32(q.ext, 0), {"bad-extension": R}, 1),
    ("nb-all-ones", "bm", lambda q: q.set_u32(q.ext, 0xFFFFFFFF), {"bad-extension": R}, 1),
    ("nb-2-in-one-entry", "bm", lambda q: q.set_u32(q.ext, 2), {"bad-extension": R}, 1),
    ("nb-65536", "bm", lambda q: _grow(q, MAX_BITMAPS + 1, 24 * (MAX_BITMAPS + 1)), {"bad-extension": R}, 1),
    # 65535 bitmaps is allowed: the directory is walked, and its 65534 all-zero entries are refused
    ("nb-65535", "bm", lambda q: _grow(q, MAX_BITMAPS, 32 + 24 * (MAX_BITMAPS - 1)),
     {"bad-bitmap": R, "too-many-findings": INFO}, 1),
    ("dir-size-max-past-eof", "bm", lambda q: q.set_u64(q.ext + 8, MAX_DIR_SIZE),
     {"bitmap-directory-outside-file": R}, 1),
    ("dir-size-over-max", "bm", lambda q: q.set_u64(q.ext + 8, MAX_DIR_SIZE + 1),
     {"bad-extension": R, "bitmap-directory-outside-file": R}, 1),
    ("dir-8-bytes-past-eof", "bm", lambda q: q.set_u64(q.ext + 8, q.dsize + 8),
     {"bitmap-directory-outside-file": R}, 1),
    ("dir-unaligned", "bm", lambda q: q.set_u64(q.ext + 16, q.doff + 8), {"bitmap-directory-unaligned": R}, 1),
    ("dir-in-header", "bm", lambda q: q.set_u64(q.ext + 16, 0), {"cluster-overlap": R}, 1),
    ("dir-in-cluster-1", "bm", _directory_in_cluster_1, {}, 0),
    # directory entries; a name of 0 bytes in a directory of exactly 24 * nb bytes (QEMU loads it: stricter)
    ("name-size-0", "bm", _empty_name, {"bad-bitmap": R}, None),
    ("name-size-1024", "names", lambda q: _name_size(q, 1, 1024), {"bad-bitmap": R}, 1),
    ("type-2", "bm", lambda q: q.write(q.entry(0) + 16, b"\x02"), {"bad-bitmap": R}, 1),
    ("granularity-bits-8", "bm", lambda q: q.write(q.entry(0) + 17, b"\x08"), {"bad-bitmap": R}, 1),
    ("granularity-bits-32", "names", lambda q: q.write(q.entry(2) + 17, b"\x20"), {"bad-bitmap": R}, 1),
    ("reserved-flag", "bm", lambda q: q.set_u32(q.entry(0) + 12, 8 | 2), {"bad-bitmap": R}, 1),
    ("in-use-only", "bm", lambda q: q.set_u32(q.entry(0) + 12, 1 | 2), {"bitmap-in-use": INFO}, 0),
    # bitmap table placement
    ("table-at-0", "bm", lambda q: q.set_u64(q.entry(0), 0), {"bad-bitmap": R}, 1),
    ("table-unaligned", "bm", lambda q: q.set_u64(q.entry(0), q.toff(0) + 512), {"bitmap-table-unaligned": R}, 1),
    # at the entry limit the table is still placed (and runs past EOF), but its data would exceed QEMU's 512 MiB
    # and it does not match the disk's size
    ("table-size-max", "bm", lambda q: q.set_u32(q.entry(0) + 8, BME_MAX_TABLE_SIZE),
     {"bitmap-table-outside-file": R, "bad-bitmap": R}, 1),
    ("table-size-over-max", "bm", lambda q: q.set_u32(q.entry(0) + 8, BME_MAX_TABLE_SIZE + 1), {"bad-bitmap": R}, 1),
    ("tables-end-exactly-at-eof", "small", _tables_at_eof, {}, 0),
    # QEMU reads zeroes past EOF and loads it (stricter on purpose: STRICTER_THAN_QEMU)
    ("table-one-byte-past-eof", "small", lambda q: _tables_at_eof(q, short=1), {"bitmap-table-outside-file": R},
     None),
    # bitmap table entries
    ("entry-reserved-bit-1", "small", lambda q: q.set_table_entry(0, 20, q.table(0)[20] | 2), {"reserved-bits": R},
     1),
    ("entry-reserved-bit-63", "small", lambda q: q.set_table_entry(0, 20, q.table(0)[20] | 1 << 63),
     {"reserved-bits": R}, 1),
    ("entry-all-ones-with-offset", "small", lambda q: q.set_table_entry(0, 20, q.table(0)[20] | 1),
     {"reserved-bits": R}, 1),
    ("entry-all-ones", "small", lambda q: q.set_table_entry(0, 5, 1), {}, 0),
    ("entry-unaligned", "bm", lambda q: q.set_table_entry(0, q.first_data()[0], q.first_data()[1] + 512),
     {"bad-bitmap": R, "leaked-clusters": W}, 1),
    ("entry-past-eof", "bm", lambda q: q.set_table_entry(0, q.first_data()[0], 1 << 40),
     {"bitmap-data-outside-file": R, "leaked-clusters": W}, 2),
    ("table-of-two-chunks", "huge", _huge_table, {"reserved-bits": R, "bitmap-data-outside-file": R}, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bitmap_field(images: dict[str, Path], tmp_path: Path,
                      case: tuple[str, str, Patch, dict[str, str], int | None]) -> None:
    _id, image, patch, expected, qemu_rc = case
    q = _copy(images, tmp_path, image)
    patch(q)
    r = qcow2.verify(q.path, time_limit=30)
    assert codes(r) == expected, r.findings
    assert r.verdict == _verdict(expected)
    if qemu_rc is not None:
        assert qf.check_rc(q.path) == qemu_rc


def test_cases_cover_each_kind() -> None:
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {"bad-extension", "bad-bitmap", "reserved-bits", "bitmap-table-outside-file", "bitmap-data-outside-file",
            "bitmap-directory-outside-file", "bitmap-in-use"} <= {k for c in CASES for k in c[3]}


# --------------------------------------------------------------------------- what the findings say


def test_messages_say_where(images: dict[str, Path], tmp_path: Path) -> None:
    """A directory running past EOF names its offset and size; an extension of the wrong length its length."""
    q = _copy(images, tmp_path, "bm")
    doff = q.doff
    q.set_u64(q.ext + 8, q.dsize + 8)
    msg = next(f.message for f in qcow2.verify(q.path).findings if f.code == "bitmap-directory-outside-file")
    assert f"0x{doff:x}" in msg and "+40" in msg
    q = _copy(images, tmp_path, "bm")
    q.set_u32(q.ext - 4, 16)
    r = qcow2.verify(q.path)
    assert any("length 16" in f.message for f in r.findings if f.code == "bad-extension"), r.findings


def test_guest_data_on_bitmap_clusters_is_an_overlap_named_as_such(images: dict[str, Path], tmp_path: Path) -> None:
    """Guest clusters mapped onto the bitmap's data cluster and onto its table: cluster-overlap, and the
    message says what else each cluster is."""
    q = _copy(images, tmp_path, "bm")
    q.set_l2(0, COPIED | q.first_data()[1])
    q.set_l2(1, COPIED | q.toff(0))
    r = qcow2.verify(q.path)
    assert codes(r)["cluster-overlap"] == "reject" and r.verdict == "reject"
    msg = next(f.message for f in r.findings if f.code == "cluster-overlap")
    assert "bitmap data" in msg and "bitmap 0 ('b0') table" in msg, msg
    assert qf.check_rc(q.path) == 2


# --------------------------------------------------------------------------- what QEMU refuses to open
# stricter.py promises that an image qemu-img check cannot open is always rejected: bitmap table sizes
# (QEMU's check_dir_entry and load_bitmap) and extra data.


@pytest.mark.parametrize("what", ["table-size-0", "table-too-small", "table-too-large", "extra-data"])
def test_bitmaps_qemu_cannot_open_are_rejected(images: dict[str, Path], tmp_path: Path, what: str) -> None:
    q = _copy(images, tmp_path, "small")
    e = q.entry(1)
    if what == "table-size-0":
        q.set_u32(e + 8, 0)
    elif what == "table-too-small":
        q.set_u32(e + 8, 4)
    elif what == "table-too-large":
        q.set_u32(e + 8, q.u32(e + 8) + 1)
    else:  # b1's name moved behind 8 bytes of extra data, the directory grown to hold it
        q.truncate(q.doff + q.dsize + 8)
        q.write(e + 24, bytes(8) + b"b1")
        q.set_u32(e + 20, 8)
        q.set_u64(q.ext + 8, q.dsize + 8)
    assert qf.check_rc(q.path) == 1
    assert qcow2.verify(q.path).verdict == "reject"
