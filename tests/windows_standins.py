"""Small stand-ins for what cannot be downloaded here: Windows media, virtio-win, the cloudbase-init MSI,
and a guest that follows the install protocol.

* ``install_iso()``: an ISO holding ``sources/install.wim``, a real WIM made with wimlib
  (``wimlib-imagex capture``) whose images carry the names and properties of Windows
  Server 2022's (``--image-property``); written with genisoimage as UDF (like Microsoft's
  media) or with xorriso as ISO 9660 + Joliet. With ``startup_nsh`` it is also bootable by
  OVMF: its El Torito EFI image is a FAT volume holding a UEFI shell ``startup.nsh``, which is
  the stand-in guest: it prints the stage markers on the serial console, resets, powers off
  (``reset -s``) or hangs, as the test asks. OVMF's built-in shell runs it because the image
  has no boot loader.
* ``virtio_tree()``: the folders of a virtio-win release (``viostor\\2k22\\amd64``...) with
  ``.inf`` files written like virtio-win's (``CatalogFile``, ``SourceDisksFiles``; NetKVM's in
  UTF-16 with a BOM), placeholder ``.sys``/``.cat`` files and the guest agent's MSI path.
* ``fake_msi()``: a file with an MSI's signature (an OLE compound file header) and nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SERVER_IMAGES = (("Windows Server 2022 SERVERSTANDARDCORE", "ServerStandard", "Server Core"),
                 ("Windows Server 2022 SERVERSTANDARD", "ServerStandard", "Server"),
                 ("Windows Server 2022 SERVERDATACENTER", "ServerDatacenter", "Server"))


def _run(argv: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {res.stderr[-2000:]}")


def make_wim(out: Path, images: tuple[tuple[str, str, str], ...] = SERVER_IMAGES, build: int = 20348) -> None:
    tree = out.parent / "wim-tree"
    (tree / "Windows" / "System32").mkdir(parents=True, exist_ok=True)
    (tree / "Windows" / "System32" / "placeholder.txt").write_text("not Windows\n")
    for i, (name, edition, itype) in enumerate(images, 1):
        _run(["wimlib-imagex", "capture" if i == 1 else "append", str(tree), str(out), name])
        _run(["wimlib-imagex", "info", str(out), str(i), "--image-property", f"WINDOWS/EDITIONID={edition}",
              "--image-property", f"WINDOWS/INSTALLATIONTYPE={itype}", "--image-property",
              f"WINDOWS/VERSION/BUILD={build}", "--image-property", "WINDOWS/VERSION/MAJOR=10",
              "--image-property", "WINDOWS/ARCH=9"])
    shutil.rmtree(tree)


def startup_nsh(kind: str) -> str:
    """The stand-in guest's script: ``ok`` (markers then power off), ``resets`` (three boots, the
    stage kept in a non-volatile shell variable), ``hang`` (a marker, then nothing), ``fail``
    (the failure marker), ``early`` (powers off before sysprep)."""
    head = "@echo -off\n"
    if kind == "ok":
        return head + "echo \"IMAGEKIT-STAGE provision\"\necho \"IMAGEKIT-STAGE sysprep\"\nreset -s\n"
    if kind == "resets":
        return head + (
            "if \"%ikstage%\" == \"\" then\n  set ikstage one\n  echo \"IMAGEKIT-STAGE provision\"\n  reset\nendif\n"
            "if \"%ikstage%\" == \"one\" then\n  set ikstage two\n  echo \"IMAGEKIT-STAGE drivers\"\n  reset -w\nendif\n"
            "set -d ikstage\necho \"IMAGEKIT-STAGE sysprep\"\nreset -s\n")
    if kind == "hang":
        return head + "echo \"IMAGEKIT-STAGE provision\"\n"
    if kind == "fail":
        return head + "echo \"IMAGEKIT-STAGE drivers\"\necho \"IMAGEKIT-FAILED pnputil exited with status 5\"\n"
    if kind == "early":
        return head + "echo \"IMAGEKIT-STAGE provision\"\nreset -s\n"
    raise ValueError(kind)


def _efi_image(folder: Path, script: str) -> Path:
    img = folder / "efi.img"
    nsh = folder / "startup.nsh"
    nsh.write_text(script)
    img.unlink(missing_ok=True)
    _run(["mformat", "-C", "-f", "1440", "-i", str(img), "::"])
    _run(["mcopy", "-i", str(img), str(nsh), "::/startup.nsh"])
    nsh.unlink()
    return img


def install_iso(out: Path, *, udf: bool = False, wim: bool = True, startup: str | None = None,
                images: tuple[tuple[str, str, str], ...] = SERVER_IMAGES, build: int = 20348) -> Path:
    root = out.parent / f"{out.stem}-root"
    (root / "sources").mkdir(parents=True, exist_ok=True)
    if wim:
        make_wim(root / "sources" / "install.wim", images, build)
    else:
        (root / "sources" / "boot.txt").write_text("no install.wim here\n")
    boot: list[str] = []
    if startup is not None:
        shutil.move(str(_efi_image(out.parent, startup_nsh(startup))), root / "efi.img")
        boot = ["-e", "efi.img", "-no-emul-boot"]
    if udf:
        _run(["genisoimage", "-quiet", "-udf", "-J", "-V", "IMAGEKIT_TEST", "-o", str(out), *boot, str(root)])
    else:
        _run(["xorriso", "-as", "mkisofs", "-quiet", "-J", "-V", "IMAGEKIT_TEST", "-o", str(out), *boot, str(root)])
    shutil.rmtree(root)
    return out


VIRTIO_DRIVERS = ("viostor", "vioscsi", "NetKVM", "vioserial", "Balloon", "viorng")


def inf_text(name: str, extra_files: tuple[str, ...] = ()) -> str:
    files = "".join(f"{f} = 1,,\r\n" for f in (f"{name.lower()}.sys", *extra_files))
    return (f"; {name}.inf\r\n[Version]\r\nSignature=\"$WINDOWS NT$\"\r\nClass=SCSIAdapter\r\n"
            f"Provider=%VENDOR%\r\nDriverVer = 01/01/2024,100.95.104.26200\r\nCatalogFile = {name.lower()}.cat\r\n"
            f"[SourceDisksNames]\r\n1 = %DiskId1%,,,\"\"\r\n[SourceDisksFiles]\r\n{files}"
            f"[Strings]\r\nVENDOR = \"Red Hat, Inc.\"\r\nDiskId1 = \"{name} Installation Disk #1\"\r\n")


def virtio_tree(root: Path, os_ids: tuple[str, ...] = ("2k22", "2k19", "w11", "w10")) -> Path:
    for name in VIRTIO_DRIVERS:
        for os_id in os_ids:
            d = root / name / os_id / "amd64"
            d.mkdir(parents=True, exist_ok=True)
            extra = ("netkvmco.exe",) if name == "NetKVM" else ()
            text = inf_text(name, extra)
            data = text.encode("utf-16") if name == "NetKVM" else text.encode("ascii")
            (d / f"{name.lower()}.inf").write_bytes(data)
            for f in (f"{name.lower()}.sys", f"{name.lower()}.cat", *extra):
                (d / f).write_bytes(b"placeholder " + f.encode())
            (d / f"{name.lower()}.pdb").write_bytes(b"debug symbols")
    (root / "guest-agent").mkdir(parents=True, exist_ok=True)
    (root / "guest-agent" / "qemu-ga-x86_64.msi").write_bytes(fake_msi_bytes())
    return root


def virtio_iso(tree: Path, out: Path) -> Path:
    _run(["xorriso", "-as", "mkisofs", "-quiet", "-J", "-r", "-V", "virtio-win", "-o", str(out), str(tree)])
    return out


def fake_msi_bytes() -> bytes:
    return bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 504


def fake_msi(path: Path) -> Path:
    path.write_bytes(fake_msi_bytes())
    return path
