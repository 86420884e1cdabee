"""``autounattend.xml``: the answer file Windows Setup reads from the root of the answer ISO.

Three passes:

* ``windowsPE``: the languages of Setup; the driver folders Setup loads before it looks
  for a disk (``DriverPaths``: storage and network for the OS id, on every drive letter
  the answer ISO can get, next to the ``$WinPEDriver$`` folder Setup also scans); the disk
  layout (UEFI: GPT with an EFI system partition, MSR and Windows last so cloudbase-init
  can extend it; BIOS: MBR with a system partition and Windows); the edition by
  ``/IMAGE/NAME``; the EULA and an optional product key;
* ``specialize``: time zone, computer name, no automatic activation;
* ``oobeSystem``: locales, every OOBE page hidden, the built-in Administrator's password
  (random, for the build only; encoded the way Windows' System Image Manager does:
  base64 of UTF-16LE(password + "AdministratorPassword"), which hides it from a casual
  look but is no protection: the file is a secret and is kept only masked), one automatic
  log-on, and the first log-on command that runs the provisioning script from the answer ISO.

:func:`render` returns the XML; :func:`settings` lists (pass, component, setting) of an
answer file, so tests and callers can check one against a table of known names.
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

UNATTEND_NS = "urn:schemas-microsoft-com:unattend"
WCM_NS = "http://schemas.microsoft.com/WMIConfig/2002/State"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
ET.register_namespace("", UNATTEND_NS)
ET.register_namespace("wcm", WCM_NS)
ET.register_namespace("xsi", XSI_NS)

PUBLIC_KEY_TOKEN = "31bf3856ad364e35"
DRIVE_LETTERS = "DEFGH"  # where the answer ISO can be in Windows PE (X: is PE itself, C: the target)
ADMIN_SUFFIX = "AdministratorPassword"
AUTOLOGON_SUFFIX = "Password"


@dataclass(frozen=True)
class UnattendOptions:
    """What the answer file says. ``driver_folders`` are folders of the answer ISO (``drivers\\viostor``)."""

    image_name: str
    firmware: Literal["uefi", "bios"]
    language: str
    timezone: str  # a Windows time zone name
    admin_password: str
    provision_command: str
    driver_folders: tuple[str, ...] = ()
    product_key: str | None = None
    computer_name: str = "*"
    organization: str = "imagekit"
    arch: str = "amd64"


def encode_password(password: str, suffix: str) -> str:
    """The ``PlainText=false`` form of a password in an answer file."""
    return base64.b64encode((password + suffix).encode("utf-16-le")).decode("ascii")


def password_forms(password: str) -> tuple[str, ...]:
    """Every form of the build password an answer file or a leftover can hold (to mask or to look for)."""
    return (password, encode_password(password, ADMIN_SUFFIX), encode_password(password, AUTOLOGON_SUFFIX))


# ---------------------------------------------------------------- building blocks


def _q(tag: str) -> str:
    return f"{{{UNATTEND_NS}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, *, add: bool = False,
         key: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, _q(tag))
    if add:
        el.set(f"{{{WCM_NS}}}action", "add")
    if key is not None:
        el.set(f"{{{WCM_NS}}}keyValue", key)
    if text is not None:
        el.text = text
    return el


def _component(settings: ET.Element, name: str, arch: str) -> ET.Element:
    return ET.SubElement(settings, _q("component"), {
        "name": name, "processorArchitecture": arch, "publicKeyToken": PUBLIC_KEY_TOKEN,
        "language": "neutral", "versionScope": "nonSxS"})


def _locales(comp: ET.Element, language: str, setup_ui: bool) -> None:
    if setup_ui:
        _sub(_sub(comp, "SetupUILanguage"), "UILanguage", language)
    for tag in ("InputLocale", "SystemLocale", "UILanguage", "UserLocale"):
        _sub(comp, tag, language)


def _partitions(disk: ET.Element, firmware: str) -> int:
    """Create and format the partitions; returns the PartitionID Windows goes to."""
    create = _sub(disk, "CreatePartitions")
    modify = _sub(disk, "ModifyPartitions")
    if firmware == "uefi":
        layout = [("EFI", "260", None, "FAT32", "System"), ("MSR", "16", None, None, None),
                  ("Primary", None, "C", "NTFS", "Windows")]
    else:
        layout = [("Primary", "500", None, "NTFS", "System Reserved"), ("Primary", None, "C", "NTFS", "Windows")]
    for order, (ptype, size, letter, fmt, label) in enumerate(layout, 1):
        cp = _sub(create, "CreatePartition", add=True)
        _sub(cp, "Order", str(order))
        _sub(cp, "Type", ptype)
        if size is None:
            _sub(cp, "Extend", "true")
        else:
            _sub(cp, "Size", size)
        mp = _sub(modify, "ModifyPartition", add=True)
        _sub(mp, "Order", str(order))
        _sub(mp, "PartitionID", str(order))
        if firmware == "bios" and order == 1:
            _sub(mp, "Active", "true")
        if fmt is not None:
            _sub(mp, "Format", fmt)
        if label is not None:
            _sub(mp, "Label", label)
        if letter is not None:
            _sub(mp, "Letter", letter)
    return len(layout)


def _windows_pe(root: ET.Element, o: UnattendOptions) -> None:
    settings = ET.SubElement(root, _q("settings"), {"pass": "windowsPE"})
    _locales(_component(settings, "Microsoft-Windows-International-Core-WinPE", o.arch), o.language, True)
    if o.driver_folders:
        paths = _sub(_component(settings, "Microsoft-Windows-PnpCustomizationsWinPE", o.arch), "DriverPaths")
        n = 0
        for letter in DRIVE_LETTERS:
            for folder in o.driver_folders:
                n += 1
                pc = _sub(paths, "PathAndCredentials", add=True, key=str(n))
                _sub(pc, "Path", f"{letter}:\\{folder}")
    setup = _component(settings, "Microsoft-Windows-Setup", o.arch)
    dc = _sub(setup, "DiskConfiguration")
    _sub(dc, "WillShowUI", "OnError")
    disk = _sub(dc, "Disk", add=True)
    _sub(disk, "DiskID", "0")
    _sub(disk, "WillWipeDisk", "true")
    windows_partition = _partitions(disk, o.firmware)
    image = _sub(_sub(setup, "ImageInstall"), "OSImage")
    meta = _sub(_sub(image, "InstallFrom"), "MetaData", add=True)
    _sub(meta, "Key", "/IMAGE/NAME")
    _sub(meta, "Value", o.image_name)
    to = _sub(image, "InstallTo")
    _sub(to, "DiskID", "0")
    _sub(to, "PartitionID", str(windows_partition))
    _sub(image, "InstallToAvailablePartition", "false")
    _sub(image, "WillShowUI", "OnError")
    user = _sub(setup, "UserData")
    _sub(user, "AcceptEula", "true")
    _sub(user, "FullName", o.organization)
    _sub(user, "Organization", o.organization)
    if o.product_key:
        pk = _sub(user, "ProductKey")
        _sub(pk, "Key", o.product_key)
        _sub(pk, "WillShowUI", "OnError")


def _specialize(root: ET.Element, o: UnattendOptions) -> None:
    settings = ET.SubElement(root, _q("settings"), {"pass": "specialize"})
    shell = _component(settings, "Microsoft-Windows-Shell-Setup", o.arch)
    _sub(shell, "ComputerName", o.computer_name)
    _sub(shell, "TimeZone", o.timezone)
    _sub(_component(settings, "Microsoft-Windows-Security-SPP-UX", o.arch), "SkipAutoActivation", "true")


def _oobe_system(root: ET.Element, o: UnattendOptions) -> None:
    settings = ET.SubElement(root, _q("settings"), {"pass": "oobeSystem"})
    _locales(_component(settings, "Microsoft-Windows-International-Core", o.arch), o.language, False)
    shell = _component(settings, "Microsoft-Windows-Shell-Setup", o.arch)
    oobe = _sub(shell, "OOBE")
    for tag in ("HideEULAPage", "HideLocalAccountScreen", "HideOEMRegistrationScreen", "HideOnlineAccountScreens",
                "HideWirelessSetupInOOBE"):
        _sub(oobe, tag, "true")
    _sub(oobe, "ProtectYourPC", "3")
    accounts = _sub(shell, "UserAccounts")
    admin = _sub(accounts, "AdministratorPassword")
    _sub(admin, "Value", encode_password(o.admin_password, ADMIN_SUFFIX))
    _sub(admin, "PlainText", "false")
    auto = _sub(shell, "AutoLogon")
    pw = _sub(auto, "Password")
    _sub(pw, "Value", encode_password(o.admin_password, AUTOLOGON_SUFFIX))
    _sub(pw, "PlainText", "false")
    _sub(auto, "Enabled", "true")
    _sub(auto, "LogonCount", "1")
    _sub(auto, "Username", "Administrator")
    cmd = _sub(_sub(shell, "FirstLogonCommands"), "SynchronousCommand", add=True)
    _sub(cmd, "Order", "1")
    _sub(cmd, "CommandLine", o.provision_command)
    _sub(cmd, "Description", "imagekit: provision (drivers, agents, cloudbase-init), then sysprep")
    _sub(cmd, "RequiresUserInput", "false")


def render(o: UnattendOptions) -> bytes:
    """The answer file (UTF-8 XML)."""
    if not o.image_name.strip():
        raise ValueError("the edition (/IMAGE/NAME) is empty")
    if len(o.provision_command) > 1024:
        raise ValueError("a FirstLogonCommands command line is at most 1024 characters")
    root = ET.Element(_q("unattend"))
    _windows_pe(root, o)
    _specialize(root, o)
    _oobe_system(root, o)
    ET.indent(root, space="  ")
    return ('<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


def masked(xml: bytes, password: str) -> bytes:
    """The answer file with every form of the build password replaced by ``****`` (the copy that is kept)."""
    text = xml.decode("utf-8")
    for form in password_forms(password):
        text = text.replace(form, "****")
    return text.encode("utf-8")


# ---------------------------------------------------------------- reading one back


def settings(xml: bytes | str) -> Iterator[tuple[str, str, str]]:
    """(pass, component, top-level setting) of every setting in an answer file."""
    root = ET.fromstring(xml)
    for st in root.findall(_q("settings")):
        for comp in st.findall(_q("component")):
            for child in comp:
                yield st.get("pass", ""), comp.get("name", ""), child.tag.split("}", 1)[-1]


def values(xml: bytes | str, path: Sequence[str]) -> list[str]:
    """Texts of the elements at ``path`` (tag names below ``unattend``, namespace omitted)."""
    root = ET.fromstring(xml)
    return [el.text or "" for el in root.iterfind("/".join(_q(p) for p in path))]
