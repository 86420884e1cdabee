"""qcow2 verifier's types: the public results (:class:`Qcow2Info`, :class:`Qcow2Report`) and the
shared plumbing of the parsing and walking modules: the bounded reader, the findings collector,
the parsed header state (:class:`Hdr`) and small formatting helpers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from imagekit.errors import ImageReadError
from imagekit.formats.base import FormatReport
from imagekit.formats.qcow2.constants import (
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAX_FINDINGS_PER_CODE,
)
from imagekit.verdict import Finding, Findings, verdict_of

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Qcow2Info:
    """What the header, its extensions and the snapshot table say (cheap to get)."""

    version: int
    compat: str
    cluster_bits: int
    cluster_size: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_order: int
    refcount_bits: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    header_length: int
    compression_type: str
    extended_l2: bool
    lazy_refcounts: bool
    dirty: bool
    corrupt: bool
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    extensions: tuple[str, ...]
    feature_names: tuple[str, ...]
    snapshots: tuple[dict[str, Any], ...]
    bitmaps: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extensions"] = list(self.extensions)
        d["feature_names"] = list(self.feature_names)
        d["snapshots"] = [dict(s) for s in self.snapshots]
        return d


@dataclass(frozen=True, kw_only=True)
class Qcow2Report(FormatReport):
    """Result of :func:`verify`: a FormatReport that also carries the parsed header (None if unusable).

    ``stats`` holds the deep walk's counters; ``format_info`` (``to_dict()``) is
    ``{"info", "verdict", "findings", "stats"}``.
    """

    info: Qcow2Info | None = None

    @classmethod
    def build(cls, info: Qcow2Info | None, findings: tuple[Finding, ...], stats: dict[str, int]) -> Qcow2Report:
        return cls(
            findings=findings,
            virtual_size=info.virtual_size if info is not None else None,
            format_info={
                "info": info.to_dict() if info is not None else None,
                "verdict": verdict_of(findings),
                "findings": [f.to_dict() for f in findings],
                "stats": dict(stats),
            },
            compat=info.compat if info is not None else None,
            snapshots=len(info.snapshots) if info is not None else 0,
            stats=stats,
            info=info,
        )


# --------------------------------------------------------------------------- plumbing


class Timeout(Exception):
    """The deep walk ran past its deadline."""


def new_findings() -> Findings:
    """The verifier's collector: shared Findings, capped per code."""
    return Findings(per_code=MAX_FINDINGS_PER_CODE, limit=1 << 30)


class Reader:
    """Bounded ``os.pread`` reads; a short read is reported to the caller, never padded."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd = fd
        self.size = size
        self.path = path

    def upto(self, offset: int, length: int) -> bytes:
        """Read at most ``length`` bytes (fewer at EOF)."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        chunks = []
        while length > 0:
            try:
                b = os.pread(self.fd, min(length, 1 << 26), offset)
            except OSError as e:
                raise ImageReadError(f"cannot read {self.path} at offset {offset}: {e.strerror}") from e
            if not b:
                break
            chunks.append(b)
            offset += len(b)
            length -= len(b)
        return b"".join(chunks)

    def exact(self, offset: int, length: int) -> bytes | None:
        """Read exactly ``length`` bytes, or None if the range runs past EOF."""
        if offset < 0 or offset + length > self.size:
            return None
        b = self.upto(offset, length)
        return b if len(b) == length else None


def hexstr(n: int) -> str:
    return f"0x{n:x}"


def decode(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


@dataclass
class Snap:
    l1_offset: int
    l1_size: int
    sid: str
    name: str


@dataclass
class Hdr:
    """Parsed header state shared by the shallow and the deep passes."""

    file_size: int
    version: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 0
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    extensions: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    feature_table: dict[tuple[int, int], str] = field(default_factory=dict)
    snapshots: list[Snap] = field(default_factory=list)
    snapshot_dicts: list[dict[str, Any]] = field(default_factory=list)
    snapshots_size: int = 0
    snapshots_ok: bool = False
    bitmaps_ext: tuple[int, int, int] | None = None  # nb, dir_size, dir_offset (only if usable)
    nb_bitmaps: int = 0
    crypto_header: tuple[int, int] | None = None
    # table checks that passed (deep pass only walks those)
    l1_ok: bool = False
    reftable_ok: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    def info(self) -> Qcow2Info:
        ct = {0: "zlib", 1: "zstd"}.get(self.compression_type, f"unknown({self.compression_type})")
        return Qcow2Info(
            version=self.version,
            compat="0.10" if self.version == 2 else "1.1",
            cluster_bits=self.cluster_bits,
            cluster_size=self.cluster_size,
            virtual_size=self.size,
            crypt_method=self.crypt_method,
            l1_size=self.l1_size,
            l1_table_offset=self.l1_table_offset,
            refcount_table_offset=self.refcount_table_offset,
            refcount_table_clusters=self.refcount_table_clusters,
            refcount_order=self.refcount_order,
            refcount_bits=1 << self.refcount_order if self.refcount_order < 64 else 0,
            nb_snapshots=self.nb_snapshots,
            snapshots_offset=self.snapshots_offset,
            incompatible_features=self.incompatible,
            compatible_features=self.compatible,
            autoclear_features=self.autoclear,
            header_length=self.header_length,
            compression_type=ct,
            extended_l2=self.extended_l2,
            lazy_refcounts=bool(self.compatible & COMPAT_LAZY_REFCOUNTS),
            dirty=bool(self.incompatible & INCOMPAT_DIRTY),
            corrupt=bool(self.incompatible & INCOMPAT_CORRUPT),
            backing_file=self.backing_file,
            backing_format=self.backing_format,
            data_file=self.data_file,
            extensions=tuple(self.extensions),
            feature_names=tuple(self.feature_names),
            snapshots=tuple(self.snapshot_dicts),
            bitmaps=self.nb_bitmaps,
        )

