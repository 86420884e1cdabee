"""Partition devices without device-mapper, for diskimage-builder.

diskimage-builder maps the partitions of its loop-attached image with
``kpartx`` (device-mapper) and expects them at ``/dev/mapper/loopNpM``. Kernels
without device-mapper (these build machines, many CI containers) cannot do
that, and do not scan partition tables on loop devices either. imagekit then
puts small stand-ins for ``kpartx`` and ``dmsetup`` first on the build's PATH:
each partition becomes a plain loop device on the *image file* (not on the
whole-disk loop device: loop-on-loop breaks fstrim) at the partition's byte
offset and size, and ``/dev/mapper/loopNpM`` is a symlink to it. The mappings
are recorded in a state directory so that ``kpartx -d``, ``dmsetup remove``
and imagekit's own clean-up can always undo them.

Invoked as ``python -m imagekit.partloop kpartx|dmsetup ARGS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

STATE_ENV = "IMAGEKIT_PARTLOOP_STATE"
MAPPER = Path(os.environ.get("IMAGEKIT_PARTLOOP_MAPPER", "/dev/mapper"))


def _state_dir(override: Path | None = None) -> Path:
    d = override or Path(os.environ.get(STATE_ENV) or "/run/imagekit-partloop")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sh(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def backing_file(dev: str) -> str:
    name = Path(os.path.realpath(dev)).name
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError as exc:
        raise SystemExit(f"partloop: {dev} is not an attached loop device") from exc


def partitions(dev: str) -> list[tuple[int, int, int]]:
    """(number, byte offset, byte size) of each partition in the table on ``dev``."""
    out = _sh(["sfdisk", "-J", dev])
    table = json.loads(out).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    parts = []
    for p in table.get("partitions", []):
        node = p["node"]
        digits = ""
        for ch in reversed(node):
            if not ch.isdigit():
                break
            digits = ch + digits
        parts.append((int(digits), int(p["start"]) * sector, int(p["size"]) * sector))
    return parts


def _record(name: str, data: dict[str, str]) -> None:
    tmp = _state_dir() / f".{name}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _state_dir() / f"{name}.json")


def add(dev: str, verbose: bool) -> None:
    base = Path(os.path.realpath(dev)).name  # loop0
    image = backing_file(dev)
    MAPPER.mkdir(parents=True, exist_ok=True)
    for num, offset, size in partitions(dev):
        name = f"{base}p{num}"
        remove(name, quiet=True)  # -u: replace a stale mapping
        loop = _sh(["losetup", "--show", "-f", "-o", str(offset), "--sizelimit", str(size), image]).strip()
        link = MAPPER / name
        try:
            link.unlink()
        except FileNotFoundError:
            pass
        link.symlink_to(loop)
        _record(name, {"name": name, "loop": loop, "image": image, "parent": dev, "link": str(link)})
        if verbose:
            print(f"add map {name} ({loop}): 0 {size // 512} linear {dev} {offset // 512}")


def remove(name: str, quiet: bool = False, state_dir: Path | None = None) -> bool:
    rec_path = _state_dir(state_dir) / f"{name}.json"
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        if not quiet:
            print(f"partloop: no mapping named {name}", file=sys.stderr)
        return False
    link = Path(rec["link"])
    if link.is_symlink():
        link.unlink()
    subprocess.run(["losetup", "-d", rec["loop"]], capture_output=True, timeout=60)
    rec_path.unlink(missing_ok=True)
    return True


def delete_for(dev: str) -> None:
    base = Path(os.path.realpath(dev)).name
    for rec_path in sorted(_state_dir().glob(f"{base}p*.json")):
        remove(rec_path.stem, quiet=True)


def remove_all(image_prefix: str | None = None, state_dir: Path | None = None) -> list[str]:
    """Undo every recorded mapping (optionally only those on images under ``image_prefix``).

    ``state_dir``: the state directory of another process (a build's work folder), instead of
    ``IMAGEKIT_PARTLOOP_STATE``."""
    if state_dir is not None and not state_dir.is_dir():
        return []
    removed = []
    for rec_path in sorted(_state_dir(state_dir).glob("*.json")):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        if image_prefix and not str(rec.get("image", "")).startswith(image_prefix):
            continue
        if remove(rec_path.stem, quiet=True, state_dir=state_dir):
            removed.append(rec_path.stem)
    return removed


def kpartx(args: list[str]) -> int:
    flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    devs = [a for a in args if not a.startswith("-")]
    if not devs:
        print("partloop kpartx: no device given", file=sys.stderr)
        return 1
    for dev in devs:
        if "d" in flags:
            delete_for(dev)
        elif "a" in flags or "u" in flags:
            add(dev, "v" in flags)
        elif "l" in flags:
            for num, offset, size in partitions(dev):
                print(f"{Path(dev).name}p{num} : 0 {size // 512} {dev} {offset // 512}")
        else:
            print(f"partloop kpartx: unsupported options {args}", file=sys.stderr)
            return 1
    return 0


def dmsetup(args: list[str]) -> int:
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return 0
    cmd, rest = words[0], words[1:]
    if cmd == "mknodes":
        return 0
    if cmd == "remove":
        ok = all(remove(n) for n in rest)
        return 0 if ok else 1
    if cmd in ("ls", "info", "version"):
        return 0
    print(f"partloop dmsetup: '{cmd}' needs device-mapper, which this kernel does not have", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m imagekit.partloop kpartx|dmsetup ARGS", file=sys.stderr)
        return 2
    tool, args = argv[0], argv[1:]
    if tool == "kpartx":
        return kpartx(args)
    if tool == "dmsetup":
        return dmsetup(args)
    print(f"partloop: unknown tool {tool}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
