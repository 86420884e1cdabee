"""Install media, virtio-win drivers and the answer ISO, checked before anything boots.

The media are stand-ins (``tests/windows_standins.py``): a real WIM made with wimlib inside an
ISO written as UDF (as Microsoft's are) or ISO 9660 + Joliet; a virtio-win tree with .inf files
written like virtio-win's. Everything is read back with independent tools (pycdlib, isoinfo).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imagekit.windows import answer, catalog, cbinit, drivers, media, provision, unattend
from imagekit.windows.isofs import MediaError, Tree
from tests import windows_standins as ws

pytestmark = pytest.mark.skipif(shutil.which("wimlib-imagex") is None or shutil.which("genisoimage") is None,
                                reason="wimtools and genisoimage are needed (make setup installs them)")


@pytest.fixture(scope="module")
def isos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("win-media")
    return {"udf": ws.install_iso(d / "udf.iso", udf=True), "joliet": ws.install_iso(d / "joliet.iso"),
            "no-wim": ws.install_iso(d / "nowim.iso", wim=False),
            "2019": ws.install_iso(d / "2019.iso", images=(("Windows Server 2019 SERVERSTANDARD", "ServerStandard",
                                                            "Server"),), build=17763)}


@pytest.mark.parametrize("kind", ["udf", "joliet"])
def test_editions_are_read_with_wimlib(isos: dict[str, Path], kind: str, tmp_path: Path) -> None:
    with Tree(isos[kind]) as t:
        images = media.editions(t, tmp_path / "wim")
    assert [i.name for i in images] == [n for n, _, _ in ws.SERVER_IMAGES]
    std = images[1]
    assert (std.index, std.edition_id, std.installation_type, std.build, std.arch) == \
        (2, "ServerStandard", "Server", 20348, "x86_64")
    assert list((tmp_path / "wim").iterdir()) == []  # the sparse skeleton is gone
    found = media.check_edition(images, "Windows Server 2022 SERVERSTANDARD", catalog.release("2k22"), "x.iso")
    assert found.index == 2


def test_a_missing_edition_lists_the_ones_there(isos: dict[str, Path], tmp_path: Path) -> None:
    with Tree(isos["udf"]) as t:
        images = media.editions(t, tmp_path)
    with pytest.raises(MediaError) as err:
        media.check_edition(images, "Windows Server 2022 SERVERSTANDARD (Desktop Experience)",
                            catalog.release("2k22"), "udf.iso")
    assert "1: Windows Server 2022 SERVERSTANDARDCORE" in err.value.message
    assert "3: Windows Server 2022 SERVERDATACENTER" in err.value.message
    assert err.value.code == "windows-media"
    with pytest.raises(MediaError) as err2:
        media.check_edition(images, "windows server 2022 serverstandard", catalog.release("2k22"), "udf.iso")
    assert "did you mean 'Windows Server 2022 SERVERSTANDARD'" in (err2.value.hint or "")


def test_the_edition_must_be_the_recipes_release(isos: dict[str, Path], tmp_path: Path) -> None:
    with Tree(isos["2019"]) as t:
        images = media.editions(t, tmp_path)
    media.check_edition(images, "Windows Server 2019 SERVERSTANDARD", catalog.release("2k19"), "2019.iso")
    with pytest.raises(MediaError, match="is not Windows Server 2022 .*build is 17763"):
        media.check_edition(images, "Windows Server 2019 SERVERSTANDARD", catalog.release("2k22"), "2019.iso")
    with pytest.raises(MediaError, match="is not Windows 10 .*Server edition"):
        media.check_edition(images, "Windows Server 2019 SERVERSTANDARD", catalog.release("w10"), "2019.iso")


def test_bad_media_are_explained(isos: dict[str, Path], tmp_path: Path) -> None:
    with Tree(isos["no-wim"]) as t, pytest.raises(MediaError, match="no sources/install.wim"):
        media.editions(t, tmp_path)
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"\0" * 70000)
    with pytest.raises(MediaError, match="not a readable ISO"):
        Tree(junk)
    with pytest.raises(MediaError, match="does not exist"):
        Tree(tmp_path / "missing.iso")
    fake = tmp_path / "fake"
    (fake / "sources").mkdir(parents=True)
    (fake / "sources" / "install.wim").write_bytes(b"PK\3\4 not a wim" * 20)
    with Tree(fake) as t, pytest.raises(MediaError, match="is not a WIM file"):
        media.editions(t, tmp_path / "w")
    cut = tmp_path / "cut"
    (cut / "sources").mkdir(parents=True)
    ws.make_wim(cut / "sources" / "install.wim")
    data = (cut / "sources" / "install.wim").read_bytes()
    (cut / "sources" / "install.wim").write_bytes(data[:300])  # truncated: its tables are gone
    with Tree(cut) as t, pytest.raises(MediaError, match="outside the file"):
        media.editions(t, tmp_path / "w")


# ---------------------------------------------------------------- virtio-win


@pytest.fixture
def virtio(tmp_path: Path) -> Path:
    return ws.virtio_tree(tmp_path / "virtio-win")


@pytest.mark.parametrize("bus", ["scsi", "virtio"])
def test_drivers_of_the_os_id_are_taken_and_checked(virtio: Path, bus: str) -> None:
    with Tree(virtio) as t:
        selected = drivers.select(t, "2k22", bus)
    assert selected.names()[0] == drivers.STORAGE[bus]
    assert set(selected.names()) == set(ws.VIRTIO_DRIVERS)
    net = next(d for d in selected.drivers if d.name == "NetKVM")
    assert net.folder == "NetKVM/2k22/amd64" and net.for_pe
    assert {f.rsplit("/", 1)[1] for f in net.files} == {"netkvm.inf", "netkvm.sys", "netkvm.cat", "netkvmco.exe"}
    assert selected.guest_agent == "guest-agent/qemu-ga-x86_64.msi"


def test_the_virtio_iso_reads_like_the_folder(virtio: Path, tmp_path: Path) -> None:
    iso = ws.virtio_iso(virtio, tmp_path / "virtio-win.iso")
    with Tree(virtio) as a, Tree(iso) as b:
        assert drivers.select(a, "w11", "scsi") == drivers.select(b, "w11", "scsi")


def test_every_referenced_file_must_be_there(virtio: Path) -> None:
    (virtio / "vioscsi/2k22/amd64/vioscsi.sys").unlink()
    (virtio / "NetKVM/2k22/amd64/netkvm.cat").unlink()
    (virtio / "NetKVM/2k22/amd64/netkvmco.exe").unlink()
    shutil.rmtree(virtio / "vioserial/2k22")
    (virtio / "guest-agent/qemu-ga-x86_64.msi").unlink()
    with Tree(virtio) as t, pytest.raises(MediaError) as err:
        drivers.select(t, "2k22", "scsi")
    msg = err.value.message
    assert "(5 problems)" in msg
    assert "vioscsi/2k22/amd64/vioscsi.inf references vioscsi.sys, which is missing" in msg
    assert "netkvm.inf references netkvm.cat" in msg and "netkvm.inf references netkvmco.exe" in msg
    assert "vioserial: no 2k22\\amd64 folder (the media have: 2k19, w10, w11)" in msg
    assert "qemu-ga-x86_64.msi" in msg
    (virtio / "guest-agent/qemu-ga-x86_64.msi").write_bytes(ws.fake_msi_bytes())
    with Tree(virtio) as t:  # the other release is complete
        drivers.select(t, "2k19", "scsi")


def test_an_unsigned_driver_and_an_old_virtio_release(virtio: Path, tmp_path: Path) -> None:
    inf = virtio / "viostor/w10/amd64/viostor.inf"
    inf.write_text(inf.read_text().replace("CatalogFile = viostor.cat", ""))
    with Tree(virtio) as t, pytest.raises(MediaError, match="names no CatalogFile"):
        drivers.select(t, "w10", "virtio")
    old = ws.virtio_tree(tmp_path / "old", os_ids=("2k19", "w10"))
    with Tree(old) as t, pytest.raises(MediaError, match="no 2k22.amd64 folder"):
        drivers.select(t, "2k22", "scsi")


def test_inf_references() -> None:
    refs = drivers.inf_references(ws.inf_text("NetKVM", ("netkvmco.exe",)))
    assert refs.catalogs == ("netkvm.cat",) and refs.files == ("netkvm.sys", "netkvmco.exe")
    utf16 = ws.inf_text("viostor").encode("utf-16")
    assert drivers.inf_references(drivers.decode_inf(utf16)).files == ("viostor.sys",)
    arch = "[Version]\nCatalogFile.NTamd64=a.cat\n[SourceDisksFiles.x86]\nx86.sys=1\n[SourceDisksFiles.amd64]\n" \
           "a.sys=1 ; the driver\n"
    assert drivers.inf_references(arch) == drivers.InfRefs(("a.cat",), ("a.sys",))


# ---------------------------------------------------------------- the answer ISO


def test_answer_iso_holds_what_setup_and_the_script_read(virtio: Path, tmp_path: Path) -> None:
    import pycdlib

    password = "Answer-iso-Pw-1!"
    inputs = answer.AnswerInputs(
        unattend.UnattendOptions("Windows Server 2022 SERVERSTANDARD", "uefi", "en-US", "UTC", password,
                                 provision.provision_command()),
        provision.ProvisionOptions(cbinit.CloudbaseInitOptions(), rdp=False, client=False, user_script=True),
        ws.fake_msi(tmp_path / "cb.msi"), "Write-Host 'extra'\n")
    with Tree(virtio) as t:
        files = answer.build(t, drivers.select(t, "2k22", "scsi"), inputs, tmp_path / "work", tmp_path / "keep")
    iso = pycdlib.PyCdlib()
    iso.open(str(files.iso))
    names = sorted(path for root, _dirs, fs in iso.walk(joliet_path="/") for path in (f"{root}/{f}" for f in fs))
    iso.close()
    assert "//autounattend.xml" in names or "/autounattend.xml" in names
    assert any(n.endswith("/$WinPEDriver$/vioscsi/vioscsi.inf") for n in names)
    assert any(n.endswith("/$WinPEDriver$/NetKVM/netkvm.sys") for n in names)
    assert any(n.endswith("/drivers/vioserial/vioserial.cat") for n in names)
    assert not any(n.endswith(".pdb") for n in names)  # debug symbols stay out
    for f in ("provision.ps1", "user.ps1", "CloudbaseInitSetup.msi", "qemu-ga-x86_64.msi",
              "cloudbase-init/cloudbase-init.conf", "cloudbase-init/cloudbase-init-unattend.conf"):
        assert any(n.endswith(f"/imagekit/{f}") for n in names), f
    with Tree(files.iso) as t:
        xml = t.read(t.find("autounattend.xml") or "")
        # every folder DriverPaths names exists on the answer ISO (on one of the letters it tries)
        for path in unattend.values(xml, ["settings", "component", "DriverPaths", "PathAndCredentials", "Path"]):
            assert t.find(path.split(":\\", 1)[1].replace("\\", "/")) is not None, path
    assert unattend.values(xml, ["settings", "component", "UserAccounts", "AdministratorPassword", "Value"]) == \
        [unattend.encode_password(password, unattend.ADMIN_SUFFIX)]
    kept = {p.name: p.read_bytes() for p in (tmp_path / "keep").iterdir()}
    assert set(kept) == set(answer.KEPT)
    for data in kept.values():
        for form in unattend.password_forms(password):
            assert form.encode() not in data
    assert not (tmp_path / "work" / "answer").exists()  # only the ISO stays in the work folder
    if shutil.which("isoinfo"):
        listing = subprocess.run(["isoinfo", "-J", "-f", "-i", str(files.iso)], capture_output=True, text=True).stdout
        assert "/$WinPEDriver$/viostor/viostor.sys" in listing and "/autounattend.xml" in listing
