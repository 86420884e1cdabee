"""The install media: which editions ``install.wim`` holds, checked with wimlib before anything boots.

Windows Setup installs the image whose ``/IMAGE/NAME`` the answer file names; a name
that is not in the media's ``sources/install.wim`` (or ``install.esd``) stops Setup
with a dialog no one sees. :func:`editions` asks wimlib (``wimlib-imagex info --extract-xml``)
for the images of the media's WIM without copying it (it is 5 GiB): the WIM header,
blob table and XML data are copied into a sparse file of the WIM's size, which is all
wimlib reads to describe the images. :func:`check_edition` then finds the recipe's
edition and compares what the WIM says about it (installation type, build) with the
release the recipe names.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from imagekit import run as runner
from imagekit.errors import ToolFailed
from imagekit.windows.catalog import WindowsRelease
from imagekit.windows.isofs import MediaError, Tree

WIM_MAGIC = b"MSWIM\0\0\0"
HEADER_SIZE = 208
# (offset in the header of a resource header, what it is): blob table, XML data
_RESOURCES = ((48, "blob table"), (72, "XML data"))
WIM_PATHS = ("sources/install.wim", "sources/install.esd")


@dataclass(frozen=True)
class WimImage:
    index: int
    name: str
    description: str
    edition_id: str | None
    installation_type: str | None
    build: int | None
    arch: str | None


def _resource(header: bytes, offset: int) -> tuple[int, int]:
    """(offset in the file, size) of a resource from its 24-byte header (7-byte size, flags, offset, size)."""
    size = int.from_bytes(header[offset:offset + 7], "little")
    (where,) = struct.unpack_from("<Q", header, offset + 8)
    return where, size


def skeleton(tree: Tree, path: str, out: Path) -> None:
    """A sparse copy of the WIM at ``path`` holding only what describes its images."""
    with tree.open(path) as src:
        header = src.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or not header.startswith(WIM_MAGIC):
            raise MediaError(f"{tree.source}: {path} is not a WIM file", "the install media may be damaged")
        src.seek(0, 2)
        total = src.tell()
        with open(out, "wb") as dst:
            dst.truncate(total)
            dst.write(header)
            for off, what in _RESOURCES:
                where, size = _resource(header, off)
                if where + size > total or size > 256 << 20:
                    raise MediaError(f"{tree.source}: {path}: its {what} lies outside the file",
                                     "the install media may be truncated: check its checksum")
                src.seek(where)
                dst.seek(where)
                dst.write(src.read(size))


def _text(el: ET.Element | None, path: str) -> str | None:
    found = el.find(path) if el is not None else None
    return found.text.strip() if found is not None and found.text else None


_ARCH = {"0": "x86", "9": "x86_64", "12": "aarch64"}


def parse_wim_xml(data: bytes) -> list[WimImage]:
    text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8")
    root = ET.fromstring(text)
    out = []
    for img in root.findall("IMAGE"):
        win = img.find("WINDOWS")
        build = _text(win, "VERSION/BUILD")
        out.append(WimImage(
            index=int(img.get("INDEX", "0")), name=_text(img, "NAME") or "", description=_text(img, "DESCRIPTION") or "",
            edition_id=_text(win, "EDITIONID"), installation_type=_text(win, "INSTALLATIONTYPE"),
            build=int(build) if build and build.isdigit() else None, arch=_ARCH.get(_text(win, "ARCH") or "")))
    return out


def editions(tree: Tree, work: Path) -> list[WimImage]:
    """The images of the media's install.wim (or install.esd), as wimlib reads them."""
    wim = next((p for p in (tree.find(c) for c in WIM_PATHS) if p), None)
    if wim is None:
        raise MediaError(f"{tree.source} holds no sources/install.wim or install.esd",
                         "this is not Windows install media (or it is a split .swm set, which is not supported)")
    work.mkdir(parents=True, exist_ok=True)
    skel = work / ("install-skeleton" + Path(wim).suffix)
    xml_out = work / "install-wim.xml"
    try:
        skeleton(tree, wim, skel)
        runner.run(["wimlib-imagex", "info", str(skel), "--extract-xml", str(xml_out)], timeout=120)
        data = xml_out.read_bytes()
    except ToolFailed as exc:
        raise MediaError(f"wimlib cannot read {wim} of {tree.source}: {exc.message}",
                         "the install media may be damaged: check its checksum") from exc
    finally:
        skel.unlink(missing_ok=True)
        xml_out.unlink(missing_ok=True)
    try:
        return parse_wim_xml(data)
    except (ET.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"wimlib's description of {wim} cannot be read: {exc}") from exc


def check_edition(images: list[WimImage], image_name: str, release: WindowsRelease, source: str) -> WimImage:
    """The image named ``image_name``; MediaError naming the available ones when it is not there,
    or when what the WIM says of it contradicts the release."""
    found = next((i for i in images if i.name == image_name), None)
    if found is None:
        names = "\n  ".join(f"{i.index}: {i.name}" for i in images) or "(none)"
        close = [i.name for i in images if i.name.lower() == image_name.lower()]
        raise MediaError(f"the edition '{image_name}' is not in {source}; it holds:\n  {names}",
                         f"did you mean '{close[0]}'? (names are exact)" if close else
                         "set build.image_name to one of these names (/IMAGE/NAME)")
    wrong: list[str] = []
    if found.installation_type and found.installation_type.split()[0] != release.installation_type:
        wrong.append(f"it is a {found.installation_type} edition")
    if found.build is not None and not release.has_build(found.build):
        wrong.append(f"its build is {found.build}")
    if found.arch not in (None, "x86_64"):
        wrong.append(f"it is for {found.arch}")
    if wrong:
        raise MediaError(f"'{image_name}' in {source} is not {release.name} for x86_64: {'; '.join(wrong)}",
                         "check build.os_id / os.version and the install media")
    return found
