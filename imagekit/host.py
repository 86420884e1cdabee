"""Facts about the host that change how imagekit works (read, never changed here)."""

from __future__ import annotations

from pathlib import Path


def has_device_mapper(proc_misc: str = "/proc/misc") -> bool:
    """True when the kernel really provides device-mapper (kpartx, dmsetup work).

    ``/dev/mapper/control`` can exist (created by udev rules or packages) while the
    kernel has no device-mapper: the kernel's ``/proc/misc`` list is the truth.
    """
    try:
        text = Path(proc_misc).read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["device-mapper"] for line in text.splitlines())
