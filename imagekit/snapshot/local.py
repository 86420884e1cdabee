"""The local snapshot workflow: provision a guest under QEMU, generalise it, keep its disk.

:func:`provision` takes a base image (checked by the caller) and:

1. makes a copy-on-write overlay on it (``qemu-img create -b``; grown to the recipe's disk
   size, cloud-init's growpart grows the root file system at boot) and a NoCloud seed
   carrying the composed user-data (``imagekit.snapshot.userdata``);
2. boots it under QEMU (an ``imagekit.process.Process`` tagged with the work folder, the
   serial console in a log file, QMP and the guest agent on Unix sockets, user-mode
   networking so that packages can be installed);
3. follows the console: ``IMAGEKIT-STARTED`` within ``boot`` seconds, cloud-init's outcome
   within ``provision`` seconds, the guest generalised within ``generalise`` seconds; a
   cloud-init error, a timeout or QEMU ending early raise with the console's last lines;
4. shuts the guest down cleanly: the ACPI power button (QMP ``system_powerdown``), then the
   guest agent's ``guest-shutdown``, each given ``shutdown`` seconds; a guest that ignores
   both is an error (its disk would only be crash-consistent);
5. flattens the overlay into ``out`` (qcow2, no backing file; written under a temporary name).

QEMU is stopped whatever happens (the Process context); the overlay and the seed live in
the caller's work folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagekit import accel as accel_mod
from imagekit import boot
from imagekit import run as runner
from imagekit.process import Process
from imagekit.snapshot import console
from imagekit.snapshot.errors import ProvisionFailed, ProvisionTimeout, ShutdownFailed, SnapshotError
from imagekit.snapshot.monitor import MonitorError, agent_shutdown, qmp_command
from imagekit.snapshot.userdata import UserData

log = logging.getLogger("imagekit.snapshot")

POLL = 0.5
Say = Callable[[str], None]


@dataclass(frozen=True)
class Timeouts:
    """Seconds: QEMU start to the reporter's start, its start to cloud-init's end, generalisation,
    and each shutdown attempt (ACPI, then the guest agent)."""

    boot: float = 600.0
    provision: float = 1800.0
    generalise: float = 300.0
    shutdown: float = 120.0


@dataclass(frozen=True)
class Guest:
    """How to boot: the base disk, the user-data, the VM's size and network, the accelerator."""

    base: Path
    base_format: str
    user_data: UserData
    accel: accel_mod.AccelChoice
    disk_bytes: int = 0  # grow the overlay to this size (0: keep the base's)
    memory_mib: int = 1024
    cpus: int = 1
    network: bool = True
    hostname: str = "imagekit-snapshot"


@dataclass(frozen=True)
class LocalResult:
    boot_seconds: float
    provision_seconds: float
    generalise_seconds: float
    shutdown_seconds: float
    shutdown: str  # "acpi" or "agent"
    cloud_init: console.CloudInitResult
    console_log: Path


def _fail(cls: type[SnapshotError], what: str, follower: console.LogFollower, hint: str) -> SnapshotError:
    return cls(f"{what}\n--- console (last lines) ---\n{follower.tail(30)}", hint)


def _overlay(guest: Guest, work: Path) -> Path:
    overlay = work / "overlay.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", guest.base_format, "-b", str(guest.base.resolve()),
            str(overlay)]
    if guest.disk_bytes:
        info = runner.run(["qemu-img", "info", "--output=json", "-f", guest.base_format, str(guest.base)],
                          timeout=60)
        if guest.disk_bytes > int(json.loads(info.stdout)["virtual-size"]):
            argv.append(str(guest.disk_bytes))
    runner.run(argv, timeout=60)
    return overlay


def _socket_dir(work: Path) -> Path:
    """Unix socket paths are limited to 107 bytes: a short folder when the work folder's is long."""
    if len(str(work / "qmp.sock")) < 100:
        return work
    return Path(tempfile.mkdtemp(prefix="ik-snap-", dir="/tmp"))


def _argv(guest: Guest, overlay: Path, seed: Path, sockets: Path) -> list[str]:
    qemu = accel_mod.qemu_system_binary()
    if qemu is None:
        raise SnapshotError("qemu-system is not installed", "run 'make setup'")
    extra = (
        "-qmp", f"unix:{sockets / 'qmp.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={sockets / 'qga.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-device", "virtio-rng-pci",
    )
    return boot.qemu_argv(qemu, guest.accel, f"file={overlay},format=qcow2,if=virtio,discard=unmap", seed,
                          memory_mib=guest.memory_mib, cpus=guest.cpus, network=guest.network, extra=extra)


def _wait(proc: Process, follower: console.LogFollower, nonce: str, deadline: float,
          reached: Callable[[console.Progress], bool]) -> console.Progress | None:
    """Poll the console until ``reached`` (the progress), QEMU ends (None) or the deadline (None)."""
    while True:
        follower.poll()
        progress = console.scan(follower.text, nonce)
        if reached(progress):
            return progress
        if not proc.running() or time.monotonic() > deadline:
            follower.poll()
            return None
        time.sleep(POLL)


def _ended(proc: Process) -> str:
    return f"QEMU ended (status {proc.poll()})" if not proc.running() else ""


def _follow(proc: Process, follower: console.LogFollower, guest: Guest, t: Timeouts,
            say: Say) -> tuple[console.CloudInitResult, list[float]]:
    """Steps 3 of the module documentation; the cloud-init result and the times of each stage."""
    nonce = guest.user_data.nonce
    marks = [time.monotonic()]
    say(f"booting under QEMU ({guest.accel.accel}), waiting for cloud-init")
    if _wait(proc, follower, nonce, marks[0] + t.boot, lambda p: p.started) is None:
        raise _fail(ProvisionTimeout, _ended(proc) or f"the guest did not start cloud-init within {t.boot:g} s",
                    follower, "the image needs cloud-init with the NoCloud datasource enabled; "
                    "on a slow host (TCG) raise timeouts.boot")
    marks.append(time.monotonic())
    say("cloud-init is provisioning the guest")
    progress = _wait(proc, follower, nonce, marks[-1] + t.provision, lambda p: p.result is not None)
    if progress is None or progress.result is None:
        raise _fail(ProvisionTimeout, _ended(proc) or f"provisioning did not finish within {t.provision:g} s "
                    "(cloud-init still running: a command that waits for input or never ends?)",
                    follower, "raise timeouts.provision if it only needs more time")
    result = progress.result
    if not result.ok:
        errors = "; ".join(result.errors) or "no error text (see the console)"
        raise _fail(ProvisionFailed, f"cloud-init reported status '{result.status}': {errors}", follower,
                    "fix the provision section (its failing command's output is in the console above)")
    marks.append(time.monotonic())
    say("generalising the guest (cloud-init clean, machine-id, SSH host keys, logs)")
    done = _wait(proc, follower, nonce, marks[-1] + t.generalise, lambda p: p.generalised_rc is not None)
    if done is None:
        raise _fail(ProvisionTimeout, _ended(proc) or f"generalising did not finish within {t.generalise:g} s",
                    follower, "raise timeouts.generalise")
    if done.generalised_rc != 0:
        raise _fail(ProvisionFailed, f"generalising the guest failed (status {done.generalised_rc})", follower,
                    "the guest's cloud-init clean failed; see the console")
    marks.append(time.monotonic())
    return result, marks


def shutdown(proc: Process, sockets: Path, timeout: float, say: Say) -> str:
    """ACPI power button, then the guest agent, each given ``timeout`` s; the one that worked.

    ShutdownFailed when the guest ignores both (QEMU is then left to the caller to kill)."""
    tried: list[str] = []
    used = "guest"  # the guest powered itself off before being asked
    for method, action in (("acpi", lambda: qmp_command(sockets / "qmp.sock", "system_powerdown")),
                           ("agent", lambda: agent_shutdown(sockets / "qga.sock"))):
        if not proc.running():
            break
        say(f"shutting the guest down ({'ACPI power button' if method == 'acpi' else 'guest agent'})")
        used = method
        try:
            action()
        except MonitorError as exc:
            log.info("shutdown through %s failed: %s", method, exc.message)
            tried.append(f"{method}: {exc.message}")
            continue
        proc.wait(timeout)
        if proc.running():
            tried.append(f"{method}: the guest was still running after {timeout:g} s")
    if proc.running():
        raise ShutdownFailed("the guest did not shut down: " + "; ".join(tried),
                             "the image needs ACPI power button handling (systemd-logind or acpid) or a running "
                             "qemu-guest-agent; raise timeouts.shutdown for a slow shutdown")
    status = proc.poll()
    if status not in (0, None):
        raise ShutdownFailed(f"QEMU ended with status {status} while the guest shut down")
    return used


def flatten(overlay: Path, out: Path) -> None:
    """The overlay and its base as one qcow2 without a backing file, at ``out`` (atomically)."""
    part = out.with_name(f".{out.name}.part")
    try:
        runner.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(overlay), str(part)],
                   timeout=3 * 3600)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)


def provision(guest: Guest, out: Path, work: Path, console_log: Path, *, timeouts: Timeouts | None = None,
              env: dict[str, str] | None = None, say: Say = lambda _m: None) -> LocalResult:
    """Boot, provision, generalise and shut down ``guest``; write its disk to ``out``."""
    t = timeouts or Timeouts()
    overlay = _overlay(guest, work)
    seed = boot.nocloud_seed(work / "seed.iso", guest.hostname, user_data=guest.user_data.text,
                             instance_id=f"imagekit-{guest.user_data.nonce}")
    sockets = _socket_dir(work)
    console_log.unlink(missing_ok=True)
    try:
        with Process(_argv(guest, overlay, seed, sockets), log_path=console_log, env=env) as proc:
            follower = console.LogFollower(proc.read_log)
            result, marks = _follow(proc, follower, guest, t, say)
            method = shutdown(proc, sockets, t.shutdown, say)
            marks.append(time.monotonic())
    finally:
        if sockets != work:
            for name in ("qmp.sock", "qga.sock"):
                (sockets / name).unlink(missing_ok=True)
            sockets.rmdir()
    say("writing the provisioned disk")
    flatten(overlay, out)
    laps = [round(b - a, 1) for a, b in zip(marks, marks[1:], strict=False)]
    return LocalResult(laps[0], laps[1], laps[2], laps[3], method, result, console_log)
