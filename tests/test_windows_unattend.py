"""``autounattend.xml``: well-formed, every element a setting Windows Setup knows in the pass it is in
(a table written from Microsoft's Unattended Windows Setup Reference), the disk layouts for UEFI
and BIOS, drivers, edition, locales, the build password encoded as Windows encodes it and masked
in the kept copy; the time zone table against Unicode CLDR (babel's copy)."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import pytest

from imagekit.windows import provision, timezones, unattend

NS = "{urn:schemas-microsoft-com:unattend}"
WCM = "{http://schemas.microsoft.com/WMIConfig/2002/State}"

# (pass, component) -> element paths below the component that the reference documents
KNOWN: dict[tuple[str, str], set[str]] = {
    ("windowsPE", "Microsoft-Windows-International-Core-WinPE"): {
        "SetupUILanguage", "SetupUILanguage/UILanguage", "InputLocale", "SystemLocale", "UILanguage",
        "UILanguageFallback", "UserLocale"},
    ("windowsPE", "Microsoft-Windows-PnpCustomizationsWinPE"): {
        "DriverPaths", "DriverPaths/PathAndCredentials", "DriverPaths/PathAndCredentials/Path",
        "DriverPaths/PathAndCredentials/Credentials"},
    ("windowsPE", "Microsoft-Windows-Setup"): {
        "DiskConfiguration", "DiskConfiguration/WillShowUI", "DiskConfiguration/Disk",
        "DiskConfiguration/Disk/DiskID", "DiskConfiguration/Disk/WillWipeDisk",
        "DiskConfiguration/Disk/CreatePartitions", "DiskConfiguration/Disk/CreatePartitions/CreatePartition",
        *(f"DiskConfiguration/Disk/CreatePartitions/CreatePartition/{x}" for x in ("Order", "Type", "Size", "Extend")),
        "DiskConfiguration/Disk/ModifyPartitions", "DiskConfiguration/Disk/ModifyPartitions/ModifyPartition",
        *(f"DiskConfiguration/Disk/ModifyPartitions/ModifyPartition/{x}"
          for x in ("Order", "PartitionID", "Active", "Format", "Label", "Letter", "Extend", "TypeID")),
        "ImageInstall", "ImageInstall/OSImage", "ImageInstall/OSImage/InstallFrom",
        "ImageInstall/OSImage/InstallFrom/MetaData", "ImageInstall/OSImage/InstallFrom/MetaData/Key",
        "ImageInstall/OSImage/InstallFrom/MetaData/Value", "ImageInstall/OSImage/InstallTo",
        "ImageInstall/OSImage/InstallTo/DiskID", "ImageInstall/OSImage/InstallTo/PartitionID",
        "ImageInstall/OSImage/InstallToAvailablePartition", "ImageInstall/OSImage/WillShowUI",
        "UserData", "UserData/AcceptEula", "UserData/FullName", "UserData/Organization", "UserData/ProductKey",
        "UserData/ProductKey/Key", "UserData/ProductKey/WillShowUI"},
    ("specialize", "Microsoft-Windows-Shell-Setup"): {"ComputerName", "TimeZone", "RegisteredOwner",
                                                      "RegisteredOrganization", "ProductKey"},
    ("specialize", "Microsoft-Windows-Security-SPP-UX"): {"SkipAutoActivation"},
    ("oobeSystem", "Microsoft-Windows-International-Core"): {
        "InputLocale", "SystemLocale", "UILanguage", "UILanguageFallback", "UserLocale"},
    ("oobeSystem", "Microsoft-Windows-Shell-Setup"): {
        "OOBE", *(f"OOBE/{x}" for x in ("HideEULAPage", "HideLocalAccountScreen", "HideOEMRegistrationScreen",
                                        "HideOnlineAccountScreens", "HideWirelessSetupInOOBE", "ProtectYourPC",
                                        "SkipMachineOOBE", "SkipUserOOBE", "NetworkLocation")),
        "UserAccounts", "UserAccounts/AdministratorPassword", "UserAccounts/AdministratorPassword/Value",
        "UserAccounts/AdministratorPassword/PlainText", "AutoLogon", "AutoLogon/Password", "AutoLogon/Password/Value",
        "AutoLogon/Password/PlainText", "AutoLogon/Enabled", "AutoLogon/LogonCount", "AutoLogon/Username",
        "FirstLogonCommands", "FirstLogonCommands/SynchronousCommand",
        *(f"FirstLogonCommands/SynchronousCommand/{x}" for x in ("Order", "CommandLine", "Description",
                                                                 "RequiresUserInput")),
        "TimeZone", "RegisteredOwner"},
}
# elements of a list that Windows merges by key need wcm:action="add"
LIST_ITEMS = {"Disk", "CreatePartition", "ModifyPartition", "MetaData", "PathAndCredentials", "SynchronousCommand"}
PASSWORD = "S3cret-build-pw!"


def options(**kw: object) -> unattend.UnattendOptions:
    base: dict[str, object] = dict(image_name="Windows Server 2022 SERVERSTANDARD", firmware="uefi", language="de-DE",
                                   timezone="W. Europe Standard Time", admin_password=PASSWORD,
                                   provision_command=provision.provision_command(),
                                   driver_folders=("$WinPEDriver$\\vioscsi", "$WinPEDriver$\\NetKVM"))
    base.update(kw)
    return unattend.UnattendOptions(**base)  # type: ignore[arg-type]


def element_paths(el: ET.Element, prefix: str = "") -> list[str]:
    out = []
    for child in el:
        name = child.tag.removeprefix(NS)
        path = f"{prefix}/{name}" if prefix else name
        out.append(path)
        out += element_paths(child, path)
    return out


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_every_element_is_a_known_setting_of_its_pass(firmware: str) -> None:
    xml = unattend.render(options(firmware=firmware, product_key="VDYBN-27WPP-V4HQT-9VMD4-VMK7H"))
    assert xml.startswith(b'<?xml version="1.0" encoding="utf-8"?>')
    root = ET.fromstring(xml)
    assert root.tag == f"{NS}unattend"
    passes = [s.get("pass") for s in root.findall(f"{NS}settings")]
    assert passes == ["windowsPE", "specialize", "oobeSystem"]
    seen = set()
    for settings in root.findall(f"{NS}settings"):
        for comp in settings.findall(f"{NS}component"):
            key = (settings.get("pass") or "", comp.get("name") or "")
            assert key in KNOWN, f"component {key} is not in the table"
            assert comp.attrib == {"name": key[1], "processorArchitecture": "amd64", "publicKeyToken": "31bf3856ad364e35",
                                   "language": "neutral", "versionScope": "nonSxS"}
            unknown = [p for p in element_paths(comp) if p not in KNOWN[key]]
            assert not unknown, f"{key}: {unknown}"
            seen.add(key)
            for el in comp.iter():
                if el.tag.removeprefix(NS) in LIST_ITEMS:
                    assert el.get(f"{WCM}action") == "add", el.tag
    assert seen == set(KNOWN)
    assert list(unattend.settings(xml))[0] == ("windowsPE", "Microsoft-Windows-International-Core-WinPE",
                                               "SetupUILanguage")


def _partitions(xml: bytes) -> tuple[list[tuple[str, str]], list[dict[str, str]], str]:
    root = ET.fromstring(xml)
    disk = root.find(f".//{NS}DiskConfiguration/{NS}Disk")
    assert disk is not None
    created = [(c.findtext(f"{NS}Type") or "", c.findtext(f"{NS}Size") or c.findtext(f"{NS}Extend") or "")
               for c in disk.iterfind(f"{NS}CreatePartitions/{NS}CreatePartition")]
    modified = [{x.tag.removeprefix(NS): x.text or "" for x in m} for m in disk.iterfind(
        f"{NS}ModifyPartitions/{NS}ModifyPartition")]
    target = root.findtext(f".//{NS}InstallTo/{NS}PartitionID") or ""
    return created, modified, target


def test_uefi_layout_is_gpt_with_esp_msr_and_windows_last() -> None:
    created, modified, target = _partitions(unattend.render(options()))
    assert created == [("EFI", "260"), ("MSR", "16"), ("Primary", "true")]
    assert modified[0]["Format"] == "FAT32" and modified[2]["Format"] == "NTFS" and modified[2]["Letter"] == "C"
    assert "Active" not in modified[0]
    assert target == "3"  # Windows is the last partition: cloudbase-init can extend it to the instance's disk


def test_bios_layout_is_mbr_with_an_active_system_partition() -> None:
    created, modified, target = _partitions(unattend.render(options(firmware="bios")))
    assert created == [("Primary", "500"), ("Primary", "true")]
    assert modified[0]["Active"] == "true" and modified[0]["Format"] == "NTFS"
    assert target == "2"


def test_edition_locale_timezone_drivers_and_first_logon() -> None:
    xml = unattend.render(options())
    v = lambda *p: unattend.values(xml, ["settings", "component", *p])  # noqa: E731
    assert v("ImageInstall", "OSImage", "InstallFrom", "MetaData", "Key") == ["/IMAGE/NAME"]
    assert v("ImageInstall", "OSImage", "InstallFrom", "MetaData", "Value") == ["Windows Server 2022 SERVERSTANDARD"]
    assert set(v("UILanguage")) == {"de-DE"} and set(v("UserLocale")) == {"de-DE"}
    assert v("TimeZone") == ["W. Europe Standard Time"]
    paths = v("DriverPaths", "PathAndCredentials", "Path")
    assert "E:\\$WinPEDriver$\\vioscsi" in paths and "D:\\$WinPEDriver$\\NetKVM" in paths
    assert len(paths) == len(set(paths)) == 2 * len(unattend.DRIVE_LETTERS)
    keys = [el.get(f"{WCM}keyValue") for el in ET.fromstring(xml).iter(f"{NS}PathAndCredentials")]
    assert len(set(keys)) == len(keys)
    cmd = v("FirstLogonCommands", "SynchronousCommand", "CommandLine")
    assert cmd == [provision.provision_command()] and "imagekit\\provision.ps1" in cmd[0] and len(cmd[0]) <= 1024
    assert v("UserData", "ProductKey", "Key") == []  # evaluation media need none


def test_build_password_is_encoded_as_windows_does_and_masked_in_the_kept_copy() -> None:
    xml = unattend.render(options())
    assert PASSWORD.encode() not in xml
    admin = unattend.values(xml, ["settings", "component", "UserAccounts", "AdministratorPassword", "Value"])
    auto = unattend.values(xml, ["settings", "component", "AutoLogon", "Password", "Value"])
    assert base64.b64decode(admin[0]).decode("utf-16-le") == PASSWORD + "AdministratorPassword"
    assert base64.b64decode(auto[0]).decode("utf-16-le") == PASSWORD + "Password"
    assert unattend.values(xml, ["settings", "component", "UserAccounts", "AdministratorPassword",
                                 "PlainText"]) == ["false"]
    kept = unattend.masked(xml, PASSWORD)
    for form in unattend.password_forms(PASSWORD):
        assert form.encode() in xml or form == PASSWORD
        assert form.encode() not in kept
    ET.fromstring(kept)  # still well-formed


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="edition"):
        unattend.render(options(image_name=" "))
    with pytest.raises(ValueError, match="1024"):
        unattend.render(options(provision_command="x" * 1025))


def test_time_zone_table_is_cldr() -> None:
    from babel.core import get_global

    cldr = get_global("windows_zone_mapping")  # Windows name -> IANA (territory 001)
    assert {iana: win for win, iana in cldr.items()} == timezones.IANA_TO_WINDOWS
    assert timezones.windows_name("Europe/Paris") == "Romance Standard Time"
    assert timezones.windows_name("UTC") == timezones.windows_name("Etc/UTC") == "UTC"
    assert timezones.windows_name("Tokyo Standard Time") == "Tokyo Standard Time"
    with pytest.raises(timezones.UnknownTimezone, match="Mars/Olympus"):
        timezones.windows_name("Mars/Olympus")
