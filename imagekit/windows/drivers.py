"""The virtio-win drivers of one Windows release, checked file by file before anything boots.

virtio-win media (the ISO from the Fedora project, or its unpacked folder) hold one folder
per driver and per release: ``viostor\\2k22\\amd64``, ``NetKVM\\w11\\amd64``. For a build
imagekit takes only the folders of the recipe's OS id:

* storage: ``viostor`` (virtio-blk) and ``vioscsi`` (virtio-scsi); the one for the disk bus
  of the build is required, because Windows Setup sees no disk without it;
* network: ``NetKVM`` (required);
* ``vioserial`` (required: the QEMU guest agent talks over virtio-serial), and ``Balloon``,
  ``viorng``, ``pvpanic`` when the media have them;
* the guest agent's installer, ``guest-agent\\qemu-ga-x86_64.msi`` (required).

Every ``.inf`` of a taken folder is read (ASCII, UTF-8 or UTF-16 with a BOM) and every file
it references is checked present: its catalogue (``CatalogFile``, signature of the
package; without it Windows refuses the driver) and its ``SourceDisksFiles`` (``.sys``,
co-installers). Problems are reported all at once, each naming the folder and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imagekit.windows.isofs import MediaError, Tree

ARCH = "amd64"
STORAGE = {"virtio": "viostor", "scsi": "vioscsi"}
NETWORK = "NetKVM"
REQUIRED = ("NetKVM", "vioserial")
OPTIONAL = ("Balloon", "viorng", "pvpanic")
GUEST_AGENT = "guest-agent/qemu-ga-x86_64.msi"
# What Windows Setup needs while it looks for a disk and a network: these go to $WinPEDriver$.
PE_DRIVERS = ("viostor", "vioscsi", "NetKVM")


@dataclass(frozen=True)
class InfRefs:
    """What an .inf says it needs besides itself."""

    catalogs: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class Driver:
    """One driver folder of the media, checked: its files (paths in the media) and its .inf files."""

    name: str
    folder: str  # exact path in the media
    files: tuple[str, ...]
    infs: tuple[str, ...]

    @property
    def for_pe(self) -> bool:
        return self.name in PE_DRIVERS


@dataclass(frozen=True)
class DriverSet:
    os_id: str
    drivers: tuple[Driver, ...]
    guest_agent: str  # path of the MSI in the media

    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.drivers)


def decode_inf(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if len(data) > 1 and data[1:2] == b"\x00":  # UTF-16LE without a BOM
        return data.decode("utf-16-le", errors="replace")
    return data.decode("latin-1")


_SECTION_RE = re.compile(r"^\s*\[([^\]]+)\]\s*$")


def inf_references(text: str, arch: str = ARCH) -> InfRefs:
    """The catalogues and source files an .inf references, for ``arch``."""
    catalogs: list[str] = []
    files: list[str] = []
    section = ""
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        m = _SECTION_RE.match(line)
        if m:
            section = m.group(1).strip().lower()
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip().strip('"'), value.strip().strip('"')
        if section == "version" and eq and key.lower() in ("catalogfile", f"catalogfile.nt{arch}", "catalogfile.nt"):
            if value:
                catalogs.append(value)
        elif section in ("sourcedisksfiles", f"sourcedisksfiles.{arch}") and key and "%" not in key:
            files.append(key)
    return InfRefs(tuple(dict.fromkeys(catalogs)), tuple(dict.fromkeys(files)))


def _check_folder(tree: Tree, name: str, folder: str) -> tuple[Driver | None, list[str]]:
    problems: list[str] = []
    entries = [e for e in tree.list(folder) if not e.is_dir]
    present = {e.name.lower(): f"{folder}/{e.name}" for e in entries}
    infs = [p for low, p in present.items() if low.endswith(".inf")]
    if not infs:
        return None, [f"{folder}: no .inf file"]
    for inf in infs:
        refs = inf_references(decode_inf(tree.read(inf)))
        if not refs.catalogs:
            problems.append(f"{inf}: names no CatalogFile (an unsigned driver: Windows refuses it)")
        for ref in refs.catalogs + refs.files:
            if ref.lower() not in present:
                problems.append(f"{inf} references {ref}, which is missing from {folder}")
    files = tuple(p for low, p in sorted(present.items()) if not low.endswith(".pdb"))
    return Driver(name, folder, files, tuple(sorted(infs))), problems


def _folder(tree: Tree, name: str, os_id: str) -> tuple[str | None, str]:
    """The exact folder of a driver for the release, or None and why."""
    top = tree.find(name)
    if top is None:
        return None, f"{name}: not on the virtio-win media"
    folder = tree.find(f"{top}/{os_id}/{ARCH}")
    if folder is None:
        have = sorted(e.name for e in tree.list(top) if e.is_dir)
        return None, (f"{name}: no {os_id}\\{ARCH} folder (the media have: {', '.join(have) or 'none'}); "
                      "use a virtio-win release that supports this Windows")
    return folder, ""


def select(tree: Tree, os_id: str, bus: str) -> DriverSet:
    """The drivers of ``os_id`` for a disk on ``bus``, every referenced file checked; MediaError lists all problems."""
    problems: list[str] = []
    drivers: list[Driver] = []
    wanted = [(STORAGE[bus], True)] if bus in STORAGE else []
    wanted += [(s, False) for s in STORAGE.values() if s != (STORAGE.get(bus))]
    wanted += [(n, True) for n in REQUIRED] + [(n, False) for n in OPTIONAL]
    for name, required in wanted:
        folder, why = _folder(tree, name, os_id)
        if folder is None:
            if required:
                problems.append(why)
            continue
        driver, bad = _check_folder(tree, name, folder)
        problems.extend(bad)
        if driver is not None:
            drivers.append(driver)
    agent = tree.find(GUEST_AGENT)
    if agent is None:
        problems.append(f"{GUEST_AGENT}: the QEMU guest agent installer is not on the virtio-win media")
    if problems:
        raise MediaError(f"the virtio-win drivers for {os_id} are not usable ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}):\n  " + "\n  ".join(problems),
                         "get a complete virtio-win ISO from the Fedora project "
                         "(https://fedorapeople.org/groups/virt/virtio-win/direct-downloads/stable-virtio/)")
    assert agent is not None
    return DriverSet(os_id, tuple(drivers), agent)


def stage(tree: Tree, drivers: DriverSet, root: Path) -> list[str]:
    """Copy the drivers into the answer ISO's folder: Setup's drivers to ``$WinPEDriver$``, the
    others to ``drivers``; the agent to ``imagekit``. Returns the Windows folders DriverPaths lists."""
    pe_folders: list[str] = []
    for d in drivers.drivers:
        top = "$WinPEDriver$" if d.for_pe else "drivers"
        for f in d.files:
            tree.copy(f, root / top / d.name / f.rsplit("/", 1)[-1])
        if d.name in PE_DRIVERS:
            pe_folders.append(f"{top}\\{d.name}")
    tree.copy(drivers.guest_agent, root / "imagekit" / "qemu-ga-x86_64.msi")
    return pe_folders
