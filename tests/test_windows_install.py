"""The install orchestration under QEMU (TCG), end to end, with a stand-in guest.

No Windows can run here, so the guest is OVMF's own UEFI shell running a ``startup.nsh`` from the
install ISO's El Torito image (``tests/windows_standins.py``): it follows the same protocol as
the provisioning script (stage markers on COM1, failure marker, power off at the end) and can
reset or hang. Everything else is the real thing: QEMU q35, OVMF with a private variable store
(the Secure Boot build with SMM; its variable template here has no keys enrolled, because
enrolled Microsoft keys would refuse the unsigned shell, as they should), swtpm as TPM 2.0
(``query-tpm`` over QMP), the disk on virtio-scsi as the Glance properties would declare it, the
serial log, QMP events and screendump, Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imagekit.accel import AccelChoice
from imagekit.builders.windows import WindowsNeedsKvm, require_kvm
from imagekit.windows import install
from imagekit.workdir import WorkDir, clean_folder
from tests import windows_standins as ws
from tests.conftest import ROOT
from tests.test_signals import tagged_processes

TCG = AccelChoice("tcg", "tcg", "chosen by the test")
OVMF = Path("/usr/share/OVMF")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (OVMF / "OVMF_CODE_4M.secboot.fd").is_file(), reason="OVMF is not installed (apt ovmf)"),
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed"),
    pytest.mark.skipif(shutil.which("mformat") is None or shutil.which("xorriso") is None,
                       reason="mtools and xorriso build the stand-in guest"),
]


def standin_firmware(secure: bool) -> install.Firmware:
    if secure:  # the SMM/Secure Boot build, keys not enrolled: the unsigned UEFI shell may run
        return install.Firmware("uefi", OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.fd", True)
    return install.firmware("uefi", False)


def plan(tmp_path: Path, kind: str, wd: WorkDir, *, timeout: float = 120, secure: bool = False, tpm: bool = False,
         bus: str = "scsi") -> install.InstallPlan:
    iso = ws.install_iso(tmp_path / f"{kind}.iso", wim=False, startup=kind)
    disk = tmp_path / "disk.qcow2"
    disk.unlink(missing_ok=True)
    install.disk_create(disk, 1 << 30)
    return install.InstallPlan(disk=disk, disk_bus=bus, install_media=iso, answer_media=None,
                               firmware=standin_firmware(secure), accel=TCG, work=wd.path / "vm", logs=tmp_path / "logs",
                               timeout=timeout, tpm=tpm, memory_mib=256, cpus=1, env=wd.env())


def left_running(wd: WorkDir) -> list[int]:
    return tagged_processes(str(wd.path))


def test_success_with_secure_boot_tpm_and_a_scsi_disk(tmp_path: Path) -> None:
    said: list[str] = []
    with WorkDir("windows-", base=tmp_path / "work") as wd:
        p = plan(tmp_path, "ok", wd, secure=True, tpm=True)
        res = install.run(p, said.append)
        assert left_running(wd) == []
        assert not (wd.path / "vm" / "OVMF_VARS.fd").exists()  # the private variable store dies with the run
        assert (wd.path / "vm" / "tpm").is_dir()
    assert [s.name for s in res.stages] == ["provision", "sysprep"]
    assert res.tpm_model == "tpm-crb" and res.resets == 0
    assert "QEMU started (TPM tpm-crb)" in said and "provisioning: sysprep" in said
    serial = res.serial_log.read_text(errors="replace")
    assert "/Scsi(0x0,0x0)" in serial  # the firmware saw the disk on virtio-scsi
    assert res.serial_log.parent == tmp_path / "logs"


def test_a_guest_that_resets_several_times(tmp_path: Path) -> None:
    said: list[str] = []
    with WorkDir("windows-", base=tmp_path / "work") as wd:
        res = install.run(plan(tmp_path, "resets", wd, bus="virtio"), said.append)
        assert left_running(wd) == []
    assert res.resets == 2
    assert [s.name for s in res.stages] == ["provision", "drivers", "sysprep"]
    assert "Windows Setup: reboot 1" in said and "Windows Setup: reboot 2" in said


def test_a_guest_that_never_shuts_down_times_out_with_a_screenshot(tmp_path: Path) -> None:
    with WorkDir("windows-", base=tmp_path / "work") as wd:
        p = plan(tmp_path, "hang", wd, timeout=20)
        start = time.monotonic()
        with pytest.raises(install.InstallTimeout) as err:
            install.run(p)
        assert time.monotonic() - start < 60
        assert left_running(wd) == []
    e = err.value
    assert e.code == "windows-install-timeout" and e.stages == ("provision",)
    assert "did not finish within 20 s" in e.message and "stages seen: provision" in e.message
    assert e.screendump is not None
    head = e.screendump.read_bytes()[:4]
    assert head == b"\x89PNG" or head.startswith(b"P6"), head  # a PNG (or PPM from an older QEMU)
    assert str(e.screendump) in (e.hint or "") and str(e.serial_log) in (e.hint or "")


def test_the_failure_marker_ends_the_install_at_once(tmp_path: Path) -> None:
    with WorkDir("windows-", base=tmp_path / "work") as wd:
        start = time.monotonic()
        with pytest.raises(install.InstallError) as err:
            install.run(plan(tmp_path, "fail", wd, timeout=300))
        assert time.monotonic() - start < 120  # not the timeout
        assert left_running(wd) == []
    assert "provisioning failed: pnputil exited with status 5" in err.value.message
    assert err.value.stages == ("drivers",) and not isinstance(err.value, install.InstallTimeout)


CTRL_C = textwrap.dedent("""
    import sys
    from pathlib import Path
    from imagekit import signals
    from imagekit.windows import install
    from imagekit.workdir import WorkDir
    from tests.test_windows_install import TCG, standin_firmware
    signals.install()
    wd = WorkDir("windows-", base=sys.argv[1])
    print(wd.path, flush=True)
    p = install.InstallPlan(disk=Path(sys.argv[2]), disk_bus="scsi", install_media=Path(sys.argv[3]), answer_media=None,
                            firmware=standin_firmware(True), accel=TCG, work=wd.path / "vm", logs=Path(sys.argv[4]),
                            timeout=300, tpm=True, memory_mib=256, cpus=1, env=wd.env())
    try:
        install.run(p)
    except KeyboardInterrupt as exc:
        sys.exit(signals.exit_code_of(exc))
""")


def test_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    iso = ws.install_iso(tmp_path / "hang.iso", wim=False, startup="hang")
    disk = tmp_path / "disk.qcow2"
    install.disk_create(disk, 1 << 30)
    logs = tmp_path / "logs"
    sockets_before = set(Path("/tmp").glob("imagekit-win-*"))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(tmp_path / "work"), str(disk), str(iso), str(logs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    folder = proc.stdout.readline().strip()
    try:
        deadline = time.monotonic() + 120
        while b"IMAGEKIT-STAGE provision" not in ((logs / "serial.log").read_bytes() if (logs / "serial.log").exists()
                                                   else b""):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        assert tagged_processes(folder)  # QEMU and swtpm are running
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert tagged_processes(folder) == []
        assert set(Path("/tmp").glob("imagekit-win-*")) == sockets_before
        assert not (Path(folder) / "vm" / "OVMF_VARS.fd").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        clean_folder(folder)


def test_windows_needs_kvm_unless_tcg_is_asked_for() -> None:
    require_kvm(AccelChoice("kvm", "auto", "KVM probe: ok"))
    require_kvm(AccelChoice("tcg", "tcg", "asked for TCG"))  # --accel tcg / IMAGEKIT_ACCEL=tcg
    with pytest.raises(WindowsNeedsKvm) as err:
        require_kvm(AccelChoice("tcg", "auto", "KVM probe: a KVM guest printed nothing within 10 s"))
    assert err.value.code == "windows-needs-kvm" and "--accel tcg" in (err.value.hint or "")
    assert "printed nothing" in err.value.message


def test_qemu_command_line_follows_the_plan(tmp_path: Path) -> None:
    with WorkDir("windows-", base=tmp_path / "work") as wd:
        p = plan(tmp_path, "ok", wd, secure=True, tpm=True, bus="virtio")
        argv = install.qemu_argv(p, "qemu-system-x86_64", tmp_path / "vars.fd", tmp_path / "s.log",
                                 tmp_path / "q.sock", tmp_path / "t.sock")
    text = " ".join(argv)
    assert "-machine q35,smm=on" in text and "driver=cfi.pflash01,property=secure,value=on" in text
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in text and "-no-reboot" not in text
    assert "tpm-crb,tpmdev=tpm0" in text and "restrict=on" in text and "-rtc base=localtime" in text
    sata = install.qemu_argv(install.InstallPlan(**{**p.__dict__, "disk_bus": "sata", "tpm": False,
                                                   "firmware": install.firmware("bios", False)}),
                             "qemu-system-x86_64", None, tmp_path / "s.log", tmp_path / "q.sock", None)
    assert "ide-hd,drive=disk0,bus=ide.0,bootindex=0" in " ".join(sata) and "pflash" not in " ".join(sata)
    with pytest.raises(ValueError, match="disk bus"):
        install.qemu_argv(install.InstallPlan(**{**p.__dict__, "disk_bus": "floppy"}), "q", None, tmp_path / "s",
                          tmp_path / "q", None)
