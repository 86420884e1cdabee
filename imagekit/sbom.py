"""What is inside a guest image, and its software bill of materials.

``inspect_guest(path, fmt)`` opens the image read-only in the libguestfs
appliance and reports the operating system (type, distro, version, product
name, architecture, host name), its package format and manager, kernels,
boot loader, whether cloud-init and the QEMU guest agent are installed, and
every installed package (``inspect_list_applications2``). A Windows guest also
gets ``windows``: edition, build, image state, computer name, third-party and
boot-start drivers (``imagekit.windows.inventory``).

``to_cyclonedx(info)`` (CycloneDX 1.5 JSON) and ``to_spdx(info)`` (SPDX 2.3
JSON) turn that report into an SBOM whose components carry package URLs:
``pkg:deb/debian/apt@2.6.1?arch=amd64&distro=debian-12``,
``pkg:rpm/redhat/bash@5.1.8-6.el9?arch=x86_64`` and so on.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import uuid
from typing import Any
from urllib.parse import quote

from imagekit import __version__
from imagekit.accel import AccelChoice
from imagekit.guest import GuestSession, open_image

# libguestfs distro id -> purl namespace (vendor)
_RPM_VENDOR = {
    "rhel": "redhat", "redhat-based": "redhat", "centos": "centos", "fedora": "fedora", "rocky": "rocky",
    "almalinux": "almalinux", "oraclelinux": "oracle", "opensuse": "opensuse", "sles": "suse",
    "scientificlinux": "scientificlinux", "amazonlinux": "amazon", "openeuler": "openeuler",
}
_PURL_TYPE = {"deb": "deb", "rpm": "rpm", "apk": "apk", "pacman": "alpm"}
_KERNEL_PKG = re.compile(r"^(linux-image-\d.*|kernel|kernel-core|kernel-default|kernel-uek|linux|linux-lts|linux-virt)$")


def _get(s: GuestSession, key: str) -> Any:
    v = s.info(key)
    return None if v in ("unknown", "") else v


def _full_version(app: dict[str, Any], pkg_format: str) -> str:
    """The version as the package manager writes it: deb [epoch:]version[-revision], rpm version-release."""
    ver = str(app.get("app2_version") or "")
    rel = str(app.get("app2_release") or "")
    epoch = int(app.get("app2_epoch") or 0)
    full = f"{ver}-{rel}" if rel else ver
    if epoch and pkg_format == "deb":
        full = f"{epoch}:{full}"
    return full


def _applications(s: GuestSession, pkg_format: str) -> list[dict[str, Any]]:
    try:
        apps = s.g.inspect_list_applications2(s.root)
    except RuntimeError:
        return []
    out = []
    for a in apps:
        name = str(a.get("app2_name") or "")
        if not name:
            continue
        out.append({
            "name": name,
            "version": _full_version(a, pkg_format),
            "epoch": int(a.get("app2_epoch") or 0),
            "upstream_version": str(a.get("app2_version") or ""),
            "release": str(a.get("app2_release") or ""),
            "arch": str(a.get("app2_arch") or ""),
            "source_package": str(a.get("app2_source_package") or "") or None,
            "url": str(a.get("app2_url") or "") or None,
            "summary": str(a.get("app2_summary") or "") or None,
            "display_name": str(a.get("app2_display_name") or "") or None,
            "publisher": str(a.get("app2_publisher") or "") or None,
        })
    out.sort(key=lambda x: (x["name"], x["arch"]))
    return out


def _kernels(s: GuestSession, apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if s.is_dir("/boot"):
        for name in sorted(s.g.ls("/boot")):
            m = re.match(r"^(vmlinuz|vmlinux|bzImage|kernel)-(.+)$", name)
            if m and not name.endswith(".hmac"):
                found.setdefault(m.group(2), {"version": m.group(2), "path": f"/boot/{name}", "package": None})
    for app in apps:
        if _KERNEL_PKG.match(app["name"]):
            ver = app["name"].removeprefix("linux-image-") if app["name"].startswith("linux-image-") else app["version"]
            hit = next((k for k in found.values() if k["version"].startswith(ver) or ver.startswith(k["version"])), None)
            if hit is not None:
                hit["package"] = f"{app['name']} {app['version']}"
            elif not app["name"].startswith("linux-image-") or re.match(r"^\d", ver):
                found.setdefault(ver, {"version": ver, "path": None, "package": f"{app['name']} {app['version']}"})
    return list(found.values())


def _bootloader(s: GuestSession, names: set[str]) -> str | None:
    checks = (
        ("grub2", ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/boot/grub2/grubenv", "/etc/default/grub")),
        ("systemd-boot", ("/boot/loader/loader.conf", "/boot/efi/loader/loader.conf", "/efi/loader/loader.conf")),
        ("extlinux", ("/boot/extlinux/extlinux.conf", "/boot/syslinux/syslinux.cfg", "/extlinux.conf")),
        ("grub-legacy", ("/boot/grub/menu.lst", "/boot/grub/grub.conf")),
    )
    for name, paths in checks:
        if any(s.exists(p) for p in paths):
            return name
    if names & {"grub-pc", "grub-efi-amd64", "grub-efi-arm64", "grub2-pc", "grub2-efi-x64", "grub2-efi-aa64",
                "grub-common", "grub2-common", "grub2"}:
        return "grub2"
    if "systemd-boot" in names:
        return "systemd-boot"
    if names & {"syslinux", "extlinux"}:
        return "extlinux"
    return None


def guest_info(s: GuestSession) -> dict[str, Any]:
    """The inspection report for an open session (see the module docstring)."""
    os_type = _get(s, "type")
    pkg_format = _get(s, "package_format") or ""
    apps = _applications(s, pkg_format)
    names = {a["name"] for a in apps}
    major = _get(s, "major_version")
    minor = _get(s, "minor_version")
    version = None
    if isinstance(major, int) and major > 0:
        version = f"{major}.{minor or 0}"
    info: dict[str, Any] = {
        "image": {"path": s.path, "format": s.fmt},
        "root": s.root,
        "os": {
            "type": os_type,
            "distro": _get(s, "distro"),
            "version": version,
            "major_version": major,
            "minor_version": minor,
            "product_name": _get(s, "product_name"),
            "product_variant": _get(s, "product_variant"),
            "osinfo": _get(s, "osinfo"),
            "arch": _get(s, "arch"),
            "hostname": _get(s, "hostname"),
        },
        "package_format": pkg_format or None,
        "package_management": _get(s, "package_management"),
        "mountpoints": {mp: dev for mp, dev in s.mounts},
        "kernels": _kernels(s, apps) if os_type == "linux" else [],
        "bootloader": _bootloader(s, names) if os_type == "linux" else None,
        "uefi": "/boot/efi" in dict(s.mounts) or s.is_dir("/boot/efi/EFI"),
        "cloud_init": "cloud-init" in names or s.exists("/usr/bin/cloud-init"),
        "qemu_guest_agent": "qemu-guest-agent" in names or any(
            s.exists(p) for p in ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga")),
        "cloudbase_init": any("cloudbase-init" in (a.get("display_name") or a["name"]).lower() for a in apps),
        "package_count": len(apps),
        "applications": apps,
    }
    if os_type == "windows":
        from imagekit.windows.inventory import inventory

        info["os"]["windows_systemroot"] = _get(s, "windows_systemroot")
        info["os"]["windows_current_control_set"] = _get(s, "windows_current_control_set")
        info["windows"] = inventory(s).to_dict()
        names_lower = {n.lower() for n in names}
        info["qemu_guest_agent"] = info["qemu_guest_agent"] or any("qemu guest agent" in (
            a.get("display_name") or a["name"]).lower() for a in apps) or "qemu-ga" in names_lower
    return info


def inspect_guest(path: str | os.PathLike[str], fmt: str, *, accel: str | AccelChoice | None = None) -> dict[str, Any]:
    """Open ``path`` (format ``fmt``: qcow2 or raw) read-only and return :func:`guest_info`."""
    with open_image(path, readonly=True, fmt=fmt, accel=accel) as s:
        return guest_info(s)


# ---------------------------------------------------------------- package URLs


def _q(text: str) -> str:
    return quote(text, safe=".-_~")


def purl(app: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The package URL of one installed package (None for Windows and unknown package formats)."""
    fmt = info.get("package_format") or ""
    ptype = _PURL_TYPE.get(fmt)
    if ptype is None:
        return None
    osd = info.get("os", {})
    distro = str(osd.get("distro") or "")
    if ptype == "deb":
        namespace = distro if distro in ("debian", "ubuntu") else (distro or "debian")
    elif ptype == "rpm":
        namespace = _RPM_VENDOR.get(distro, distro or "rpm")
    elif ptype == "apk":
        namespace = "alpine"
    else:
        namespace = "arch"
    quals: dict[str, str] = {}
    if app.get("arch"):
        quals["arch"] = app["arch"]
    if ptype == "rpm" and app.get("epoch"):
        quals["epoch"] = str(app["epoch"])
    if distro and osd.get("major_version"):
        quals["distro"] = f"{distro}-{osd.get('version') or osd.get('major_version')}" if ptype != "deb" \
            else f"{distro}-{osd.get('major_version')}"
    version = app["version"] if ptype != "rpm" else (
        f"{app['upstream_version']}-{app['release']}" if app.get("release") else app["upstream_version"])
    text = f"pkg:{ptype}/{_q(namespace)}/{_q(app['name'])}"
    if version:
        text += f"@{_q(version)}"
    if quals:
        text += "?" + "&".join(f"{k}={_q(v)}" for k, v in sorted(quals.items()))
    return text


def _now(timestamp: _dt.datetime | None) -> str:
    t = timestamp or _dt.datetime.now(_dt.UTC)
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _os_name(info: dict[str, Any]) -> str:
    osd = info.get("os", {})
    return str(osd.get("distro") or osd.get("type") or "unknown")


def to_cyclonedx(info: dict[str, Any], *, timestamp: _dt.datetime | None = None) -> dict[str, Any]:
    """A CycloneDX 1.5 JSON SBOM: the operating system as the described component, one
    ``library`` component per installed package (with its purl)."""
    osd = info.get("os", {})
    os_props = [{"name": f"imagekit:os:{k}", "value": str(osd[k])}
                for k in ("arch", "product_name", "osinfo", "hostname") if osd.get(k)]
    for k in ("package_format", "package_management", "bootloader"):
        if info.get(k):
            os_props.append({"name": f"imagekit:{k}", "value": str(info[k])})
    for k in ("cloud_init", "qemu_guest_agent"):
        os_props.append({"name": f"imagekit:{k}", "value": str(bool(info.get(k))).lower()})
    for kern in info.get("kernels", []):
        os_props.append({"name": "imagekit:kernel", "value": str(kern["version"])})
    components = []
    seen: set[str] = set()
    for app in info.get("applications", []):
        p = purl(app, info)
        ref = p or f"app:{app['name']}@{app['version']}:{app.get('arch', '')}"
        if ref in seen:
            continue
        seen.add(ref)
        comp: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": app["name"], "version": app["version"]}
        if p:
            comp["purl"] = p
        if app.get("summary"):
            comp["description"] = app["summary"]
        if app.get("publisher"):
            comp["publisher"] = app["publisher"]
        props = []
        if app.get("arch"):
            props.append({"name": "imagekit:package:arch", "value": app["arch"]})
        if app.get("source_package"):
            props.append({"name": "imagekit:package:source", "value": app["source_package"]})
        if props:
            comp["properties"] = props
        if app.get("url"):
            comp["externalReferences"] = [{"type": "website", "url": app["url"]}]
        components.append(comp)
    os_ref = "operating-system"
    return {
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": _now(timestamp),
            "tools": {"components": [{"type": "application", "name": "imagekit", "version": __version__}]},
            "component": {
                "type": "operating-system",
                "bom-ref": os_ref,
                "name": _os_name(info),
                "version": str(osd.get("version") or ""),
                "description": str(osd.get("product_name") or ""),
                "properties": os_props,
            },
        },
        "components": components,
        "dependencies": [{"ref": os_ref, "dependsOn": [c["bom-ref"] for c in components]}],
    }


def _spdx_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", text)


def to_spdx(info: dict[str, Any], *, timestamp: _dt.datetime | None = None) -> dict[str, Any]:
    """An SPDX 2.3 JSON document: the operating system package DESCRIBED by the document,
    CONTAINS one package per installed package (purl as a PACKAGE-MANAGER external ref)."""
    osd = info.get("os", {})
    name = f"{_os_name(info)}-{osd.get('version') or 'unknown'}"
    os_id = "SPDXRef-OperatingSystem"
    packages: list[dict[str, Any]] = [{
        "SPDXID": os_id,
        "name": _os_name(info),
        "versionInfo": str(osd.get("version") or "NOASSERTION"),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "description": str(osd.get("product_name") or ""),
    }]
    rels: list[dict[str, str]] = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": os_id}]
    used: set[str] = set()
    for i, app in enumerate(info.get("applications", []), 1):
        sid = _spdx_id(f"SPDXRef-Package-{app['name']}-{app.get('arch') or 'noarch'}")
        if sid in used:
            sid = f"{sid}-{i}"
        used.add(sid)
        pkg: dict[str, Any] = {
            "SPDXID": sid,
            "name": app["name"],
            "versionInfo": app["version"] or "NOASSERTION",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
        }
        p = purl(app, info)
        if p:
            pkg["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                    "referenceLocator": p}]
        if app.get("summary"):
            pkg["summary"] = app["summary"]
        if app.get("source_package"):
            pkg["sourceInfo"] = f"built from source package {app['source_package']}"
        packages.append(pkg)
        rels.append({"spdxElementId": os_id, "relationshipType": "CONTAINS", "relatedSpdxElement": sid})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"https://spdx.org/spdxdocs/imagekit-{_spdx_id(name)}-{uuid.uuid4()}",
        "creationInfo": {"created": _now(timestamp), "creators": [f"Tool: imagekit-{__version__}"]},
        "packages": packages,
        "relationships": rels,
    }


SBOM_FORMATS = {"cyclonedx": to_cyclonedx, "spdx": to_spdx}
