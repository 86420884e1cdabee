"""QEMU's two JSON sockets, for the clean shutdown of a snapshot guest.

- **QMP** (the monitor, ``-qmp unix:PATH,server=on,wait=off``): a greeting, then
  ``qmp_capabilities``, then commands; ``system_powerdown`` presses the ACPI power button.
- **QGA** (the guest agent, a virtio-serial port ``org.qemu.guest_agent.0``): no greeting;
  ``guest-sync`` with a random id skips stale replies, ``guest-shutdown`` powers the
  guest off from inside (and answers nothing when it works).

Both are one JSON object per line over a Unix socket; this module sends one command
at a time with a deadline and never blocks longer. (The ``qemu.qmp`` package speaks QMP
only, asynchronously; the few synchronous calls needed here, QGA included, fit in this
module.)
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from imagekit.errors import ImagekitError


class MonitorError(ImagekitError):
    """A QMP or guest agent socket did not answer as expected."""

    code = "qemu-monitor-failed"


class _JsonSocket:
    def __init__(self, path: Path, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        try:
            self.sock.settimeout(max(0.1, timeout))
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise MonitorError(f"cannot connect to {path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as exc:
            raise MonitorError(f"cannot send {obj.get('execute')}: {exc.strerror or exc}") from exc

    def receive(self) -> dict[str, Any]:
        """The next JSON object (QMP events included); MonitorError at the deadline."""
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise MonitorError("no answer before the deadline")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise MonitorError("no answer before the deadline") from exc
            except OSError as exc:
                raise MonitorError(f"the socket failed: {exc.strerror or exc}") from exc
            if not chunk:
                raise MonitorError("the socket was closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            obj = json.loads(line.lstrip(b"\xff"))  # QGA may send a 0xff sync delimiter
        except ValueError as exc:
            raise MonitorError(f"not JSON: {line[:80]!r}") from exc
        if not isinstance(obj, dict):
            raise MonitorError(f"not a JSON object: {line[:80]!r}")
        return obj

    def reply(self) -> dict[str, Any]:
        """The next reply (``return`` or ``error``), skipping QMP events."""
        while True:
            obj = self.receive()
            if "error" in obj:
                err = obj["error"]
                raise MonitorError(f"{err.get('class', 'error')}: {err.get('desc', err)}")
            if "return" in obj:
                return obj


def qmp_command(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Run one QMP ``command`` (after the greeting and ``qmp_capabilities``); its reply."""
    s = _JsonSocket(path, timeout)
    try:
        greeting = s.receive()
        if "QMP" not in greeting:
            raise MonitorError(f"{path} is not a QMP socket")
        s.send({"execute": "qmp_capabilities"})
        s.reply()
        s.send({"execute": command})
        return s.reply()
    finally:
        s.close()


def agent_shutdown(path: Path, timeout: float = 5.0) -> None:
    """Ask the guest agent to power the guest off. MonitorError when the agent does not answer."""
    s = _JsonSocket(path, timeout)
    try:
        token = random.randint(1, 2**31)  # noqa: S311 - a sync id, not a secret
        s.send({"execute": "guest-sync", "arguments": {"id": token}})
        while s.reply().get("return") != token:  # replies left from earlier calls are skipped
            pass
        s.send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
        # success sends nothing back (or the agent goes away); an error comes back at once
        s.deadline = time.monotonic() + 1.0
        try:
            obj = s.receive()
        except MonitorError:
            return
        if "error" in obj:
            err = obj["error"]
            raise MonitorError(f"guest-shutdown: {err.get('class', 'error')}: {err.get('desc', err)}")
    finally:
        s.close()
