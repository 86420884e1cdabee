"""Windows registry hives, read and written with hivex, offline.

:class:`Hive` is one hive file on the host opened with hivex's Python binding: keys by
path (``Microsoft\\Windows NT\\CurrentVersion``, case-insensitive as in Windows), typed
values (:class:`RegValue`), setting and deleting values and keys, commit.
:class:`GuestHives` gives the hives of a Windows guest open in libguestfs: each hive
is downloaded once from ``<systemroot>\\System32\\config`` into a private folder, and
the changed ones are uploaded back by :meth:`GuestHives.commit`. ``CurrentControlSet``
does not exist offline: :meth:`GuestHives.system_path` resolves it through ``Select``.

:func:`empty_hive` writes a valid hive with only its root key (hivex cannot create one):
the phony Windows guests of the tests start from it.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit.errors import ImagekitError

REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_MULTI_SZ, REG_QWORD = 1, 2, 3, 4, 7, 11
TYPE_NAMES = {"REG_SZ": REG_SZ, "REG_EXPAND_SZ": REG_EXPAND_SZ, "REG_BINARY": REG_BINARY, "REG_DWORD": REG_DWORD,
              "REG_MULTI_SZ": REG_MULTI_SZ, "REG_QWORD": REG_QWORD}
HIVE_FILES = {"SOFTWARE": "SOFTWARE", "SYSTEM": "SYSTEM", "DEFAULT": "DEFAULT", "SAM": "SAM", "SECURITY": "SECURITY"}


class HiveError(ImagekitError):
    """A registry hive cannot be opened, read or changed."""

    code = "windows-registry"


@dataclass(frozen=True)
class RegValue:
    name: str
    type: int
    data: bytes

    def text(self) -> str:
        """A string value (REG_SZ, REG_EXPAND_SZ) without its terminating NUL."""
        return self.data.decode("utf-16-le", errors="replace").split("\0", 1)[0]

    def number(self) -> int:
        """A REG_DWORD or REG_QWORD."""
        if self.type == REG_QWORD:
            return int(struct.unpack_from("<Q", self.data.ljust(8, b"\0"))[0])
        return int(struct.unpack_from("<I", self.data.ljust(4, b"\0"))[0])

    def strings(self) -> list[str]:
        return [s for s in self.data.decode("utf-16-le", errors="replace").split("\0") if s]

    def display(self) -> str | int | list[str]:
        if self.type in (REG_DWORD, REG_QWORD):
            return self.number()
        if self.type == REG_MULTI_SZ:
            return self.strings()
        if self.type in (REG_SZ, REG_EXPAND_SZ):
            return self.text()
        return self.data.hex()


def encode(type_: int, value: Any) -> bytes:
    """The bytes of a registry value of ``type_`` from a Python value."""
    if type_ in (REG_SZ, REG_EXPAND_SZ):
        return (str(value) + "\0").encode("utf-16-le")
    if type_ == REG_DWORD:
        return struct.pack("<I", int(value))
    if type_ == REG_QWORD:
        return struct.pack("<Q", int(value))
    if type_ == REG_MULTI_SZ:
        items = [value] if isinstance(value, str) else list(value)
        return ("".join(f"{s}\0" for s in items) + "\0").encode("utf-16-le")
    if type_ == REG_BINARY:
        return bytes.fromhex(value) if isinstance(value, str) else bytes(value)
    raise ValueError(f"unsupported registry value type {type_}")


def _parts(path: str) -> list[str]:
    return [p for p in path.replace("/", "\\").split("\\") if p]


class Hive:
    """One hive file, opened with hivex (``write``: changes are kept after :meth:`commit`)."""

    def __init__(self, path: Path, write: bool = False) -> None:
        import hivex

        self.path = path
        self.write = write
        self.changed = False
        try:
            self.h = hivex.Hivex(str(path), write=write)
        except (RuntimeError, OSError) as exc:
            raise HiveError(f"{path.name} is not a readable registry hive: {exc}") from exc

    def key(self, path: str) -> int | None:
        """The node of a key path (case-insensitive), None when it does not exist."""
        node = self.h.root()
        for part in _parts(path):
            child = self.h.node_get_child(node, part)
            if not child:
                return None
            node = child
        return int(node)

    def subkeys(self, path: str) -> list[str]:
        node = self.key(path)
        return [] if node is None else [self.h.node_name(c) for c in self.h.node_children(node)]

    def values(self, path: str) -> dict[str, RegValue]:
        """The values of a key by name (``""`` is the default value); empty when the key is missing."""
        node = self.key(path)
        out: dict[str, RegValue] = {}
        if node is None:
            return out
        for v in self.h.node_values(node):
            name = self.h.value_key(v)
            type_, data = self.h.value_value(v)
            out[name] = RegValue(name, int(type_), bytes(data))
        return out

    def value(self, path: str, name: str) -> RegValue | None:
        vals = self.values(path)
        return next((v for k, v in vals.items() if k.lower() == name.lower()), None)

    def _ensure(self, path: str) -> int:
        node = self.h.root()
        for part in _parts(path):
            child = self.h.node_get_child(node, part)
            node = child if child else self.h.node_add_child(node, part)
        return int(node)

    def set_value(self, path: str, name: str, type_: int, data: bytes) -> None:
        """Set one value, creating the key and its parents as needed."""
        node = self._ensure(path)
        self.h.node_set_value(node, {"key": name, "t": type_, "value": data})
        self.changed = True

    def delete_value(self, path: str, name: str) -> bool:
        """Remove one value; False when it was not there."""
        node = self.key(path)
        if node is None:
            return False
        keep = []
        found = False
        for v in self.h.node_values(node):
            key = self.h.value_key(v)
            if key.lower() == name.lower():
                found = True
                continue
            t, data = self.h.value_value(v)
            keep.append({"key": key, "t": int(t), "value": bytes(data)})
        if found:
            self.h.node_set_values(node, keep)
            self.changed = True
        return found

    def delete_key(self, path: str) -> bool:
        node = self.key(path)
        if node is None or not _parts(path):
            return False
        self.h.node_delete_child(node)
        self.changed = True
        return True

    def commit(self) -> None:
        if self.write and self.changed:
            self.h.commit(None)


# ---------------------------------------------------------------- a guest's hives


class GuestHives:
    """The hives of a mounted Windows guest (libguestfs handle ``g``, ``systemroot`` such as ``/Windows``)."""

    def __init__(self, g: Any, systemroot: str, write: bool = False) -> None:
        self.g = g
        self.systemroot = systemroot
        self.write = write
        self.tmp = Path(tempfile.mkdtemp(prefix="imagekit-hives-"))
        self.open: dict[str, tuple[str, Hive]] = {}

    def guest_path(self, name: str) -> str:
        try:
            return str(self.g.case_sensitive_path(f"{self.systemroot}/System32/config/{HIVE_FILES[name]}"))
        except RuntimeError as exc:
            raise HiveError(f"the guest has no {name} hive: {exc}") from exc

    def hive(self, name: str) -> Hive:
        if name not in HIVE_FILES:
            raise HiveError(f"unknown hive {name}", f"known: {', '.join(HIVE_FILES)}")
        if name not in self.open:
            path = self.guest_path(name)
            if not self.g.is_file(path):
                raise HiveError(f"the guest has no {name} hive ({path})")
            local = self.tmp / name
            self.g.download(path, str(local))
            self.open[name] = (path, Hive(local, write=self.write))
        return self.open[name][1]

    def control_set(self) -> str:
        """``ControlSet00N``: what CurrentControlSet stands for (``Select\\Current``)."""
        current = self.hive("SYSTEM").value("Select", "Current")
        n = current.number() if current is not None else 1
        return f"ControlSet{n:03d}"

    def system_path(self, path: str) -> str:
        """A SYSTEM key path with ``CurrentControlSet`` made real."""
        parts = _parts(path)
        if parts and parts[0].lower() == "currentcontrolset":
            parts[0] = self.control_set()
        return "\\".join(parts)

    def commit(self) -> list[str]:
        """Write the changed hives back into the guest; their names."""
        done = []
        for name, (path, hive) in self.open.items():
            if hive.changed:
                hive.commit()
                self.g.upload(str(hive.path), path)
                done.append(name)
        return done

    def close(self) -> None:
        self.open.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> GuestHives:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- an empty hive


def _cell(body: bytes) -> bytes:
    size = (4 + len(body) + 7) & ~7
    return struct.pack("<i", -size) + body.ljust(size - 4, b"\0")


def empty_hive(path: Path, name: str = "ROOT") -> None:
    """A hive holding only its root key (regf header, one hbin: root nk, its sk, free space)."""
    root_off = 0x20
    sk_off = root_off + ((80 + len(name) + 7) & ~7)  # the root nk cell is 80 bytes + its name, 8-aligned
    sd = struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 0)  # self-relative, no owner, NULL DACL
    nk = struct.pack("<2sHQIIIIIIIIIIHHIIIIHH", b"nk", 0x2C, 0, 0, 0xFFFFFFFF, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0,
                     0xFFFFFFFF, sk_off, 0xFFFFFFFF, 0, 0, 0, 0, 0, 0, len(name), 0) + name.encode("ascii")
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_off, sk_off, 1, len(sd)) + sd
    cells = _cell(nk) + _cell(sk)
    assert 0x20 + len(_cell(nk)) == sk_off
    free = 0x1000 - 0x20 - len(cells)
    hbin = struct.pack("<4sII20s", b"hbin", 0, 0x1000, b"") + cells + struct.pack("<i", free).ljust(free, b"\0")
    header = bytearray(0x1000)
    struct.pack_into("<4sIIQIIIIIII", header, 0, b"regf", 1, 1, 0, 1, 3, 0, 1, root_off, 0x1000, 1)
    csum = 0
    for (word,) in struct.iter_unpack("<I", bytes(header[:0x1FC])):
        csum ^= word
    struct.pack_into("<I", header, 0x1FC, csum)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(bytes(header) + hbin)
    os.replace(tmp, path)
