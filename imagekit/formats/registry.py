"""The disk formats imagekit knows: one :class:`DiskFormat` row each, the only table of them.

A row carries a format's names (imagekit's, qemu-img's ``-f``/``-O``, Glance's ``disk_format``,
oslo.utils' format_inspector, the file suffix, the aliases users may declare), what imagekit can
do with it (accept it as input, or refuse it and say why; write it as a ``convert`` output; have
``qemu-img check`` check it; customise it through libguestfs) and its verifier
(``verify(path, options) -> FormatReport``, imported when first called, so importing the
registry costs nothing). ``check``, ``detect``, ``convert``, ``inspect``, ``glance``, recipe
validation and the CLI's choices read it; nothing else lists formats.

Lookups: :func:`get` (any name or alias; ``UsageError`` with the known names as hint),
:func:`find` (the same, ``None`` when unknown), :func:`by_qemu`, :func:`by_oslo`;
:func:`output_names` / :func:`output_format` / :func:`suffix` for outputs,
:func:`glance_disk_format` / :func:`glance_names` for uploads, :func:`customisable_names`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import cast

from imagekit.errors import UsageError
from imagekit.formats.base import FormatReport, Verifier, VerifyOptions


@dataclass(frozen=True)
class DiskFormat:
    """One disk format."""

    name: str  # imagekit's name: what detect() and check() report
    qemu: str | None  # qemu-img's -f / -O name (None: qemu must not open it)
    glance: str | None  # Glance disk_format it is uploaded as (None: not uploadable)
    oslo: tuple[str, ...]  # oslo format_inspector names that detect it; the first is run for its safety check
    suffix: str | None  # file name suffix of an image of this format
    aliases: tuple[str, ...] = ()  # other names a caller may declare it by
    verifier: str | None = None  # "module:function" of its verifier (None: refused formats)
    refused: str | None = None  # why it is not accepted as input (None: accepted)
    writable: bool = False  # imagekit converts to it (convert -O)
    qemu_checkable: bool = False  # `qemu-img check -f <qemu>` checks it (others answer 63 "no check")
    customisable: bool = False  # customise/guest open it through libguestfs and write it
    oslo_from_detection: bool = False  # its safety check runs the inspector oslo itself detected

    @property
    def accepted(self) -> bool:
        """Accepted as input (checked, converted, uploaded); a refused format is rejected by check()."""
        return self.refused is None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def oslo_name(self) -> str | None:
        """The oslo inspector run for this format's safety check (None: oslo does not know it)."""
        return self.oslo[0] if self.oslo else None

    @property
    def output_name(self) -> str:
        """The name of this format as a convert output and recipe ``output.format``: qemu-img's -O name."""
        return self.qemu or self.name

    def verify(self, path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
        """Run this format's verifier. Raises UsageError for a format imagekit does not verify."""
        if self.verifier is None:
            raise UsageError(f"imagekit does not verify {self.name} images", self.refused)
        module, _, func = self.verifier.partition(":")
        fn = cast(Verifier, getattr(importlib.import_module(module), func))
        return fn(path, options or VerifyOptions())


def _refused(what: str) -> str:
    return f"{what} images are not accepted; convert them first"


# Order matters: output_names() lists writable formats in this order, and by_qemu()/by_oslo()
# return the first row with a name (qcow2 before qcow v1, raw before iso).
FORMATS: tuple[DiskFormat, ...] = (
    DiskFormat("qcow2", "qcow2", "qcow2", ("qcow2",), ".qcow2", verifier="imagekit.formats.qcow2:verify_format",
               writable=True, qemu_checkable=True, customisable=True),
    DiskFormat("raw", "raw", "raw", ("raw", "gpt"), ".raw", aliases=("img", "gpt"),
               verifier="imagekit.formats.gpt:verify", writable=True, customisable=True, oslo_from_detection=True),
    DiskFormat("vmdk", "vmdk", "vmdk", ("vmdk",), ".vmdk", verifier="imagekit.formats.vmdk:verify",
               writable=True, qemu_checkable=True),
    DiskFormat("vhdx", "vhdx", "vhdx", ("vhdx",), ".vhdx", verifier="imagekit.formats.vhdx:verify",
               writable=True, qemu_checkable=True),
    # a fixed VHD has no header at offset 0: oslo sees its payload ("raw" or "gpt")
    DiskFormat("vhd", "vpc", "vhd", ("vhd",), ".vhd", aliases=("vpc",), verifier="imagekit.formats.vhd:verify",
               writable=True, oslo_from_detection=True),
    DiskFormat("vdi", "vdi", "vdi", ("vdi",), ".vdi", verifier="imagekit.formats.vdi:verify", qemu_checkable=True),
    DiskFormat("iso", "raw", "iso", ("iso",), ".iso", verifier="imagekit.formats.iso:verify"),
    # oslo calls qcow version 1 "qcow2" (same magic)
    DiskFormat("qcow", "qcow", None, ("qcow2",), ".qcow",
               refused="qcow version 1 is obsolete and not accepted; convert it to qcow2 with qemu-img first"),
    DiskFormat("luks", "luks", None, ("luks",), ".luks",
               refused="LUKS-encrypted images cannot be checked or used without the key; decrypt/convert them first"),
    DiskFormat("qed", "qed", None, ("qed",), ".qed", qemu_checkable=True,
               refused="QED is deprecated and not accepted; convert it to qcow2 first"),
    DiskFormat("bochs", "bochs", None, (), None, refused=_refused("Bochs")),
    DiskFormat("parallels", "parallels", None, (), ".hdd", qemu_checkable=True, refused=_refused("Parallels")),
    DiskFormat("cloop", "cloop", None, (), None, refused=_refused("cloop")),
)

_BY_NAME: dict[str, DiskFormat] = {n: row for row in FORMATS for n in row.names}


def known_names() -> tuple[str, ...]:
    """Every name and alias :func:`get` accepts, sorted."""
    return tuple(sorted(_BY_NAME))


def find(name: str | None) -> DiskFormat | None:
    """The row of a format name or alias (any case, surrounding blanks ignored); None if unknown."""
    if name is None:
        return None
    return _BY_NAME.get(name.strip().lower())


def get(name: str) -> DiskFormat:
    """The row of a format name or alias (``vpc``, ``img``, ``gpt``...). Raises UsageError if unknown."""
    row = find(name)
    if row is None:
        raise UsageError(f"unknown disk format {name!r}", f"use one of: {', '.join(known_names())}")
    return row


def by_qemu(qemu_name: str) -> DiskFormat | None:
    """The row qemu-img's format name stands for (``vpc`` -> vhd; ``raw`` -> raw, not iso)."""
    return next((row for row in FORMATS if row.qemu == qemu_name), None)


def by_oslo(oslo_name: str) -> DiskFormat | None:
    """The row an oslo format_inspector name stands for (``gpt`` -> raw; ``qcow2`` -> qcow2)."""
    return next((row for row in FORMATS if oslo_name in row.oslo), None)


def qemu_name(name: str) -> str | None:
    """qemu-img's ``-f`` name of a format (None: unknown, or qemu must not open it)."""
    row = find(name)
    return row.qemu if row is not None else None


def output_names() -> tuple[str, ...]:
    """The names convert writes (``-O`` choices, recipe ``output.format``): qemu-img's names."""
    return tuple(row.output_name for row in FORMATS if row.writable)


def output_format(name: str) -> DiskFormat:
    """The row of an output format (any name or alias of a writable format). Raises UsageError otherwise."""
    row = find(name)
    if row is None or not row.writable:
        raise UsageError(f"unknown output format {name!r}", f"use one of: {', '.join(output_names())}")
    return row


def suffix(name: str) -> str:
    """The file suffix of an output format (``vpc`` -> ``.vhd``). Raises UsageError for a non-output."""
    return output_format(name).suffix or f".{name}"


def customisable_names() -> tuple[str, ...]:
    """The qemu-img names of the formats customise/guest open and write (qcow2, raw)."""
    return tuple(row.output_name for row in FORMATS if row.customisable)


def glance_disk_format(name: str) -> str | None:
    """The Glance ``disk_format`` of a format name or alias (None: unknown or not uploadable)."""
    row = find(name)
    return row.glance if row is not None and row.accepted else None


def glance_names() -> tuple[str, ...]:
    """Every Glance ``disk_format`` imagekit uploads, sorted."""
    return tuple(sorted({row.glance for row in FORMATS if row.glance is not None and row.accepted}))


def accepted_names() -> tuple[str, ...]:
    """Every name and alias of the formats accepted as input (what a recipe may declare a base image as)."""
    return tuple(sorted(n for row in FORMATS if row.accepted for n in row.names))
