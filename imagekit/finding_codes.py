"""Every finding code imagekit's checks can report, with what it means.

A finding (``imagekit.verdict.Finding``) carries a stable ``code`` for machines, a
severity (``reject``, ``warn`` or ``info``: the same code may be reported with different
severities, e.g. a refcount mismatch is a ``warn`` when the dirty bit says QEMU rebuilds
refcounts anyway) and a message for people. This table is the one place the codes are
documented: ``imagekit check --list-codes`` prints it, ``docs/finding-codes.md`` is
generated from it, and a test fails when the code emits a code that is not listed here.
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # ---- any image: names, detection, declared format, size, OpenStack's own inspector
    "empty-image": "The file is empty.",
    "json-filename": "The file name starts with 'json:': QEMU would parse it as a block-device specification "
                     "(QEMU CVE-2024-4467 class).",
    "protocol-filename": "The path looks like a QEMU protocol prefix (e.g. 'nbd:'); give it as ./name or an "
                         "absolute path.",
    "polyglot": "The content matches more than one format: different tools would read it differently.",
    "format-mismatch": "The declared format differs from the detected one; declared raw but really qcow2/VMDK/... "
                       "is the format-probing attack (CVE-2015-1850, CVE-2024-40767). A fixed VHD or an ISO "
                       "declared raw only warns.",
    "format-inspector-safety": "oslo.utils' format inspector (what Glance, Nova and Cinder run) refuses the image.",
    "glance-inspector-refuses": "A valid qcow2 feature imagekit verifies fully (extended L2) that Glance's image "
                                "inspector refuses: Glance will not accept the upload.",
    "unsupported-format": "A format imagekit does not accept as input (qcow v1, LUKS, QED, Bochs, Parallels, "
                          "cloop): convert it with qemu-img first.",
    "virtual-size-too-large": "The virtual size is above the limit given (--max-virtual-size).",
    "too-many-findings": "More findings of one code than are listed (the count is in the message).",
    # ---- qcow2: header and limits
    "not-qcow2": "The file does not start with the qcow2 magic.",
    "header-truncated": "The file is shorter than a qcow2 header.",
    "qcow-v1": "A legacy qcow (version 1) image, not qcow2.",
    "bad-version": "A qcow2 version other than 2 or 3.",
    "bad-cluster-bits": "cluster_bits outside 9..21 (512 B .. 2 MiB clusters), or below 14 with extended L2.",
    "bad-header-length": "A header length QEMU refuses (v3: at least 104, a multiple of 8, within cluster 0).",
    "bad-refcount-order": "refcount_order above 6 (refcounts wider than 64 bits), or not 4 in a v2 image.",
    "bad-crypt-method": "An unknown encryption method.",
    "bad-compression-type": "An unknown compression type, or one that does not match the compression feature bit.",
    "encrypted": "The image is encrypted (AES or LUKS): it cannot be inspected or converted without its key.",
    "dirty": "The dirty bit is set (lazy refcounts): refcounts may be stale; QEMU repairs them on a read-write open.",
    "corrupt-bit": "The corrupt bit is set: QEMU itself found this image's metadata corrupt.",
    "unknown-incompatible-feature": "Incompatible feature bits QEMU does not know: QEMU refuses to open the image.",
    "unknown-compatible-feature": "Compatible feature bits imagekit does not know (harmless to readers).",
    "unknown-autoclear-feature": "Autoclear feature bits imagekit does not know (QEMU clears them on write).",
    "bad-autoclear-feature": "An autoclear bit that contradicts the header (raw external data without a data file).",
    "l1-unaligned": "The L1 table is not cluster aligned.",
    "l1-entry-without-table": "An L1 entry carries flags but no L2 table offset (QEMU: ERROR).",
    "l1-too-large": "The L1 table exceeds QEMU's 32 MiB limit.",
    "l1-too-small": "The L1 table cannot map the whole virtual size.",
    "l1-outside-file": "The L1 table runs past the end of the file.",
    "no-refcount-table": "The image has no refcount table.",
    "refcount-table-unaligned": "The refcount table is not cluster aligned.",
    "refcount-table-too-large": "The refcount table exceeds QEMU's 8 MiB limit.",
    "refcount-table-outside-file": "The refcount table runs past the end of the file.",
    "too-many-clusters": "The file has more host clusters than imagekit checks (memory bound); not checked.",
    "time-limit": "The deep check stopped at its time limit; the image was not fully checked.",
    # ---- qcow2: header extensions, backing and data files
    "backing-file": "The image depends on a backing file that QEMU would open (a host file, CVE-2024-32498).",
    "bad-backing-file-name": "The backing file name is longer than 1023 bytes or lies outside cluster 0.",
    "empty-backing-file-name": "backing_file_offset is set but the name is empty.",
    "backing-format-without-file": "A backing format extension without a backing file.",
    "data-file": "The image names an external data file: QEMU would read guest data from that host file.",
    "bad-extension": "A header extension that is malformed, repeated, or missing where required.",
    "unknown-extension": "A header extension type imagekit does not know (ignored, as QEMU does).",
    "crypto-header-outside-file": "The encryption header extension points past the end of the file.",
    # ---- qcow2: snapshots
    "too-many-snapshots": "More internal snapshots than QEMU's limit of 65536.",
    "snapshot-table-unaligned": "The snapshot table is not cluster aligned.",
    "snapshot-table-too-large": "The snapshot table exceeds QEMU's 64 MiB limit.",
    "snapshot-table-outside-file": "The snapshot table runs past the end of the file.",
    "bad-snapshot": "A snapshot entry QEMU refuses (sizes, extra data, duplicate IDs).",
    "snapshot-l1-unaligned": "A snapshot's L1 table is not cluster aligned.",
    "snapshot-l1-too-large": "A snapshot's L1 table exceeds 32 MiB.",
    "snapshot-l1-outside-file": "A snapshot's L1 table runs past the end of the file.",
    # ---- qcow2: the deep walk (L1/L2 tables, refcounts, bitmaps)
    "l2-outside-file": "An L2 table runs past the end of the file.",
    "l2-unaligned": "An L2 table is not cluster aligned.",
    "data-outside-file": "Data clusters L2 entries point to lie past the end of the file.",
    "data-unaligned": "An L2 entry's data cluster offset is not cluster aligned.",
    "compressed-outside-file": "A compressed cluster's data runs past the end of the file.",
    "compressed-with-data-file": "A compressed cluster in an image with an external data file (QEMU refuses it).",
    "copied-on-compressed": "A compressed L2 entry has the COPIED flag (never valid).",
    "bad-subcluster-bitmap": "An extended L2 entry's subcluster bitmap is invalid (allocated and zero bits both set, "
                             "or bits on an unallocated or compressed cluster).",
    "refcount-block-unaligned": "A refcount block is not cluster aligned.",
    "refcount-block-outside-file": "A refcount block runs past the end of the file.",
    "reserved-bits": "Reserved bits are set in L1, L2, refcount or bitmap table entries.",
    "cluster-overlap": "Two structures (metadata or data) share a host cluster that is not shared legitimately.",
    "refcount-mismatch": "A stored refcount is lower than the cluster's references (QEMU: ERROR); a warning when "
                         "the dirty bit says QEMU rebuilds refcounts.",
    "leaked-clusters": "Clusters whose stored refcount is higher than their references (leaked space; "
                       "'qemu-img check -r leaks' frees them).",
    "copied-flag-mismatch": "L1/L2 entries whose COPIED flag does not match refcount == 1 (QEMU: OFLAG_COPIED).",
    "bitmap-directory-unaligned": "The bitmap directory is not cluster aligned.",
    "bitmap-directory-outside-file": "The bitmap directory runs past the end of the file.",
    "bitmap-table-unaligned": "A bitmap table is not cluster aligned.",
    "bitmap-table-outside-file": "A bitmap table runs past the end of the file.",
    "bitmap-data-outside-file": "Bitmap data clusters lie past the end of the file.",
    "bad-bitmap": "A bitmap directory entry QEMU refuses (sizes, names, granularity, flags).",
    "bitmap-in-use": "A persistent bitmap is marked in use (inconsistent after a crash).",
    "bitmaps-inconsistent": "The bitmaps extension is present but its autoclear bit is clear: QEMU ignores the bitmaps.",
    "bitmaps-bit-without-extension": "The bitmaps autoclear bit is set but there is no bitmaps extension.",
    # ---- raw disks: partition tables
    "mbr-bad-entry": "An MBR partition entry with an invalid boot flag.",
    "mbr-partition-outside-disk": "An MBR partition ends beyond the end of the disk.",
    "gpt-missing": "A protective MBR but no GPT header at LBA 1.",
    "gpt-no-protective-mbr": "A GPT disk without a protective (0xEE) MBR entry.",
    "gpt-bad-header": "The GPT header or its partition array geometry is invalid.",
    "gpt-bad-header-crc": "The primary GPT header's CRC32 does not match (corrupt or tampered).",
    "gpt-bad-array-crc": "The GPT partition array's CRC32 does not match (corrupt or tampered).",
    "gpt-truncated": "The GPT partition array lies beyond the end of the file.",
    "gpt-partition-outside-disk": "A GPT partition lies outside the disk's usable area.",
    "gpt-partition-overlap": "Two GPT partitions overlap.",
    "gpt-backup-missing": "The backup GPT header is beyond the end of the disk.",
    "gpt-backup-invalid": "The backup GPT header is missing or has a bad CRC32.",
    # ---- ISO 9660
    "iso-truncated": "The file is too short for an ISO 9660 volume descriptor.",
    "iso-not-iso9660": "No ISO 9660 primary volume descriptor (UDF-only images are not supported).",
    "iso-bad-descriptors": "The volume descriptor set is malformed or too long.",
    "iso-bad-boot-catalog": "The El Torito boot catalog is malformed or beyond the end of the file.",
    # ---- VHD (vpc)
    "vhd-truncated": "The file is smaller than a VHD footer.",
    "vhd-no-footer": "No 'conectix' footer at offset 0 or in the last 512 bytes.",
    "vhd-no-footer-copy": "A dynamic VHD without the footer copy at offset 0.",
    "vhd-footer-mismatch": "The footer copies at the start and end of the file differ.",
    "vhd-version": "An unexpected VHD version.",
    "vhd-disk-type": "An unknown VHD disk type (differencing disks depend on a parent).",
    "vhd-too-large": "The declared size exceeds the VHD limit.",
    "vhd-saved-state": "The disk is marked as being in a saved state.",
    "vhd-header-outside-file": "The dynamic disk header is beyond the end of the file.",
    "vhd-bad-dynamic-header": "The dynamic disk header lacks the 'cxsparse' cookie.",
    "vhd-bad-checksum": "A VHD footer or dynamic header has a bad checksum.",
    "vhd-bad-block-size": "The block size is not a power of two in 512 B .. 256 MiB.",
    "vhd-bat-too-small": "The block allocation table does not cover the disk.",
    "vhd-bat-outside-file": "The block allocation table extends beyond the end of the file.",
    "vhd-bat-not-checked": "The block allocation table is too large to check.",
    "vhd-block-outside-file": "Allocated blocks point beyond the end of the file.",
    # ---- VHDX
    "vhdx-bad-signature": "Missing the 'vhdxfile' identifier at offset 0.",
    "vhdx-bad-header": "A header lacks its 'head' signature.",
    "vhdx-bad-header-crc": "A header has a bad CRC32C (corrupt or tampered).",
    "vhdx-no-valid-header": "Neither VHDX header is valid: the file cannot be opened safely.",
    "vhdx-version": "An unsupported VHDX version.",
    "vhdx-log-replay-needed": "The VHDX log must be replayed before use (opening it would write to the image).",
    "vhdx-bad-region-crc": "A region table is corrupt (bad signature or CRC32C).",
    "vhdx-bad-region-table": "The region table lacks the BAT or metadata region, or is malformed.",
    "vhdx-unknown-region": "An unknown region marked required.",
    "vhdx-region-outside-file": "A region extends beyond the end of the file.",
    "vhdx-bad-metadata": "The metadata table is malformed (signature, entries, sizes, parent locator).",
    "vhdx-bat-too-small": "The BAT region holds fewer entries than the disk needs.",
    "vhdx-bat-not-checked": "The BAT is too large to check.",
    "vhdx-truncated": "A short read on VHDX metadata or the BAT.",
    "vhdx-block-outside-file": "Allocated blocks point beyond the end of the file.",
    # ---- VMDK
    "vmdk-truncated": "The file is smaller than a sparse VMDK header.",
    "vmdk-version": "A VMDK version imagekit does not accept (e.g. VMDK3/COWD).",
    "vmdk-bad-header": "The sparse header is invalid (grain size, table geometry, descriptor location).",
    "vmdk-bad-footer": "The grain directory is 'at end' but there is no valid footer header.",
    "vmdk-corrupt-newlines": "The newline detection bytes are wrong: corrupted by a text-mode transfer.",
    "vmdk-unclean-shutdown": "The image was not closed cleanly.",
    "vmdk-descriptor-file": "A text-only VMDK descriptor: its data lives in other files it names (CVE-2022-47951).",
    "vmdk-descriptor-syntax": "Descriptor lines imagekit does not understand.",
    "vmdk-create-type": "A createType other than the single-file monolithicSparse and streamOptimized.",
    "vmdk-no-extent": "The descriptor lists no extent.",
    "vmdk-external-extent": "A single-file VMDK whose embedded descriptor lists more than one extent.",
    "vmdk-extent-type": "An unknown extent type.",
    "vmdk-flat-extent": "A FLAT/VMFS extent: raw data read from another (host) file (CVE-2022-47951 pattern).",
    "vmdk-extent-name": "The embedded extent name differs from the file name (ignored by QEMU).",
    "vmdk-gd-outside-file": "The grain directory lies outside the file.",
    "vmdk-gt-outside-file": "Grain tables lie outside the file.",
    "vmdk-gt-not-checked": "The grain directory is too large to check every table.",
    "vmdk-grain-outside-file": "Grains point beyond the end of the file.",
    # ---- VDI
    "vdi-bad-header": "The VDI header is missing, truncated or invalid (version, type, sizes).",
    "vdi-bmap-outside-file": "The VDI block map lies outside the file.",
    "vdi-block-outside-file": "VDI blocks point beyond the end of the file.",
    # ---- Windows builds: the offline checks of the installed image (imagekit/windows/offline.py)
    "not-windows": "libguestfs finds no Windows installation in the built image.",
    "wrong-release": "The installed Windows is not the release (version, product) the recipe asks for.",
    "not-generalized": "sysprep did not finish: the image state is not IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE.",
    "cloudbase-init-missing": "The cloudbase-init service or its configuration is missing.",
    "storage-driver-not-boot-start": "The virtio storage driver for the declared disk bus is not a boot-start service "
                                     "(the image would not find its disk).",
    "network-driver-missing": "NetKVM (the virtio network driver) is not in the driver store.",
    "build-password-left": "The build-only password is still in an answer file, Panther log or Winlogon.",
}


def describe(code: str) -> str:
    return CODES.get(code, "(undocumented)")


def markdown() -> str:
    """The docs page (``docs/finding-codes.md``)."""
    lines = ["# Finding codes", "",
             "Every code `imagekit check` (and convert, upload, build) can report. A finding's severity is",
             "`reject` (exit 3, the image is refused), `warn` or `info`; some codes take different severities",
             "in different situations (the message says why). Generated from `imagekit/finding_codes.py`;",
             "`imagekit check --list-codes` prints the same table.", "", "| code | meaning |", "|---|---|"]
    lines += [f"| `{code}` | {text.replace('|', '/')} |" for code, text in CODES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
