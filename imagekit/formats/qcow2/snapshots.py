"""qcow2 internal snapshot table (QEMU's ``qcow2_read_snapshots``) with QEMU's limits: at most 65536
snapshots, a table of at most 64 MiB, 1 KiB of extra data per entry; then each snapshot's L1 table
(size, alignment, inside the file, not in the header cluster). Snapshots the table describes are
kept in the :class:`Hdr` for the deep walk and for :class:`Qcow2Info`.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

from imagekit.formats.qcow2.constants import (
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    SNAP,
)
from imagekit.formats.qcow2.model import Hdr, Reader, Snap, decode, hexstr
from imagekit.verdict import Findings

INT64_MAX = (1 << 63) - 1


def parse_snapshots(rd: Reader, h: Hdr, out: Findings) -> None:
    """Read the snapshot table (``qcow2_read_snapshots``) with QEMU's limits."""
    if h.nb_snapshots == 0:
        # QEMU validates the offset even for an empty table (qcow2_validate_table): it refuses to open
        if h.snapshots_offset % h.cluster_size:
            out.reject("snapshot-table-unaligned", f"snapshot table offset {hexstr(h.snapshots_offset)} is not "
                       "cluster aligned (QEMU refuses to open the image, even without snapshots)")
        elif h.snapshots_offset > INT64_MAX:
            out.reject("snapshot-table-outside-file", f"snapshot table offset {hexstr(h.snapshots_offset)} "
                       "exceeds QEMU's maximum file offset")
        h.snapshots_ok = True
        return
    if not _table_placed(h, out):
        return
    # read the table in one bounded piece (<= 64 MiB + one maximal entry)
    limit = min(QCOW_MAX_SNAPSHOTS_SIZE + 40 + QCOW_MAX_SNAPSHOT_EXTRA_DATA + 2 * 65535 + 8,
                h.file_size - h.snapshots_offset)
    buf = rd.upto(h.snapshots_offset, limit)
    pos = 0
    for i in range(h.nb_snapshots):
        end = _entry(h, buf, (pos + 7) & ~7, i, out)
        if end is None:
            return
        pos = end
    h.snapshots_size = pos
    h.snapshots_ok = True
    _check_l1s(h, out)


def _table_placed(h: Hdr, out: Findings) -> bool:
    """The table's entry count and placement; False: it cannot be read."""
    cs = h.cluster_size
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        out.reject("too-many-snapshots", f"{h.nb_snapshots} snapshots exceed QEMU's limit of {QCOW_MAX_SNAPSHOTS}")
        return False
    if h.snapshots_offset % cs:
        out.reject("snapshot-table-unaligned", f"snapshot table offset {hexstr(h.snapshots_offset)} is not "
                   "cluster aligned")
        return False
    if h.snapshots_offset < cs:
        out.reject("cluster-overlap", "snapshot table overlaps the header cluster")
        return False
    if h.snapshots_offset + 40 * h.nb_snapshots > h.file_size:
        out.reject("snapshot-table-outside-file", f"snapshot table at {hexstr(h.snapshots_offset)} with "
                   f"{h.nb_snapshots} entries runs past the end of the file")
        return False
    return True


def _entry(h: Hdr, buf: bytes, pos: int, i: int, out: Findings) -> int | None:
    """Decode snapshot ``i`` at ``pos`` of the table into ``h``; its end, or None: stop reading the table."""
    if pos + 40 > len(buf):
        out.reject("snapshot-table-outside-file", f"snapshot {i} header runs past the end of the file")
        return None
    (l1_off, l1_size, id_len, name_len, dsec, dnsec, _vmclock, vmstate,
     extra) = SNAP.unpack_from(buf, pos)
    pos += 40
    if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
        out.reject("bad-snapshot", f"snapshot {i} has {extra} bytes of extra data (max "
                   f"{QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
        return None
    if pos + extra + id_len + name_len > len(buf):
        out.reject("snapshot-table-outside-file", f"snapshot {i} entry runs past the end of the file")
        return None
    ex = buf[pos:pos + extra]
    disk_size = h.size
    if extra >= 8:
        vmstate = struct.unpack_from(">Q", ex, 0)[0]
    if extra >= 16:
        disk_size = struct.unpack_from(">Q", ex, 8)[0]
    elif h.version == 3:
        out.reject("bad-snapshot", f"snapshot {i} has only {extra} bytes of extra data; v3 requires 16 "
                   "(qemu-img check: incomplete snapshot table entry, a corruption)")
    pos += extra
    sid = decode(buf[pos:pos + id_len])
    pos += id_len
    name = decode(buf[pos:pos + name_len])
    pos += name_len
    if pos > QCOW_MAX_SNAPSHOTS_SIZE:
        out.reject("snapshot-table-too-large", "snapshot table exceeds QEMU's 64 MiB limit")
        return None
    date = datetime.fromtimestamp(dsec, UTC) + timedelta(microseconds=min(dnsec, 10**9) // 1000)
    h.snapshots.append(Snap(l1_off, l1_size, sid, name))
    h.snapshot_dicts.append({"id": sid, "name": name, "l1_size": l1_size, "l1_table_offset": l1_off,
                             "vm_state_size": vmstate, "disk_size": disk_size, "date": date.isoformat()})
    return pos


def _check_l1s(h: Hdr, out: Findings) -> None:
    """Each snapshot's L1 table: size, alignment, inside the file, not in the header cluster."""
    cs = h.cluster_size
    for i, sn in enumerate(h.snapshots):
        label = f"snapshot {i} ({sn.sid!r} {sn.name!r})"
        if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
            out.reject("snapshot-l1-too-large", f"{label}: L1 table of {sn.l1_size} entries exceeds 32 MiB")
        elif sn.l1_offset % cs:
            out.reject("snapshot-l1-unaligned", f"{label}: L1 table offset {hexstr(sn.l1_offset)} is not cluster "
                       "aligned")
        elif sn.l1_size and sn.l1_offset + 8 * sn.l1_size > h.file_size:
            out.reject("snapshot-l1-outside-file", f"{label}: L1 table [{hexstr(sn.l1_offset)}, "
                       f"+{8 * sn.l1_size}) runs past the end of the file")
        elif sn.l1_size and sn.l1_offset < cs:
            out.reject("cluster-overlap", f"{label}: L1 table overlaps the header cluster")
