"""Read files out of an ISO (UDF, Joliet or ISO 9660) or a folder, and write the answer ISO.

Windows install media are UDF (their ISO 9660 part holds only a README); the virtio-win
ISO is ISO 9660 with Joliet and Rock Ridge; users also unpack media into folders. A
:class:`Tree` reads all of them the same way, with case-insensitive paths (Windows media
mix ``NetKVM`` and ``netkvm``). Reading goes through pycdlib; nothing is mounted.

:func:`write_answer_iso` writes the answer ISO with pycdlib: Joliet names as given
(``$WinPEDriver$``, long names; Windows reads Joliet), ISO 9660 names made legal, written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from imagekit.errors import ImagekitError


class MediaError(ImagekitError):
    """Install media, drivers or an MSI are missing, unreadable or not what the recipe says."""

    code = "windows-media"


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int


class Tree:
    """A read-only view of an ISO or a folder. Paths are POSIX-style, relative to the root."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._iso: Any = None
        self._kind = "dir"
        if source.is_file():
            self._open_iso()
        elif not source.is_dir():
            raise MediaError(f"{source} does not exist", "give an ISO file or a folder")

    def _open_iso(self) -> None:
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException

        iso = pycdlib.PyCdlib()
        try:
            iso.open(str(self.source))
        except (PyCdlibException, OSError, ValueError) as exc:
            raise MediaError(f"{self.source} is not a readable ISO image: {exc}",
                             "check the download (its checksum); pycdlib reads UDF, Joliet and ISO 9660 images") from exc
        self._iso = iso
        has_udf = iso.has_udf() and self._iso_children("udf_path", "/")
        self._kind = "udf_path" if has_udf else "joliet_path" if iso.has_joliet() else \
            "rr_path" if iso.has_rock_ridge() else "iso_path"

    def close(self) -> None:
        if self._iso is not None:
            with contextlib.suppress(Exception):  # noqa: BLE001 - closing a read-only handle
                self._iso.close()
            self._iso = None

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ listing

    def _iso_children(self, kind: str, path: str) -> list[Entry]:
        out = []
        for child in self._iso.list_children(**{kind: path}):
            if child is None:  # UDF lists the parent as None
                continue
            if kind != "udf_path" and (child.is_dot() or child.is_dotdot()):
                continue
            if kind == "rr_path":
                raw = child.rock_ridge.name()
            else:
                raw = child.file_identifier()
            codec = {"joliet_path": "utf-16-be", "iso_path": "ascii"}.get(kind, "utf-8")
            name = raw.decode(codec, errors="replace")
            if kind == "iso_path":
                name = name.split(";")[0]
            if not name or name in (".", ".."):
                continue
            is_dir = bool(child.is_dir())
            out.append(Entry(name, is_dir, 0 if is_dir else int(child.get_data_length())))
        return out

    def list(self, path: str = "") -> list[Entry]:
        """The entries of a folder (exact path, as returned by :meth:`find`)."""
        if self._iso is None:
            base = self.source / path
            return [Entry(p.name, p.is_dir(), 0 if p.is_dir() else p.stat().st_size) for p in sorted(base.iterdir())]
        try:
            return self._iso_children(self._kind, "/" + path.strip("/"))
        except Exception as exc:  # noqa: BLE001 - pycdlib raises several types for a missing path
            raise MediaError(f"{self.source}: cannot list {path or '/'}: {exc}") from exc

    def find(self, path: str) -> str | None:
        """The exact path of ``path`` matched case-insensitively, or None."""
        exact = ""
        for part in PurePosixPath(path).parts:
            try:
                entries = self.list(exact)
            except (MediaError, OSError):
                return None
            match = next((e.name for e in entries if e.name.lower() == part.lower()), None)
            if match is None:
                return None
            exact = f"{exact}/{match}" if exact else match
        return exact

    def is_dir(self, path: str) -> bool:
        parent, _, name = path.rpartition("/")
        return any(e.is_dir for e in self.list(parent) if e.name == name)

    def walk(self, path: str) -> Iterator[str]:
        """Every file below a folder, as paths relative to the root."""
        for e in self.list(path):
            sub = f"{path}/{e.name}"
            if e.is_dir:
                yield from self.walk(sub)
            else:
                yield sub

    # ------------------------------------------------------------ reading

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        if self._iso is None:
            with open(self.source / path, "rb") as f:
                yield f
            return
        with self._iso.open_file_from_iso(**{self._kind: "/" + path.strip("/")}) as f:
            yield f

    def read(self, path: str, limit: int = 16 << 20) -> bytes:
        with self.open(path) as f:
            return f.read(limit)

    def copy(self, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open(path) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)


# ---------------------------------------------------------------- the answer ISO


def _iso9660_name(name: str, is_dir: bool, used: set[str]) -> str:
    stem, dot, ext = name.rpartition(".") if not is_dir and "." in name else (name, "", "")
    clean = lambda s, n: (re.sub(r"[^A-Z0-9_]", "_", s.upper()) or "_")[:n]  # noqa: E731
    base = clean(stem, 8)
    ext = clean(ext, 3) if dot else ""
    cand, n = base, 0
    while (cand + ("." + ext if ext else "")) in used:
        n += 1
        cand = f"{base[: 8 - len(str(n)) - 1]}_{n}"
    full = cand + ("." + ext if ext else "")
    used.add(full)
    return full


def write_answer_iso(root: Path, out: Path, volume_id: str = "IMAGEKIT") -> None:
    """An ISO of the folder ``root``: Joliet names as they are, legal ISO 9660 names beside them."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, joliet=3, vol_ident=volume_id)
    used: dict[str, set[str]] = {}
    iso_names: dict[Path, str] = {root: ""}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames.sort()
        parent_iso = iso_names[d]
        for name in dirnames:
            iso_names[d / name] = f"{parent_iso}/{_iso9660_name(name, True, used.setdefault(parent_iso, set()))}"
            joliet = "/" + str((d / name).relative_to(root))
            iso.add_directory(iso_names[d / name], joliet_path=joliet)
        for name in sorted(filenames):
            path = d / name
            iso_path = f"{parent_iso}/{_iso9660_name(name, False, used.setdefault(parent_iso, set()))};1"
            iso.add_file(str(path), iso_path, joliet_path="/" + str(path.relative_to(root)))
    tmp = out.with_name(f".{out.name}.part")
    try:
        iso.write(str(tmp))
        iso.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
