"""process.Process, for real: own session, log file, masked command line, stop() ending the whole
group (SIGKILL for one that ignores SIGTERM), the context manager, and detached processes found
again by PID file only while their command line still carries their identity."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from imagekit import process
from imagekit.process import Process


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_stop_ends_the_whole_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imagekit")
    child = tmp_path / "child.pid"
    log = tmp_path / "p.log"
    p = Process(["sh", "-c", f"sleep 600 & echo $! > {child}; echo started --token=s3cr3t-tok; wait"],
                log_path=log, secrets=["s3cr3t-tok"]).start()
    assert p.pid is not None and os.getsid(p.pid) == p.pid  # its own session
    assert wait_for(lambda: child.exists() and "started" in p.log_tail())
    grandchild = int(child.read_text())
    assert p.running()
    assert p.stop(timeout=5) is True
    assert not p.running() and p.returncode is not None
    assert wait_for(lambda: not alive(grandchild))
    assert "s3cr3t-tok" not in caplog.text and "****" in caplog.text
    assert "s3cr3t-tok" not in p.log_tail() and "****" in p.log_tail()  # the log file itself is the program's
    assert p.stop() is False  # stopping twice is harmless


def test_sigterm_ignored_then_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(600)"
    p = Process([sys.executable, "-c", code], log_path=tmp_path / "p.log", stop_timeout=1.0).start()
    assert wait_for(lambda: "ready" in p.log_tail())
    t = time.monotonic()
    assert p.stop() is True
    assert time.monotonic() - t < 8
    assert p.returncode == -9


def test_context_manager_always_stops(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Process(["sleep", "600"], log_path=tmp_path / "p.log") as p:
        pid = p.pid
        assert pid is not None and alive(pid)
        raise RuntimeError("boom")
    assert wait_for(lambda: not alive(pid))


def test_read_log_follows_output(tmp_path: Path) -> None:
    with Process(["sh", "-c", "echo one; sleep 0.3; echo two; sleep 600"], log_path=tmp_path / "p.log") as p:
        assert wait_for(lambda: b"two" in p.read_log(0))
        first = p.read_log(0)
        assert first.startswith(b"one\n") and p.read_log(len(b"one\n")).startswith(b"two")


def test_detached_process_is_found_by_pid_file_and_identity(tmp_path: Path) -> None:
    pid_file = tmp_path / "srv.pid"
    ident = f"imagekit-test-server:{tmp_path}"
    code = "import sys, time; time.sleep(600)"
    with Process([sys.executable, "-c", code, ident], log_path=tmp_path / "srv.log", detached=True,
                 pid_file=pid_file, identity=ident) as p:
        pid = p.pid
    assert pid is not None and alive(pid)  # a detached process outlives its context manager
    assert pid_file.read_text().strip() == str(pid)
    assert Process.attach(pid_file, "another-identity") is None  # never signalled under another identity
    found = Process.attach(pid_file, ident)
    assert found is not None and found.pid == pid and found.running()
    assert found.stop(timeout=5) is True
    assert wait_for(lambda: not process.is_alive(pid))
    assert not pid_file.exists()
    assert Process.attach(pid_file, ident) is None


def test_pid_file_of_a_recycled_pid_is_not_signalled(tmp_path: Path) -> None:
    pid_file = tmp_path / "srv.pid"
    with Process(["sleep", "600"], log_path=tmp_path / "other.log") as other:
        pid_file.write_text(f"{other.pid}\n")  # a PID that now belongs to an unrelated program
        assert Process.attach(pid_file, "imagekit-test-server:x") is None
        assert other.running()


def test_boot_follows_the_console_of_qemu(tmp_path: Path) -> None:
    """boot() runs QEMU as a Process and follows its serial console through the log file."""
    from imagekit import accel, boot

    if accel.qemu_system_binary() is None:
        pytest.skip("qemu-system is not installed")
    disk = tmp_path / "sector.raw"
    disk.write_bytes(accel.BOOT_SECTOR.ljust(1 << 20, b"\0"))
    console = tmp_path / "console.log"
    res = boot.boot(disk, "raw", timeout=8, wait_for="login", accel_name="tcg", console_log=console)
    assert not res.ok and res.reached == ()
    assert "IMAGEKIT-PROBE-OK" in res.console_tail and b"IMAGEKIT-PROBE-OK" in console.read_bytes()
    assert qemu_processes(str(disk)) == []  # QEMU was stopped


def qemu_processes(needle: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and needle.encode() in (d / "cmdline").read_bytes() and alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            continue
    return found
