"""The Windows releases imagekit builds, by OS id (the name of their virtio-win folders).

One row per release: the OS id (``2k22``: ``viostor\\2k22\\amd64`` on the virtio-win
media), libosinfo's short id as libguestfs inspection reports it (``win2k22``), the
recipe ``os.version`` values that select it, whether it is a server, the build numbers
it spans (Windows 10 and 11 share major 10.0 and are told apart by the build), and what
it needs of the virtual hardware (Windows 11: TPM 2.0 and Secure Boot).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowsRelease:
    os_id: str  # virtio-win folder name
    osinfo: str  # libosinfo / libguestfs inspection short id
    name: str
    versions: tuple[str, ...]  # recipe os.version values that mean this release
    server: bool
    min_build: int  # CurrentBuild of the first release
    max_build: int | None = None  # builds from here on are another release (Windows 10 -> 11)
    needs_tpm: bool = False
    needs_secure_boot: bool = False

    @property
    def installation_type(self) -> str:
        """``InstallationType`` in the SOFTWARE hive (``Server``, ``Client``; Server Core says ``Server Core``)."""
        return "Server" if self.server else "Client"

    def has_build(self, build: int) -> bool:
        return build >= self.min_build and (self.max_build is None or build < self.max_build)


RELEASES: tuple[WindowsRelease, ...] = (
    WindowsRelease("2k22", "win2k22", "Windows Server 2022", ("2022",), True, 20348, 26040),
    WindowsRelease("2k19", "win2k19", "Windows Server 2019", ("2019",), True, 17763, 20348),
    WindowsRelease("w11", "win11", "Windows 11", ("11",), False, 22000, None, needs_tpm=True, needs_secure_boot=True),
    WindowsRelease("w10", "win10", "Windows 10", ("10",), False, 10240, 22000),
)
BY_ID = {r.os_id: r for r in RELEASES}
OS_IDS = tuple(BY_ID)


def release(os_id: str) -> WindowsRelease:
    try:
        return BY_ID[os_id]
    except KeyError:
        raise ValueError(f"unknown Windows OS id '{os_id}' (known: {', '.join(OS_IDS)})") from None


def for_version(version: str) -> WindowsRelease | None:
    """The release a recipe's ``os.version`` names (``2022``, ``2019``, ``11``, ``10``), else None."""
    v = str(version).strip().lower().removeprefix("server").strip()
    return next((r for r in RELEASES if v in r.versions), None)
