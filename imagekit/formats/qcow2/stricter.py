"""Where imagekit's qcow2 verdict is stricter than ``qemu-img check``, and why.

``qemu-img check`` answers "are the refcounts consistent with the tables?" for an image QEMU is
willing to open. imagekit answers "is it safe to hand this file to QEMU, Glance and Nova?". Every
finding code that can reject an image ``qemu-img check`` passes (exit 0, or 3 for leaks only) is
listed here with the reason; ``tests/test_qcow2_oracle.py`` fuzzes real images against QEMU and fails
on a reject code missing from this table. The reverse never happens: an image ``qemu-img check``
counts as corrupt (exit 2) or cannot open (exit 1) is always rejected.
"""

from __future__ import annotations

STRICTER_THAN_QEMU: dict[str, str] = {
    "format-inspector-safety": "oslo.utils' format inspector (Glance, Nova, Cinder) refuses the image: it would "
                               "be refused on upload or boot anyway",
    "backing-file": "a backing file makes QEMU open another host file named by the image (CVE-2024-32498); "
                    "qemu-img check does not look at it",
    "data-file": "an external data file puts the guest data in another host file named by the image",
    "corrupt-bit": "QEMU set the corrupt bit itself; qemu-img check does not fail on it, but QEMU refuses to "
                   "open such an image read-write",
    "encrypted": "an encrypted image cannot be inspected or converted without its key",
    "l1-outside-file": "a table past the end of the file: QEMU silently reads zeroes there, a verifier must not",
    "l2-outside-file": "an L2 table past the end of the file: QEMU silently reads zeroes there",
    "data-outside-file": "guest data mapped past the end of the file: QEMU silently reads zeroes there",
    "compressed-outside-file": "a compressed run past the end of the file: QEMU reads zeroes there, and "
                               "decompressing them fails only when the guest reads the cluster",
    "refcount-table-outside-file": "the refcount table runs past the end of the file (QEMU reads zeroes)",
    "refcount-block-outside-file": "a refcount block past the end of the file (QEMU reads zeroes)",
    "snapshot-table-outside-file": "the snapshot table runs past the end of the file",
    "bitmap-directory-outside-file": "the bitmap directory runs past the end of the file",
    "bitmap-table-outside-file": "a bitmap table runs past the end of the file",
    "refcount-mismatch": "refcounts recomputed from what the file holds: a refcount block or table cut off by "
                         "the end of the file counts as stored 0 where QEMU's check reads zeroes and may let "
                         "it pass; a write would then free clusters still in use",
    "reserved-bits": "bits the specification reserves are set in a table entry (for instance bit 0 of an L2 "
                     "entry of a version 2 image, which QEMU reads as 'zero cluster'): QEMU ignores or "
                     "reinterprets them, a writer that sets them is not trusted",
    "bad-bitmap": "a bitmap directory entry with an empty name: the specification forbids it, QEMU 7.2 opens the "
                  "image anyway (every other bad-bitmap case QEMU refuses too)",
    "bad-backing-file-name": "the backing file name overlaps the header or its extensions: QEMU reads it "
                             "anyway, but a name that is also header data is a crafted image",
}
