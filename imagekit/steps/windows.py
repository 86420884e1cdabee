"""Windows steps: registry, firstboot-powershell, rdp; and the Windows side of hostname, timezone and files.

Windows guests are changed offline like Linux ones, without booting them: the registry
through hivex (``imagekit.windows.hives``: the hive is copied out of the guest, changed,
and copied back), files on the NTFS volume of ``C:`` (guest paths are written ``/Windows/
Temp/x.txt``, matched case-insensitively as Windows does).

* ``registry``: set values (``REG_SZ``, ``REG_EXPAND_SZ``, ``REG_DWORD``, ``REG_QWORD``,
  ``REG_MULTI_SZ``, ``REG_BINARY``), delete values or a whole key, under ``HKLM\\SOFTWARE``,
  ``HKLM\\SYSTEM`` (``CurrentControlSet`` is resolved offline) or ``HKU\\.DEFAULT``; types
  and data are checked when the recipe is validated;
* ``firstboot-powershell``: a PowerShell script that cloudbase-init's LocalScripts plugin
  runs at the first boot in the cloud (the image must have cloudbase-init, configured with a
  ``local_scripts_path``: a Windows build by imagekit is);
* ``rdp``: Remote Desktop on or off (``fDenyTSConnections``, network level authentication,
  and the built-in "Remote Desktop" firewall rules).
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from imagekit.specs import SpecModel, StrictBool
from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import HostPath
from imagekit.windows import hives as H
from imagekit.windows.cbinit import INSTALL_DIR, LOCAL_SCRIPTS

if TYPE_CHECKING:
    from typing import Self

WINDOWS = frozenset({"windows"})
HIVE_PREFIXES = {"hklm\\software": "SOFTWARE", "hkey_local_machine\\software": "SOFTWARE",
                 "hklm\\system": "SYSTEM", "hkey_local_machine\\system": "SYSTEM",
                 "hku\\.default": "DEFAULT", "hkey_users\\.default": "DEFAULT"}
TERMINAL_SERVER = "CurrentControlSet\\Control\\Terminal Server"
FIREWALL_RULES = "CurrentControlSet\\Services\\SharedAccess\\Parameters\\FirewallPolicy\\FirewallRules"
RDP_GROUP = "@FirewallAPI.dll,-28752"
_SCRIPT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def _guest_dir(windows_path: str) -> str:
    """``C:\\Program Files\\X`` as the guest path ``/Program Files/X``."""
    return "/" + windows_path.split(":\\", 1)[-1].replace("\\", "/").strip("/")


CBI_DIR = _guest_dir(INSTALL_DIR)


# ---------------------------------------------------------------- helpers for every Windows effect


def real_path(ctx: StepContext, path: str) -> str:
    """The guest path as it exists: every existing component matched case-insensitively, the
    components that do not exist yet kept as given (so new files land in the existing folders)."""
    g = ctx.g
    real = ""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        folder = real or "/"
        match = None
        if g.is_dir(folder):
            match = next((n for n in g.ls(folder) if n.lower() == part.lower()), None)
        if match is None:
            return "/".join([real, *parts[i:]]) if real else "/" + "/".join(parts[i:])
        real = f"{real}/{match}"
    return real or "/"


@contextlib.contextmanager
def guest_hives(ctx: StepContext) -> Iterator[H.GuestHives]:
    """The guest's hives, writable; changed ones are written back when the block ends without error."""
    systemroot = str(ctx.session.info("windows_systemroot") or "/Windows")
    with H.GuestHives(ctx.g, systemroot, write=True) as hv:
        try:
            yield hv
        except H.HiveError as exc:
            raise StepFailure(exc.message, exc.hint) from exc
        hv.commit()


def set_hostname(ctx: StepContext, name: str) -> StepOutcome:
    """The computer name (NetBIOS, upper case) and the TCP/IP host name, in the SYSTEM hive."""
    short = name.split(".")[0]
    domain = name[len(short) + 1:]
    with guest_hives(ctx) as hv:
        system = hv.hive("SYSTEM")
        for key in ("Control\\ComputerName\\ComputerName", "Control\\ComputerName\\ActiveComputerName"):
            system.set_value(hv.system_path(f"CurrentControlSet\\{key}"), "ComputerName", H.REG_SZ,
                             H.encode(H.REG_SZ, short.upper()))
        tcpip = hv.system_path("CurrentControlSet\\Services\\Tcpip\\Parameters")
        for value in ("Hostname", "NV Hostname"):
            system.set_value(tcpip, value, H.REG_SZ, H.encode(H.REG_SZ, short))
        if domain:
            for value in ("Domain", "NV Domain"):
                system.set_value(tcpip, value, H.REG_SZ, H.encode(H.REG_SZ, domain))
    return StepOutcome(f"computer name {short.upper()}, host name {name} (cloudbase-init sets the instance's "
                       "name at its first boot)")


def _systemtime(data: bytes, offset: int) -> bytes:
    return data[offset:offset + 16]


def set_timezone(ctx: StepContext, zone: str) -> StepOutcome:
    """``TimeZoneInformation`` from the guest's own definition of the zone (SOFTWARE ``Time Zones``)."""
    from imagekit.windows.timezones import UnknownTimezone, windows_name

    try:
        name = windows_name(zone)
    except UnknownTimezone as exc:
        raise StepFailure(str(exc)) from None
    with guest_hives(ctx) as hv:
        zones = "Microsoft\\Windows NT\\CurrentVersion\\Time Zones"
        tz = hv.hive("SOFTWARE").values(f"{zones}\\{name}")
        tzi = next((v for k, v in tz.items() if k.lower() == "tzi"), None)
        if tzi is None or len(tzi.data) < 44:
            raise StepFailure(f"the guest does not define the time zone '{name}' (SOFTWARE\\{zones}\\{name})")
        bias, std_bias, dlt_bias = struct.unpack_from("<iii", tzi.data)
        std_name = tz.get("MUI_Std") or tz.get("Std")
        dlt_name = tz.get("MUI_Dlt") or tz.get("Dlt")
        key = hv.system_path("CurrentControlSet\\Control\\TimeZoneInformation")
        system = hv.hive("SYSTEM")
        for value, type_, data in (
                ("TimeZoneKeyName", H.REG_SZ, H.encode(H.REG_SZ, name)),
                ("Bias", H.REG_DWORD, struct.pack("<i", bias)), ("StandardBias", H.REG_DWORD, struct.pack("<i", std_bias)),
                ("DaylightBias", H.REG_DWORD, struct.pack("<i", dlt_bias)),
                ("StandardStart", H.REG_BINARY, _systemtime(tzi.data, 12)),
                ("DaylightStart", H.REG_BINARY, _systemtime(tzi.data, 28)),
                ("StandardName", H.REG_SZ, H.encode(H.REG_SZ, std_name.text() if std_name else name)),
                ("DaylightName", H.REG_SZ, H.encode(H.REG_SZ, dlt_name.text() if dlt_name else name)),
                ("DynamicDaylightTimeDisabled", H.REG_DWORD, struct.pack("<I", 0))):
            system.set_value(key, value, type_, data)
    return StepOutcome(f"time zone {name}" + (f" ({zone})" if zone != name else ""))


# ---------------------------------------------------------------- registry


class RegistryValue(SpecModel):
    name: str  # "" is the key's default value
    type: Literal["REG_SZ", "REG_EXPAND_SZ", "REG_DWORD", "REG_QWORD", "REG_MULTI_SZ", "REG_BINARY"] = "REG_SZ"
    data: str | int | list[str]

    @model_validator(mode="after")
    def _fits(self) -> Self:
        t, d = self.type, self.data
        if t in ("REG_DWORD", "REG_QWORD"):
            bits = 32 if t == "REG_DWORD" else 64
            if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < 1 << bits:
                raise ValueError(f"{self.name or '(default)'}: {t} data must be an integer from 0 to {(1 << bits) - 1}")
        elif t == "REG_MULTI_SZ":
            if not isinstance(d, list):
                raise ValueError(f"{self.name or '(default)'}: REG_MULTI_SZ data is a list of strings")
        elif t == "REG_BINARY":
            if not isinstance(d, str) or not re.fullmatch(r"([0-9a-fA-F]{2})*", d.replace(" ", "")):
                raise ValueError(f"{self.name or '(default)'}: REG_BINARY data is hexadecimal bytes such as '01ff'")
        elif not isinstance(d, str):
            raise ValueError(f"{self.name or '(default)'}: {t} data is a string (quote numbers)")
        return self

    def encoded(self) -> tuple[int, bytes]:
        t = H.TYPE_NAMES[self.type]
        data = self.data.replace(" ", "") if isinstance(self.data, str) and t == H.REG_BINARY else self.data
        return t, H.encode(t, data)


def split_key(key: str) -> tuple[str, str]:
    """(hive, path inside it) of ``HKLM\\SOFTWARE\\...``; ValueError for another root."""
    norm = key.replace("/", "\\").strip("\\")
    for prefix, hive in HIVE_PREFIXES.items():
        if norm.lower() == prefix or norm.lower().startswith(prefix + "\\"):
            return hive, norm[len(prefix):].strip("\\")
    raise ValueError(f"'{key}' is not under HKLM\\SOFTWARE, HKLM\\SYSTEM or HKU\\.DEFAULT "
                     "(the hives a Windows image holds)")


class RegistryStep(StepBase):
    """registry: set ``values``, delete the values named in ``delete``, or delete the whole ``key``
    (``delete_key: true``), offline with hivex."""

    OS_TYPES = WINDOWS

    op: Literal["registry"]
    key: str
    values: list[RegistryValue] = Field(default_factory=list)
    delete: list[str] = Field(default_factory=list)
    delete_key: StrictBool = False

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        _hive, path = split_key(v)
        if not path:
            raise ValueError(f"'{v}' is the root of a hive: give a key below it")
        if any(not part.strip() for part in path.split("\\")):
            raise ValueError(f"'{v}' has an empty key name")
        return v

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not (self.values or self.delete or self.delete_key):
            raise ValueError("give values to set, value names to delete, or delete_key: true")
        if self.delete_key and (self.values or self.delete):
            raise ValueError("delete_key removes the key: do not also give values or delete")
        return self

    def windows(self, ctx: StepContext) -> StepOutcome:
        hive_name, path = split_key(self.key)
        with guest_hives(ctx) as hv:
            hive = hv.hive(hive_name)
            real = hv.system_path(path) if hive_name == "SYSTEM" else path
            if self.delete_key:
                gone = hive.delete_key(real)
                return StepOutcome(f"{self.key}: {'deleted' if gone else 'not there, nothing to delete'}")
            for v in self.values:
                t, data = v.encoded()
                hive.set_value(real, v.name, t, data)
            missing = [name for name in self.delete if not hive.delete_value(real, name)]
        parts = []
        if self.values:
            parts.append(f"set {', '.join(v.name or '(default)' for v in self.values)}")
        if self.delete:
            parts.append(f"deleted {len(self.delete) - len(missing)} value(s)"
                         + (f" ({', '.join(missing)} not there)" if missing else ""))
        return StepOutcome(f"{self.key}: {'; '.join(parts)}")


# ---------------------------------------------------------------- first-boot PowerShell


def _local_scripts_dir(ctx: StepContext) -> str:
    """cloudbase-init's LocalScripts folder in the guest, as its configuration names it."""
    conf_path = real_path(ctx, f"{CBI_DIR}/conf/cloudbase-init.conf")
    if not ctx.session.is_file(conf_path):
        raise StepFailure("cloudbase-init is not installed in the guest (no cloudbase-init.conf)",
                          "build the image with imagekit's windows method, or install cloudbase-init first")
    conf = ctx.session.read_text(conf_path)
    m = re.search(r"^\s*local_scripts_path\s*=\s*(.+?)\s*$", conf, re.MULTILINE)
    if not m:
        raise StepFailure("cloudbase-init.conf sets no local_scripts_path: its LocalScripts plugin would run nothing",
                          f"set local_scripts_path={LOCAL_SCRIPTS}\\ in build.cloudbase_init.config")
    plugins = re.search(r"^\s*plugins\s*=\s*(.+?)\s*$", conf, re.MULTILINE)
    if plugins and "LocalScriptsPlugin" not in plugins.group(1):
        raise StepFailure("cloudbase-init.conf's plugins do not include LocalScriptsPlugin")
    return _guest_dir(m.group(1))


class FirstbootPowershellStep(StepBase):
    """firstboot-powershell: a PowerShell script (inline ``script`` or a host ``file``) that cloudbase-init
    runs at the instance's first boot (its LocalScripts plugin, in name order: ``name`` sets the order)."""

    OS_TYPES = WINDOWS

    op: Literal["firstboot-powershell"]
    name: str
    script: str | None = None
    file: HostPath | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        stem = v.removesuffix(".ps1")
        if not _SCRIPT_NAME_RE.match(stem):
            raise ValueError(f"'{v}' is not a script name (letters, digits, '.', '_', '-'; e.g. 10-join-domain)")
        return stem + ".ps1"

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.script is None) == (self.file is None):
            raise ValueError("give exactly one of script or file")
        return self

    def windows(self, ctx: StepContext) -> StepOutcome:
        folder = real_path(ctx, _local_scripts_dir(ctx))
        if not ctx.session.is_dir(folder):
            ctx.g.mkdir_p(folder)
        text = self.script if self.script is not None else Path(self.file or "").read_text(encoding="utf-8")
        data = ("\ufeff" + text.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-8")
        dest = f"{folder}/{self.name}"
        ctx.session.write_text(dest, data)
        return StepOutcome(f"wrote {dest} ({len(data)} bytes): cloudbase-init runs it at the first boot")


# ---------------------------------------------------------------- Remote Desktop


def _rule_active(rule: str, active: bool) -> str:
    out = [("Active=TRUE" if active else "Active=FALSE") if f.startswith("Active=") else f for f in rule.split("|")]
    return "|".join(out)


class RdpStep(StepBase):
    """rdp: Remote Desktop on (``enabled: true``, with network level authentication unless ``nla:
    false``) or off, and the built-in Remote Desktop firewall rules with it."""

    OS_TYPES = WINDOWS

    op: Literal["rdp"]
    enabled: StrictBool
    nla: StrictBool = True

    def windows(self, ctx: StepContext) -> StepOutcome:
        with guest_hives(ctx) as hv:
            system = hv.hive("SYSTEM")
            ts = hv.system_path(TERMINAL_SERVER)
            system.set_value(ts, "fDenyTSConnections", H.REG_DWORD, H.encode(H.REG_DWORD, 0 if self.enabled else 1))
            system.set_value(ts + "\\WinStations\\RDP-Tcp", "UserAuthentication", H.REG_DWORD,
                             H.encode(H.REG_DWORD, 1 if self.nla else 0))
            rules_key = hv.system_path(FIREWALL_RULES)
            changed = 0
            for name, value in system.values(rules_key).items():
                text = value.text() if value.type == H.REG_SZ else ""
                if f"EmbedCtxt={RDP_GROUP}|" in text:
                    system.set_value(rules_key, name, H.REG_SZ, H.encode(H.REG_SZ, _rule_active(text, self.enabled)))
                    changed += 1
        state = "on" if self.enabled else "off"
        note = f"{changed} firewall rule(s) {'enabled' if self.enabled else 'disabled'}" if changed else \
            "no Remote Desktop firewall rules in the image"
        return StepOutcome(f"Remote Desktop {state}" + (" (NLA)" if self.enabled and self.nla else "") + f"; {note}")


STEPS: tuple[type[StepBase], ...] = (RegistryStep, FirstbootPowershellStep, RdpStep)

