"""What a Windows guest holds, for ``imagekit inspect --guest``: edition, build, drivers.

Read offline from an open session: the SOFTWARE hive's ``CurrentVersion`` (product,
edition, installation type, build and update revision, display version) and ``Setup\\State``
(the image state: generalized by sysprep or not); the SYSTEM hive's computer name and
boot-start drivers (``Start=0`` kernel drivers: what the disk must be reachable with);
the third-party drivers installed in the driver store (``Windows\\INF\\oem*.inf``, each one a
published copy of a package's ``.inf``: class, provider and version from its
``[Version]`` section, ``%strings%`` resolved). Installed applications come from
libguestfs (``inspect_list_applications2`` reads the Uninstall keys) in the common report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imagekit.windows import hives as H
from imagekit.windows.drivers import decode_inf

if TYPE_CHECKING:
    from imagekit.guest import GuestSession

CURRENT = "Microsoft\\Windows NT\\CurrentVersion"


@dataclass(frozen=True)
class InstalledDriver:
    inf: str  # oemN.inf
    name: str  # the package's catalogue name without .cat (netkvm), else the .inf's
    driver_class: str | None
    provider: str | None
    version: str | None
    date: str | None


@dataclass(frozen=True)
class WindowsInventory:
    product_name: str | None
    edition_id: str | None
    installation_type: str | None
    build: str | None  # CurrentBuild.UBR, e.g. 20348.2849
    display_version: str | None
    image_state: str | None
    computer_name: str | None
    drivers: tuple[InstalledDriver, ...] = ()
    boot_drivers: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inf_version(text: str) -> dict[str, str]:
    """``[Version]`` values of an .inf with its ``%strings%`` resolved (keys lower-case)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        m = re.match(r"^\[([^\]]+)\]$", line)
        if m:
            current = sections.setdefault(m.group(1).strip().lower(), {})
        elif current is not None and "=" in line:
            k, v = line.split("=", 1)
            current[k.strip().lower()] = v.strip().strip('"')
    strings = sections.get("strings", {})

    def resolve(v: str) -> str:
        return re.sub(r"%([^%]+)%", lambda m: strings.get(m.group(1).lower(), m.group(0)), v)

    return {k: resolve(v) for k, v in sections.get("version", {}).items()}


def _text(v: H.RegValue | None) -> str | None:
    return v.text() if v is not None and v.type in (H.REG_SZ, H.REG_EXPAND_SZ) else None


def _drivers(s: GuestSession, systemroot: str) -> tuple[InstalledDriver, ...]:
    try:
        inf_dir = str(s.g.case_sensitive_path(f"{systemroot}/INF"))
    except RuntimeError:
        return ()
    if not s.g.is_dir(inf_dir):
        return ()
    out = []
    for name in sorted(n for n in s.g.ls(inf_dir) if re.fullmatch(r"oem\d+\.inf", n, re.IGNORECASE)):
        data = bytes(s.g.pread(f"{inf_dir}/{name}", 1 << 20, 0))
        ver = inf_version(decode_inf(data))
        cat = ver.get("catalogfile") or ver.get("catalogfile.ntamd64") or ""
        ver_date, _, version = (ver.get("driverver") or "").partition(",")
        out.append(InstalledDriver(name, cat.rsplit(".", 1)[0] or name, ver.get("class"), ver.get("provider"),
                                   version.strip() or None, ver_date.strip() or None))
    return tuple(out)


def _boot_drivers(hv: H.GuestHives) -> tuple[str, ...]:
    system = hv.hive("SYSTEM")
    base = hv.system_path("CurrentControlSet\\Services")
    out = []
    for name in system.subkeys(base):
        vals = {k.lower(): v for k, v in system.values(f"{base}\\{name}").items()}
        start, type_ = vals.get("start"), vals.get("type")
        if start is not None and type_ is not None and start.number() == 0 and type_.number() == 1:
            out.append(name)
    return tuple(sorted(out, key=str.lower))


def inventory(s: GuestSession) -> WindowsInventory:
    """The Windows facts of an open session (a problem reading the registry is reported, not raised)."""
    systemroot = str(s.info("windows_systemroot") or "/Windows")
    try:
        with H.GuestHives(s.g, systemroot) as hv:
            sw = hv.hive("SOFTWARE")
            build = _text(sw.value(CURRENT, "CurrentBuildNumber")) or _text(sw.value(CURRENT, "CurrentBuild"))
            ubr = sw.value(CURRENT, "UBR")
            if build and ubr is not None and ubr.type == H.REG_DWORD:
                build = f"{build}.{ubr.number()}"
            state = _text(sw.value("Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState"))
            name = _text(hv.hive("SYSTEM").value(hv.system_path("CurrentControlSet\\Control\\ComputerName\\"
                                                                "ComputerName"), "ComputerName"))
            return WindowsInventory(
                product_name=_text(sw.value(CURRENT, "ProductName")), edition_id=_text(sw.value(CURRENT, "EditionID")),
                installation_type=_text(sw.value(CURRENT, "InstallationType")), build=build,
                display_version=_text(sw.value(CURRENT, "DisplayVersion")), image_state=state, computer_name=name,
                drivers=_drivers(s, systemroot), boot_drivers=_boot_drivers(hv))
    except (H.HiveError, RuntimeError) as exc:
        msg = getattr(exc, "message", None) or str(exc)
        return WindowsInventory(None, None, None, None, None, None, None, problems=(msg,))
