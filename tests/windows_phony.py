"""A phony Windows Server 2022 disk, built the way libguestfs builds its own test guests.

No Windows media can be downloaded here, so the finished result of a Windows build is
imitated closely enough for libguestfs inspection and for imagekit's offline checks:
a GPT disk with an EFI system partition (FAT, with the Windows boot manager's path),
a Microsoft reserved partition and an NTFS partition holding ``Windows\\System32\\config``
``SOFTWARE`` and ``SYSTEM`` hives written with hivex (product, build, edition, image state
after sysprep, installed applications, services: cloudbase-init, the virtio storage
drivers, NetKVM; the host name, Remote Desktop settings and firewall rule, time zones),
a PE32+ ``cmd.exe`` stub (inspection reads the architecture from it), the driver store
folders of the virtio drivers, cloudbase-init's configuration and a Panther answer file
whose passwords Windows has masked. This is a stand-in for an installed Windows: no
Windows program ever runs on it.

``phony_image()`` builds it once (under the machine-wide build lock) and caches it in
``~/.cache/imagekit-tests/`` by ``PHONY_VERSION``; ``variants()`` makes qcow2 overlays of
it each missing one piece, in one appliance run, and keeps that appliance for checking them.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagekit.guest import GuestSession
from imagekit.windows import hives as H
from imagekit.windows.unattend import ADMIN_SUFFIX, encode_password
from tests.guest_image import build_lock, cache_dir

PHONY_VERSION = "win2k22-phony-v1"
DISK_SIZE = 320 << 20
BUILD_PASSWORD = "Imagekit-phony-Pw1!"
CBI = "Program Files/Cloudbase Solutions/Cloudbase-Init"
NETKVM_STORE = "Windows/System32/DriverStore/FileRepository/netkvm.inf_amd64_1f2e3d4c5b6a7988"
VIOSCSI_STORE = "Windows/System32/DriverStore/FileRepository/vioscsi.inf_amd64_0a1b2c3d4e5f6071"
PRODUCT = "Windows Server 2022 Standard Evaluation"
HOSTNAME = "WIN-PHONY2022"
RDP_RULE = ("v2.31|Action=Allow|Active=FALSE|Dir=In|Protocol=6|LPort=3389|App=%SystemRoot%\\system32\\svchost.exe|"
            "Svc=termservice|Name=@FirewallAPI.dll,-28775|Desc=@FirewallAPI.dll,-28756|EmbedCtxt=@FirewallAPI.dll,-28752|")
# W. Europe Standard Time: bias -60, DST from the last Sunday of March 02:00 to the last Sunday of October 03:00
WEST_TZI = struct.pack("<iii8H8H", -60, 0, -60, 0, 10, 0, 5, 3, 0, 0, 0, 0, 3, 0, 5, 2, 0, 0, 0)
UTC_TZI = struct.pack("<iii8H8H", 0, 0, -60, *([0] * 16))

S, D, Q, M, B, E = H.REG_SZ, H.REG_DWORD, H.REG_QWORD, H.REG_MULTI_SZ, H.REG_BINARY, H.REG_EXPAND_SZ
Values = dict[str, dict[str, tuple[int, Any]]]

SOFTWARE: Values = {
    "Microsoft\\Windows NT\\CurrentVersion": {
        "ProductName": (S, PRODUCT), "CurrentMajorVersionNumber": (D, 10), "CurrentMinorVersionNumber": (D, 0),
        "CurrentVersion": (S, "6.3"), "CurrentBuild": (S, "20348"), "CurrentBuildNumber": (S, "20348"),
        "UBR": (D, 2849), "EditionID": (S, "ServerStandardEval"), "InstallationType": (S, "Server"),
        "DisplayVersion": (S, "21H2"), "RegisteredOwner": (S, "imagekit")},
    "Microsoft\\Windows NT\\CurrentVersion\\Winlogon": {"AutoAdminLogon": (S, "0")},
    "Microsoft\\Windows NT\\CurrentVersion\\Time Zones\\UTC": {
        "Display": (S, "(UTC) Coordinated Universal Time"), "Std": (S, "Coordinated Universal Time"),
        "Dlt": (S, "Coordinated Universal Time"), "MUI_Std": (S, "@tzres.dll,-932"),
        "MUI_Dlt": (S, "@tzres.dll,-931"), "TZI": (B, UTC_TZI)},
    "Microsoft\\Windows NT\\CurrentVersion\\Time Zones\\W. Europe Standard Time": {
        "Display": (S, "(UTC+01:00) Amsterdam, Berlin, Bern, Rome, Stockholm, Vienna"),
        "Std": (S, "W. Europe Standard Time"), "Dlt": (S, "W. Europe Daylight Time"),
        "MUI_Std": (S, "@tzres.dll,-322"), "MUI_Dlt": (S, "@tzres.dll,-321"), "TZI": (B, WEST_TZI)},
    "Microsoft\\Windows\\CurrentVersion\\Setup\\State": {"ImageState": (S, "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE")},
    "Microsoft\\Windows\\CurrentVersion\\Uninstall\\{A8D5D7A8-6F32-4C3C-9D2E-3B1D6C0A9E11}": {
        "DisplayName": (S, "Cloudbase-Init 1.1.6"), "DisplayVersion": (S, "1.1.6.0"),
        "Publisher": (S, "Cloudbase Solutions Srl"), "InstallLocation": (S, "C:\\" + CBI.replace("/", "\\"))},
    "Microsoft\\Windows\\CurrentVersion\\Uninstall\\{7E3B2F1A-0C4D-4B8E-9F6A-5D2C1B0A9F88}": {
        "DisplayName": (S, "QEMU guest agent"), "DisplayVersion": (S, "107.0.1"), "Publisher": (S, "RedHat")},
    "WOW6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall": {},
}
_SVC = "ControlSet001\\Services\\"
SYSTEM: Values = {
    "Select": {"Current": (D, 1), "Default": (D, 1), "LastKnownGood": (D, 1), "Failed": (D, 0)},
    "ControlSet001\\Control\\ComputerName\\ComputerName": {"ComputerName": (S, HOSTNAME)},
    "ControlSet001\\Control\\ComputerName\\ActiveComputerName": {"ComputerName": (S, HOSTNAME)},
    "ControlSet001\\Control\\Terminal Server": {"fDenyTSConnections": (D, 1)},
    "ControlSet001\\Control\\Terminal Server\\WinStations\\RDP-Tcp": {"UserAuthentication": (D, 1)},
    "ControlSet001\\Control\\TimeZoneInformation": {"TimeZoneKeyName": (S, "UTC"), "Bias": (D, 0)},
    _SVC + "Tcpip\\Parameters": {"Hostname": (S, HOSTNAME.lower()), "NV Hostname": (S, HOSTNAME.lower())},
    _SVC + "SharedAccess\\Parameters\\FirewallPolicy\\FirewallRules": {"RemoteDesktop-UserMode-In-TCP": (S, RDP_RULE)},
    _SVC + "cloudbase-init": {
        "ImagePath": (E, '"C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init\\bin\\OpenStackService.exe" '
                         'cloudbase-init "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init\\Python\\Scripts\\'
                         'cloudbase-init.exe" --config-file "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init\\'
                         'conf\\cloudbase-init.conf"'),
        "Start": (D, 3), "Type": (D, 16), "DisplayName": (S, "Cloudbase-Init"), "ObjectName": (S, "LocalSystem")},
    _SVC + "vioscsi": {"ImagePath": (E, "System32\\drivers\\vioscsi.sys"), "Start": (D, 0), "Type": (D, 1),
                       "Group": (S, "SCSI miniport")},
    _SVC + "viostor": {"ImagePath": (E, "System32\\drivers\\viostor.sys"), "Start": (D, 3), "Type": (D, 1)},
    _SVC + "netkvm": {"ImagePath": (E, "System32\\drivers\\netkvm.sys"), "Start": (D, 3), "Type": (D, 1)},
    _SVC + "QEMU-GA": {"ImagePath": (E, '"C:\\Program Files\\Qemu-ga\\qemu-ga.exe" -d'), "Start": (D, 2),
                       "Type": (D, 16)},
}
PANTHER_MASKED = ("<?xml version='1.0' encoding='utf-8'?>\n<unattend xmlns=\"urn:schemas-microsoft-com:unattend\">"
                  "<settings pass=\"oobeSystem\"><component name=\"Microsoft-Windows-Shell-Setup\"><UserAccounts>"
                  "<AdministratorPassword><Value>*SENSITIVE*DATA*DELETED*</Value><PlainText>false</PlainText>"
                  "</AdministratorPassword></UserAccounts></component></settings></unattend>\n")


def pe32plus_stub() -> bytes:
    """A PE32+ (x86-64, console) header with no sections: what inspection reads the architecture from."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", 0x8664, 0, 0, 0, 0, 240, 0x22)
    opt = bytearray(240)
    struct.pack_into("<H", opt, 0, 0x20B)
    struct.pack_into("<Q", opt, 24, 0x140000000)
    struct.pack_into("<II", opt, 32, 0x1000, 0x200)
    struct.pack_into("<HH", opt, 40, 6, 0)
    struct.pack_into("<HH", opt, 48, 6, 0)
    struct.pack_into("<II", opt, 56, 0x1000, 0x200)
    struct.pack_into("<H", opt, 68, 3)
    struct.pack_into("<I", opt, 108, 16)
    return bytes(dos) + coff + bytes(opt)


def write_hive(path: Path, values: Values) -> None:
    H.empty_hive(path)
    hive = H.Hive(path, write=True)
    for key, vals in values.items():
        hive._ensure(key)
        for name, (type_, value) in vals.items():
            hive.set_value(key, name, type_, H.encode(type_, value))
    hive.changed = True
    hive.commit()


FILES: dict[str, bytes] = {
    "Windows/System32/cmd.exe": pe32plus_stub(),
    "Windows/System32/drivers/vioscsi.sys": b"MZ phony vioscsi",
    "Windows/System32/drivers/viostor.sys": b"MZ phony viostor",
    "Windows/System32/drivers/netkvm.sys": b"MZ phony netkvm",
    f"{NETKVM_STORE}/netkvm.inf": b"[Version]\r\nCatalogFile=netkvm.cat\r\nDriverVer=01/01/2024,100.95.104.26200\r\n"
                                  b"Provider=%RedHat%\r\n[SourceDisksFiles]\r\nnetkvm.sys=1\r\n"
                                  b"[Strings]\r\nRedHat=\"Red Hat, Inc.\"\r\n",
    f"{NETKVM_STORE}/netkvm.sys": b"MZ phony netkvm",
    f"{NETKVM_STORE}/netkvm.cat": b"phony catalogue",
    f"{VIOSCSI_STORE}/vioscsi.inf": b"[Version]\r\nCatalogFile=vioscsi.cat\r\nDriverVer=01/01/2024,100.95.104.26200\r\n"
                                    b"Provider=%RedHat%\r\n[SourceDisksFiles]\r\nvioscsi.sys=1\r\n"
                                    b"[Strings]\r\nRedHat=\"Red Hat, Inc.\"\r\n",
    "Windows/INF/oem0.inf": b"[Version]\r\nClass=Net\r\nCatalogFile=netkvm.cat\r\n"
                            b"DriverVer=01/01/2024,100.95.104.26200\r\nProvider=%RedHat%\r\n"
                            b"[Strings]\r\nRedHat=\"Red Hat, Inc.\"\r\n",
    "Windows/INF/oem1.inf": "[Version]\r\nClass=SCSIAdapter\r\nCatalogFile=vioscsi.cat\r\n"
                            "DriverVer=01/01/2024,100.95.104.26200\r\nProvider=%RedHat%\r\n"
                            "[Strings]\r\nRedHat=\"Red Hat, Inc.\"\r\n".encode("utf-16"),
    f"{VIOSCSI_STORE}/vioscsi.sys": b"MZ phony vioscsi",
    f"{VIOSCSI_STORE}/vioscsi.cat": b"phony catalogue",
    f"{CBI}/conf/cloudbase-init.conf": b"[DEFAULT]\r\nusername=Admin\r\nlocal_scripts_path=C:\\Program Files\\"
                                      b"Cloudbase Solutions\\Cloudbase-Init\\LocalScripts\\\r\n",
    f"{CBI}/conf/cloudbase-init-unattend.conf": b"[DEFAULT]\r\nusername=Admin\r\n",
    f"{CBI}/conf/Unattend.xml": b"<unattend xmlns=\"urn:schemas-microsoft-com:unattend\"/>\r\n",
    f"{CBI}/bin/OpenStackService.exe": pe32plus_stub(),
    "Windows/Panther/unattend.xml": PANTHER_MASKED.encode(),
    "Windows/Setup/State/State.ini": b"[State]\r\nImageState=IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE\r\n",
}
DIRS = ("Windows/System32/config", "Windows/Temp", f"{CBI}/LocalScripts", "Users/Default", "ProgramData",
        "Program Files (x86)")


def _guestfs(path: Path, readonly: bool = False, extra: tuple[Path, ...] = ()) -> Any:
    import guestfs  # type: ignore[import-not-found,unused-ignore]

    from imagekit import accel

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    settings = accel.guestfs_env(accel.resolve()).get("LIBGUESTFS_BACKEND_SETTINGS", "")
    g.set_backend_settings([x for x in settings.split(":") if x])
    for p in (path, *extra):
        g.add_drive_opts(str(p), format="qcow2", readonly=readonly)
    g.launch()
    return g


def build(out: Path) -> None:
    """Write the finished phony image to ``out`` (atomically)."""
    from imagekit import run as runner

    partial = out.with_name(out.name + ".partial")
    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial), str(DISK_SIZE)], timeout=60)
    with tempfile.TemporaryDirectory(prefix="imagekit-phony-") as tmp:
        software, system = Path(tmp) / "SOFTWARE", Path(tmp) / "SYSTEM"
        write_hive(software, SOFTWARE)
        write_hive(system, SYSTEM)
        g = _guestfs(partial)
        try:
            g.part_init("/dev/sda", "gpt")
            g.part_add("/dev/sda", "p", 2048, 2048 + 65536 - 1)  # ESP, 32 MiB
            g.part_add("/dev/sda", "p", 67584, 67584 + 32768 - 1)  # MSR, 16 MiB
            g.part_add("/dev/sda", "p", 100352, -2048)  # Windows
            g.part_set_gpt_type("/dev/sda", 1, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
            g.part_set_gpt_type("/dev/sda", 2, "E3C9E316-0B5C-4DB8-817D-F92DF00215AE")
            g.part_set_gpt_type("/dev/sda", 3, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
            g.mkfs("vfat", "/dev/sda1", label="SYSTEM")
            g.mkfs("ntfs", "/dev/sda3", label="Windows")
            g.mount("/dev/sda1", "/")
            g.mkdir_p("/EFI/Microsoft/Boot")
            g.mkdir_p("/EFI/Boot")
            g.write("/EFI/Microsoft/Boot/bootmgfw.efi", pe32plus_stub())
            g.write("/EFI/Boot/bootx64.efi", pe32plus_stub())
            g.umount("/")
            g.mount("/dev/sda3", "/")
            for d in DIRS:
                g.mkdir_p("/" + d)
            for rel, data in FILES.items():
                g.mkdir_p("/" + rel.rsplit("/", 1)[0])
                g.write("/" + rel, data)
            g.upload(str(software), "/Windows/System32/config/SOFTWARE")
            g.upload(str(system), "/Windows/System32/config/SYSTEM")
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
    os.replace(partial, out)


def image_path() -> Path:
    return cache_dir() / f"{PHONY_VERSION}.qcow2"


def phony_image() -> Path:
    """The cached finished phony Windows Server 2022 image, built first if needed."""
    path = image_path()
    if path.is_file():
        return path
    with build_lock():
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            build(path)
    return path


# ---------------------------------------------------------------- variants, each missing one piece


def _set_hive(name: str, key: str, value: str, type_: int, data: Any) -> Callable[[Any], None]:
    def change(g: Any) -> None:
        with H.GuestHives(g, "/Windows", write=True) as hv:
            hv.hive(name).set_value(key, value, type_, H.encode(type_, data))
            hv.commit()
    return change


def _delete_key(name: str, key: str) -> Callable[[Any], None]:
    def change(g: Any) -> None:
        with H.GuestHives(g, "/Windows", write=True) as hv:
            assert hv.hive(name).delete_key(key)
            hv.commit()
    return change


def _write(path: str, data: bytes) -> Callable[[Any], None]:
    return lambda g: g.write(path, data)


VARIANTS: dict[str, Callable[[Any], None]] = {
    "not-generalized": _set_hive("SOFTWARE", "Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState", S,
                                 "IMAGE_STATE_COMPLETE"),
    "no-cloudbase-init": _delete_key("SYSTEM", "ControlSet001\\Services\\cloudbase-init"),
    "storage-not-boot-start": _set_hive("SYSTEM", "ControlSet001\\Services\\vioscsi", "Start", D, 3),
    "no-network-driver": lambda g: g.rm_rf("/" + NETKVM_STORE),
    "password-left": _write("/Windows/Panther/unattend.xml", PANTHER_MASKED.replace(
        "*SENSITIVE*DATA*DELETED*", encode_password(BUILD_PASSWORD, ADMIN_SUFFIX)).encode()),
    "autologon-left": _set_hive("SOFTWARE", "Microsoft\\Windows NT\\CurrentVersion\\Winlogon", "DefaultPassword", S,
                                BUILD_PASSWORD),
}


def variants(base: Path, folder: Path, names: list[str]) -> tuple[Any, dict[str, GuestSession]]:
    """qcow2 overlays of ``base`` in ``folder``, each changed by ``VARIANTS[name]``, all in ONE appliance
    (returned: the libguestfs handle, to close, and a session per overlay, to mount with ``mount_variant``).

    The overlays are not inspected again: they differ from ``base`` only in what the offline checks
    read (hives and files), so their sessions answer inspection questions with ``base``'s answers
    (``facts``), while their filesystems are the overlays' own."""
    from imagekit import run as runner

    paths: dict[str, Path] = {}
    for name in names:
        p = folder / f"{name}.qcow2"
        runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(p)], timeout=60)
        paths[name] = p
    g = _guestfs(paths[names[0]], extra=tuple(paths[n] for n in names[1:]))
    sessions: dict[str, GuestSession] = {}
    try:
        for name, dev in zip(names, g.list_devices(), strict=True):
            g.mount(f"{dev}3", "/")
            VARIANTS[name](g)
            g.umount_all()
            s = _Overlay(str(paths[name]), "qcow2", True, False, _choice())
            s.g, s.root = g, f"{dev}3"
            sessions[name] = s
    except BaseException:
        g.close()
        raise
    return g, sessions


FACTS = {"type": "windows", "distro": "windows", "osinfo": "win2k22", "product_variant": "Server",
         "product_name": PRODUCT, "windows_systemroot": "/Windows", "arch": "x86_64"}


class _Overlay(GuestSession):
    """A session on an overlay of the phony disk, mounted by device, inspection facts from ``FACTS``."""

    def info(self, key: str) -> Any:
        return FACTS.get(key)


def mount_variant(s: GuestSession) -> GuestSession:
    s.g.umount_all()
    s.g.mount_ro(s.root, "/")
    s.mounts = [("/", s.root)]
    return s


def _choice() -> Any:
    from imagekit.accel import AccelChoice

    return AccelChoice("tcg", "tcg", "test")
