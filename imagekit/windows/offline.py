"""Offline checks of a built Windows image (libguestfs, read-only; the registry with hivex).

A Windows build ends when the guest powers itself off after sysprep; what is on the disk
then is checked before the image is accepted, each check a finding with a stable code:

* ``not-windows`` / ``wrong-release``: inspection finds one Windows root, and it is the
  release the recipe names (libosinfo id, Server or Client, build range);
* ``not-generalized``: sysprep finished: the image state (SOFTWARE ``Setup\\State``,
  and ``Windows\\Setup\\State\\State.ini``) is ``IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE``;
* ``cloudbase-init-missing``: its service is registered and its configuration is there;
* ``storage-driver-not-boot-start``: the virtio storage driver of the declared disk bus
  (``viostor`` for virtio, ``vioscsi`` for scsi) is a boot-start service (``Start=0``) with
  its ``.sys``: without it the first boot in the cloud ends in INACCESSIBLE_BOOT_DEVICE;
* ``network-driver-missing``: NetKVM is in the driver store;
* ``build-password-left``: no form of the build password (plain, or as an answer file
  encodes it) in Panther, the answer files, cloudbase-init's files or Winlogon, and no
  unmasked password in any answer file left on the disk.

:func:`check_session` works on an open, mounted session; :func:`check_image` opens one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imagekit.builders.base import BuildError
from imagekit.windows import hives as H
from imagekit.windows.catalog import WindowsRelease
from imagekit.windows.cbinit import INSTALL_DIR

if TYPE_CHECKING:
    from imagekit.accel import AccelChoice
    from imagekit.guest import GuestSession

GENERALIZED = "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
STORAGE_SERVICE = {"virtio": "viostor", "scsi": "vioscsi"}
MASKED = "*SENSITIVE*DATA*DELETED*"
CBI_DIR = "/" + INSTALL_DIR.split(":\\", 1)[1].replace("\\", "/")
ANSWER_PLACES = ("/Windows/Panther", "/Windows/System32/Sysprep", "/Windows/Setup/Scripts", "/unattend.xml",
                 "/autounattend.xml", "/Windows/Temp", CBI_DIR + "/conf")
MAX_SCAN = 16 << 20  # bytes read of one file
MAX_FILES = 5000  # files looked at in all
PIECE = 1 << 20  # bytes per read: libguestfs messages are at most 4 MiB
_PASSWORD_XML = re.compile(rb"<(AdministratorPassword|Password)>\s*<Value>([^<]*)</Value>", re.IGNORECASE)


class OfflineCheckFailed(BuildError):
    """The built image is not what a Windows build must produce; ``findings`` says why."""

    code = "windows-offline-check"

    def __init__(self, message: str, hint: str | None = None, findings: tuple[Finding, ...] = ()) -> None:
        super().__init__(message, hint)
        self.findings = findings

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["findings"] = [{"code": f.code, "message": f.message} for f in self.findings]
        return d


@dataclass(frozen=True)
class Expectation:
    release: WindowsRelease
    disk_bus: str
    secrets: tuple[str, ...] = ()  # the build password in every form it can take


@dataclass(frozen=True)
class Finding:
    code: str
    message: str


@dataclass(frozen=True)
class OfflineReport:
    product: str | None
    osinfo: str | None
    build: int | None
    edition: str | None
    image_state: str | None
    findings: tuple[Finding, ...]
    passed: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.findings


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def _release(s: GuestSession, sw: H.Hive, exp: Expectation, out: list[Finding]) -> tuple[int | None, str | None]:
    cv = "Microsoft\\Windows NT\\CurrentVersion"
    build_v = sw.value(cv, "CurrentBuildNumber") or sw.value(cv, "CurrentBuild")
    build = _int(build_v.text()) if build_v else None
    edition_v = sw.value(cv, "EditionID")
    osinfo = s.info("osinfo")
    variant = s.info("product_variant")
    want = exp.release
    problems = []
    if osinfo != want.osinfo:
        problems.append(f"inspection says {osinfo or 'unknown'}")
    if variant and variant.split()[0] != want.installation_type:
        problems.append(f"it is a {variant} installation")
    if build is None or not want.has_build(build):
        problems.append(f"its build is {build if build is not None else 'unknown'}")
    if problems:
        out.append(Finding("wrong-release", f"the image is not {want.name} ({want.osinfo}): {'; '.join(problems)}"))
    return build, edition_v.text() if edition_v else None


def _state(s: GuestSession, sw: H.Hive, out: list[Finding]) -> str | None:
    v = sw.value("Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState")
    state = v.text() if v else None
    raw = _read(s, "/Windows/Setup/State/State.ini")
    ini = raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin-1", errors="replace")
    m = re.search(r"ImageState\s*=\s*(\S+)", ini)
    ini_state = m.group(1) if m else None
    if state != GENERALIZED or (ini_state is not None and ini_state != GENERALIZED):
        out.append(Finding("not-generalized", f"sysprep did not finish: the image state is {state or 'unset'}"
                           + (f" (State.ini: {ini_state})" if ini_state and ini_state != state else "")
                           + f", not {GENERALIZED}"))
    return state


def _path(s: GuestSession, path: str) -> str | None:
    """The real (case-sensitive) path of a Windows path in the guest, or None when it does not exist."""
    try:
        real = str(s.g.case_sensitive_path(path))
    except RuntimeError:
        return None
    return real if s.g.exists(real) else None


def _read(s: GuestSession, path: str) -> bytes:
    """The first MAX_SCAN bytes of a guest file (b"" when it is not a file), read in pieces small
    enough for libguestfs' protocol."""
    real = _path(s, path)
    if real is None or not s.g.is_file(real):
        return b""
    size = min(int(s.g.filesize(real)), MAX_SCAN)
    out = bytearray()
    while len(out) < size:
        piece = bytes(s.g.pread(real, min(PIECE, size - len(out)), len(out)))
        if not piece:
            break
        out += piece
    return bytes(out)


def _cloudbase(s: GuestSession, hv: H.GuestHives, out: list[Finding]) -> None:
    svc = hv.hive("SYSTEM").values(hv.system_path("CurrentControlSet\\Services\\cloudbase-init"))
    conf = _path(s, CBI_DIR + "/conf/cloudbase-init.conf")
    if not svc or "imagepath" not in {k.lower() for k in svc}:
        out.append(Finding("cloudbase-init-missing", "the cloudbase-init service is not registered"))
    elif conf is None:
        out.append(Finding("cloudbase-init-missing", f"cloudbase-init's configuration ({CBI_DIR}/conf/"
                           "cloudbase-init.conf) is missing"))


def _storage(s: GuestSession, hv: H.GuestHives, bus: str, out: list[Finding]) -> None:
    name = STORAGE_SERVICE.get(bus)
    if name is None:
        return  # SATA and IDE disks boot with Windows' own drivers
    svc = hv.hive("SYSTEM").values(hv.system_path(f"CurrentControlSet\\Services\\{name}"))
    start = next((v.number() for k, v in svc.items() if k.lower() == "start"), None)
    sys_file = _path(s, f"/Windows/System32/drivers/{name}.sys")
    if start != 0 or sys_file is None:
        why = "its service is missing" if not svc else f"its service starts with Start={start}, not 0 (boot)" \
            if start != 0 else f"/Windows/System32/drivers/{name}.sys is missing"
        out.append(Finding("storage-driver-not-boot-start",
                           f"the {name} driver for hw_disk_bus={bus} is not a boot-start driver: {why}"))


def _driver_store(s: GuestSession) -> list[str]:
    repo = _path(s, "/Windows/System32/DriverStore/FileRepository")
    return [] if repo is None else [f"{repo}/{n}" for n in s.g.ls(repo)]


def _network(s: GuestSession, out: list[Finding]) -> None:
    folders = [f for f in _driver_store(s) if f.rsplit("/", 1)[1].lower().startswith("netkvm.inf_")]
    if not any(any(n.lower() == "netkvm.sys" for n in s.g.ls(f)) for f in folders):
        out.append(Finding("network-driver-missing", "NetKVM (the virtio network driver) is not in the driver store"))


def _scan_files(s: GuestSession) -> list[str]:
    files: list[str] = []
    for place in ANSWER_PLACES:
        real = _path(s, place)
        if real is None:
            continue
        if s.g.is_file(real):
            files.append(real)
        elif s.g.is_dir(real):
            files += [f"{real}/{p}" for p in s.g.find(real) if s.g.is_file(f"{real}/{p}")]
    return files[:MAX_FILES]


def _secrets(s: GuestSession, hv: H.GuestHives, exp: Expectation, out: list[Finding]) -> None:
    needles = [form.encode(enc) for form in exp.secrets for enc in ("utf-8", "utf-16-le")]
    for path in _scan_files(s):
        data = _read(s, path)
        if any(n in data for n in needles):
            out.append(Finding("build-password-left", f"the build password is in {path}"))
            continue
        if path.lower().endswith(".xml"):
            for m in _PASSWORD_XML.finditer(data):
                if m.group(2).strip() not in (b"", MASKED.encode()):
                    out.append(Finding("build-password-left", f"{path} holds an unmasked {m.group(1).decode()}"))
                    break
    winlogon = hv.hive("SOFTWARE").values("Microsoft\\Windows NT\\CurrentVersion\\Winlogon")
    if any(k.lower() == "defaultpassword" for k in winlogon):
        out.append(Finding("build-password-left", "Winlogon still holds an automatic log-on password (DefaultPassword)"))


def check_session(s: GuestSession, exp: Expectation) -> OfflineReport:
    """Every check on a mounted session of the image (read-only is enough)."""
    out: list[Finding] = []
    if s.os_type != "windows":
        out.append(Finding("not-windows", f"inspection found a {s.os_type} guest, not Windows"))
        return OfflineReport(None, None, None, None, None, tuple(out))
    systemroot = str(s.info("windows_systemroot") or "/Windows")
    with H.GuestHives(s.g, systemroot) as hv:
        sw = hv.hive("SOFTWARE")
        build, edition = _release(s, sw, exp, out)
        state = _state(s, sw, out)
        _cloudbase(s, hv, out)
        _storage(s, hv, exp.disk_bus, out)
        _network(s, out)
        _secrets(s, hv, exp, out)
    failed = {f.code for f in out}
    passed = tuple(c for c in ("wrong-release", "not-generalized", "cloudbase-init-missing",
                               "storage-driver-not-boot-start", "network-driver-missing", "build-password-left")
                   if c not in failed)
    return OfflineReport(s.info("product_name"), s.info("osinfo"), build, edition, state, tuple(out), passed)


def check_image(path: str, fmt: str, exp: Expectation, accel: AccelChoice | str | None = None) -> OfflineReport:
    """Open ``path`` read-only and check it; GuestError when it holds no (single) OS."""
    from imagekit.guest import GuestError, open_image

    try:
        with open_image(path, readonly=True, fmt=fmt, accel=accel) as s:
            return check_session(s, exp)
    except GuestError as exc:
        if "no operating system" in exc.message:
            return OfflineReport(None, None, None, None, None, (Finding("not-windows", exc.message),))
        raise


def require(report: OfflineReport, image: str) -> None:
    """OfflineCheckFailed listing every finding of a report that has some."""
    if report.ok:
        return
    lines = "\n  ".join(f"{f.code}: {f.message}" for f in report.findings)
    raise OfflineCheckFailed(f"the built image {image} failed {len(report.findings)} offline check(s):\n  {lines}",
                             "the install ran but did not produce a usable image; the serial log and the "
                             "provisioning stages say how far it got", report.findings)
