"""Run Windows Setup in QEMU, unattended, and watch it until the guest powers itself off.

The VM: q35; UEFI (OVMF, with a private copy of its variable store; the Secure Boot build
with Microsoft's keys enrolled when asked, which needs SMM) or BIOS; a TPM 2.0 from
``swtpm`` when asked; the disk on the bus the image's Glance properties declare (so the
storage driver Windows installs as boot-start is the one the cloud will need); the
install ISO and the answer ISO as SATA CD-ROMs; the serial port to a log file; QMP on a
Unix socket. Both programs run through :class:`imagekit.process.Process` (their own
process groups, tagged with the build's work folder).

Progress comes from two places: QMP ``RESET`` events (Setup reboots several times) and
the stage markers the provisioning script writes to COM1 (``IMAGEKIT-STAGE drivers``...).
For the first boot only, Enter is pressed every few seconds (QMP ``send-key``): UEFI
install media wait for "Press any key to boot from CD or DVD".

The install succeeds when the guest itself powers off (QMP ``SHUTDOWN`` with
``guest: true``) after the ``sysprep`` marker. It fails when the script reports
``IMAGEKIT-FAILED``, when the guest powers off earlier, when QEMU ends on its own, and at
the timeout; each failure keeps a screenshot (QMP ``screendump``) and the serial log in
the logs folder, and says where they are. Whatever happens, Ctrl-C included, QEMU and
swtpm are stopped before :func:`run` returns or raises.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imagekit import accel as accel_mod
from imagekit.builders.base import BuildError
from imagekit.errors import ToolNotFound
from imagekit.process import Process
from imagekit.windows.provision import FAILED_MARKER, STAGE_MARKER, SUCCESS_STAGE
from imagekit.windows.qmp import Qmp, QmpError

log = logging.getLogger("imagekit.windows")

OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/edk2/ovmf"), Path("/usr/share/qemu"))
BOOT_KEY_INTERVAL = 2.0
_ANSI_RE = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Z0-9]")
_MARKER_RE = re.compile(rf"^\s*({STAGE_MARKER}|{FAILED_MARKER})\s+(.*?)\s*$")
DISK_BUSES = ("virtio", "scsi", "sata", "ide")
Say = Callable[[str], None]


class InstallError(BuildError):
    """Windows Setup or the provisioning did not finish; ``logs`` names the serial log and screenshot."""

    code = "windows-install-failed"

    def __init__(self, message: str, hint: str | None = None, *, stages: tuple[str, ...] = (),
                 screendump: Path | None = None, serial_log: Path | None = None) -> None:
        super().__init__(message, hint)
        self.stages = stages
        self.screendump = screendump
        self.serial_log = serial_log


class InstallTimeout(InstallError):
    code = "windows-install-timeout"


@dataclass(frozen=True)
class Firmware:
    kind: Literal["uefi", "bios"]
    code: Path | None = None
    vars_template: Path | None = None
    secure_boot: bool = False


def _ovmf(*names: str) -> Path:
    for d in OVMF_DIRS:
        for n in names:
            if (d / n).is_file():
                return d / n
    raise ToolNotFound(f"the UEFI firmware ({names[0]}) was not found in {', '.join(map(str, OVMF_DIRS))}",
                       "install the 'ovmf' package (apt-get install ovmf)")


def firmware(kind: Literal["uefi", "bios"], secure_boot: bool) -> Firmware:
    """OVMF's code and variable template for UEFI (Secure Boot: the SMM build with Microsoft's keys)."""
    if kind == "bios":
        return Firmware("bios")
    if secure_boot:
        return Firmware("uefi", _ovmf("OVMF_CODE_4M.secboot.fd", "OVMF_CODE.secboot.fd"),
                        _ovmf("OVMF_VARS_4M.ms.fd", "OVMF_VARS.ms.fd"), True)
    return Firmware("uefi", _ovmf("OVMF_CODE_4M.fd", "OVMF_CODE.fd"), _ovmf("OVMF_VARS_4M.fd", "OVMF_VARS.fd"))


@dataclass(frozen=True)
class InstallPlan:
    """One install run. ``work`` holds what dies with the run (variable store, TPM state, QEMU's log);
    ``logs`` what is kept (serial log, screenshots)."""

    disk: Path  # qcow2, created by the caller
    disk_bus: str
    install_media: Path
    answer_media: Path | None
    firmware: Firmware
    accel: accel_mod.AccelChoice
    work: Path
    logs: Path
    timeout: float
    tpm: bool = False
    memory_mib: int = 4096
    cpus: int = 2
    network: bool = False
    boot_keys_seconds: float = 60.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageTime:
    name: str
    seconds: float  # since QEMU started


@dataclass(frozen=True)
class InstallResult:
    seconds: float
    resets: int
    stages: tuple[StageTime, ...]
    serial_log: Path
    tpm_model: str | None


# ---------------------------------------------------------------- the command lines


def _disk_args(plan: InstallPlan) -> list[str]:
    drive = f"if=none,id=disk0,file={plan.disk},format=qcow2,discard=unmap"
    if plan.disk_bus == "virtio":
        return ["-drive", drive, "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
    if plan.disk_bus == "scsi":
        return ["-drive", drive, "-device", "virtio-scsi-pci,id=scsi0",
                "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0"]
    return ["-drive", drive, "-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=0"]


def _media_args(plan: InstallPlan) -> list[str]:
    args = ["-drive", f"if=none,id=cd0,file={plan.install_media},format=raw,media=cdrom,readonly=on",
            "-device", "ide-cd,drive=cd0,bus=ide.1,bootindex=1"]
    if plan.answer_media is not None:
        args += ["-drive", f"if=none,id=cd1,file={plan.answer_media},format=raw,media=cdrom,readonly=on",
                 "-device", "ide-cd,drive=cd1,bus=ide.2"]
    return args


def _firmware_args(fw: Firmware, vars_copy: Path | None) -> list[str]:
    if fw.kind == "bios" or fw.code is None or vars_copy is None:
        return []
    args = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if fw.secure_boot:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def _cpu_args(choice: accel_mod.AccelChoice) -> list[str]:
    args = accel_mod.qemu_accel_args(choice)
    if choice.accel == "kvm":  # Hyper-V enlightenments: Windows runs much faster with them
        i = args.index("-cpu") + 1
        args[i] += ",hv_relaxed,hv_spinlocks=0x1fff,hv_vapic,hv_time"
    return args


def qemu_argv(plan: InstallPlan, qemu: str, vars_copy: Path | None, serial: Path, qmp_sock: Path,
              tpm_sock: Path | None) -> list[str]:
    if plan.disk_bus not in DISK_BUSES:
        raise ValueError(f"disk bus '{plan.disk_bus}' is not one of {', '.join(DISK_BUSES)}")
    machine = "q35,smm=on" if plan.firmware.secure_boot else "q35"
    argv = [qemu, "-name", "imagekit-windows", "-machine", machine, *_cpu_args(plan.accel),
            "-smp", str(plan.cpus), "-m", str(plan.memory_mib), "-nodefaults", "-display", "none", "-vga", "std",
            "-rtc", "base=localtime", *_firmware_args(plan.firmware, vars_copy),
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp_sock},server=on,wait=off",
            *_disk_args(plan), *_media_args(plan),
            "-nic", f"user,model=virtio-net-pci{'' if plan.network else ',restrict=on'}",
            "-device", "virtio-balloon-pci", "-device", "virtio-rng-pci", "-device", "virtio-serial-pci"]
    if tpm_sock is not None:
        argv += ["-chardev", f"socket,id=chrtpm,path={tpm_sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-crb,tpmdev=tpm0"]
    return argv


def swtpm_argv(state: Path, sock: Path) -> list[str]:
    return ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={sock}",
            "--log", f"file={state / 'swtpm.log'},level=1", "--terminate"]


# ---------------------------------------------------------------- watching


@dataclass
class _Watch:
    """What the run has seen so far."""

    serial: Path
    started: float
    offset: int = 0
    partial: str = ""
    resets: int = 0
    stages: list[StageTime] = field(default_factory=list)
    failed: str | None = None
    shutdown: dict[str, Any] | None = None
    last_key: float = 0.0

    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def read_serial(self, say: Say) -> None:
        try:
            with open(self.serial, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 20)
        except OSError:
            return
        if not data:
            return
        self.offset += len(data)
        text = self.partial + _ANSI_RE.sub("", data.decode("utf-8", errors="replace"))
        lines = re.split(r"\r\n|\r|\n", text)
        self.partial = lines.pop()
        for line in lines:
            m = _MARKER_RE.match(line)
            if not m:
                continue
            if m.group(1) == STAGE_MARKER:
                name = m.group(2)
                self.stages.append(StageTime(name, round(time.monotonic() - self.started, 1)))
                say(f"provisioning: {name}")
            elif self.failed is None:
                self.failed = m.group(2) or "(no message)"

    def take_events(self, qmp: Qmp, wait: float, say: Say) -> None:
        for ev in qmp.events(wait):
            name = ev.get("event")
            if name == "RESET":
                self.resets += 1
                say(f"Windows Setup: reboot {self.resets}")
            elif name == "SHUTDOWN" and self.shutdown is None:
                self.shutdown = ev.get("data") or {}


def _screendump(qmp: Qmp, logs: Path, name: str) -> Path | None:
    """A screenshot of the guest's screen (PNG, else PPM), or None when QEMU cannot take one."""
    for fmt in ("png", "ppm"):
        path = logs / f"{name}.{fmt}"
        try:
            args: dict[str, Any] = {"filename": str(path)}
            if fmt == "png":
                args["format"] = "png"
            qmp.command("screendump", timeout=20, **args)
        except QmpError as exc:
            log.info("screendump (%s): %s", fmt, exc.message)
            continue
        for _ in range(50):  # QEMU writes the file asynchronously on some versions
            if path.is_file() and path.stat().st_size > 0:
                return path
            time.sleep(0.1)
    return None


def _failure(plan: InstallPlan, qmp: Qmp | None, w: _Watch, message: str, hint: str,
             kind: type[InstallError] = InstallError) -> InstallError:
    shot = _screendump(qmp, plan.logs, "failure") if qmp is not None and not qmp.closed else None
    where = f"serial log {w.serial}" + (f", screenshot {shot}" if shot else "")
    done = ", ".join(w.stage_names()) or "none"
    return kind(f"{message} (stages seen: {done}; {w.resets} reboot(s))", f"{hint}; {where}",
                stages=w.stage_names(), screendump=shot, serial_log=w.serial)


def _press_boot_key(plan: InstallPlan, qmp: Qmp, w: _Watch) -> None:
    now = time.monotonic()
    if w.resets == 0 and now - w.started < plan.boot_keys_seconds and now - w.last_key >= BOOT_KEY_INTERVAL:
        w.last_key = now
        try:
            qmp.command("send-key", timeout=5, keys=[{"type": "qcode", "data": "ret"}])
        except QmpError as exc:
            log.debug("send-key: %s", exc.message)


def _watch(plan: InstallPlan, proc: Process, qmp: Qmp, w: _Watch, say: Say) -> None:
    """Until success (returns) or failure (raises InstallError)."""
    deadline = w.started + plan.timeout
    while True:
        _press_boot_key(plan, qmp, w)
        w.take_events(qmp, 0.5, say)
        w.read_serial(say)
        if w.failed is not None:
            raise _failure(plan, qmp, w, f"provisioning failed: {w.failed}",
                           "the provisioning script stopped; its message is above")
        if w.shutdown is not None:
            proc.wait(60)
            w.read_serial(say)
            if w.shutdown.get("guest") and SUCCESS_STAGE in w.stage_names():
                return
            why = "the guest powered off before sysprep" if w.shutdown.get("guest") else \
                f"QEMU was shut down ({w.shutdown.get('reason', 'unknown reason')})"
            raise _failure(plan, None, w, why, "Setup or the provisioning stopped early")
        if not proc.running():
            raise _failure(plan, None, w, f"QEMU ended unexpectedly: {proc.log_tail(5) or 'no message'}",
                           "see QEMU's message above")
        if time.monotonic() > deadline:
            raise _failure(plan, qmp, w, f"the install did not finish within {plan.timeout:g} s",
                           "the screenshot shows where it stopped; raise build.install_timeout if it was "
                           "only slow", InstallTimeout)


def _start_tpm(plan: InstallPlan, sockets: Path) -> tuple[Process, Path]:
    state = (plan.work / "tpm").resolve()
    state.mkdir(parents=True, exist_ok=True)
    sock = sockets / "tpm.sock"
    proc = Process(swtpm_argv(state, sock), log_path=plan.work / "swtpm.out", env=plan.env, stop_timeout=5).start()
    deadline = time.monotonic() + 15
    while not sock.exists():
        if not proc.running() or time.monotonic() > deadline:
            proc.stop()
            raise InstallError(f"swtpm did not start: {proc.log_tail(5) or 'no message'}",
                               "install swtpm (apt-get install swtpm swtpm-tools)")
        time.sleep(0.05)
    return proc, sock


def run(plan: InstallPlan, say: Say = lambda _m: None) -> InstallResult:
    """Run the install; InstallResult on success, InstallError (or InstallTimeout) otherwise."""
    qemu = accel_mod.qemu_system_binary()
    if qemu is None:
        raise ToolNotFound("qemu-system-x86_64 was not found", "install the qemu-system-x86 package")
    plan.work.mkdir(parents=True, exist_ok=True)
    plan.logs.mkdir(parents=True, exist_ok=True)
    vars_copy = None
    if plan.firmware.kind == "uefi" and plan.firmware.vars_template is not None:
        vars_copy = plan.work / "OVMF_VARS.fd"
        shutil.copyfile(plan.firmware.vars_template, vars_copy)
    serial = plan.logs / "serial.log"
    serial.write_bytes(b"")
    sockets = Path(tempfile.mkdtemp(prefix="imagekit-win-"))  # short: a socket path has at most 107 bytes
    procs: list[Process] = []
    qmp: Qmp | None = None
    try:
        tpm_sock = None
        if plan.tpm:
            tpm_proc, tpm_sock = _start_tpm(plan, sockets)
            procs.append(tpm_proc)
        argv = qemu_argv(plan, qemu, vars_copy, serial, sockets / "qmp.sock", tpm_sock)
        proc = Process(argv, log_path=plan.work / "qemu.log", env=plan.env, stop_timeout=15).start()
        procs.append(proc)
        w = _Watch(serial, time.monotonic())
        qmp = Qmp(sockets / "qmp.sock")
        qmp.connect(30, proc.running)
        tpm_model = _tpm_model(qmp) if plan.tpm else None
        say("QEMU started" + (f" (TPM {tpm_model})" if tpm_model else ""))
        _watch(plan, proc, qmp, w, say)
        return InstallResult(round(time.monotonic() - w.started, 1), w.resets, tuple(w.stages), serial, tpm_model)
    finally:
        if qmp is not None:
            qmp.close()
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        if vars_copy is not None:
            vars_copy.unlink(missing_ok=True)


def _tpm_model(qmp: Qmp) -> str | None:
    try:
        tpms = qmp.command("query-tpm", timeout=10) or []
    except QmpError as exc:
        raise InstallError(f"QEMU has no TPM: {exc.message}", "install swtpm and a QEMU with TPM support") from exc
    if not tpms:
        raise InstallError("QEMU reports no TPM device", "this is a bug in imagekit's QEMU command line")
    return str(tpms[0].get("model") or "") or None


def disk_create(path: Path, size: int) -> None:
    from imagekit import run as runner

    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
               timeout=120)
    os.chmod(path, 0o600)
