"""A small client of QEMU's machine protocol (QMP) over a Unix socket.

QMP is newline-delimited JSON: a greeting, ``qmp_capabilities``, then commands answered
by ``return`` or ``error``, with asynchronous events (``RESET``, ``SHUTDOWN``...) in between.
The client keeps the events it reads while waiting for an answer, and hands them out with
:meth:`Qmp.events`. Every read is bounded by a deadline; a closed socket (QEMU exited)
ends the reads and is remembered (``closed``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagekit.errors import ImagekitError


class QmpError(ImagekitError):
    """QEMU's QMP socket could not be used or answered with an error."""

    code = "qmp-failed"


class Qmp:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.closed = False
        self._buf = b""
        self._events: list[dict[str, Any]] = []

    def connect(self, timeout: float, alive: Callable[[], bool]) -> dict[str, Any]:
        """Connect (retrying while QEMU starts and ``alive()`` holds), negotiate; the greeting."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError as exc:
                s.close()
                if not alive():
                    raise QmpError("QEMU ended before its QMP socket could be opened") from exc
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {self.path} did not open within {timeout:g} s") from exc
                time.sleep(0.1)
        self.sock = s
        greeting = self._read_message(deadline)
        if greeting is None or "QMP" not in greeting:
            raise QmpError("QEMU's QMP socket sent no greeting")
        self.command("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        return greeting

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    # ------------------------------------------------------------ reading

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout or a closed socket."""
        if self.sock is None or self.closed:
            return False
        wait = deadline - time.monotonic()
        if wait <= 0:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self._buf += data
        return True

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        while b"\n" not in self._buf:
            if not self._fill(deadline):
                return None
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            return self._read_message(deadline)
        return msg if isinstance(msg, dict) else None

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """The events received so far, waiting up to ``wait`` seconds for the first one."""
        deadline = time.monotonic() + wait
        while not self._events:
            msg = self._read_message(deadline)
            if msg is None:
                break
            if "event" in msg:
                self._events.append(msg)
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------ commands

    def command(self, name: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a command; its ``return`` value. QmpError on an error answer, a timeout or a closed socket."""
        if self.sock is None or self.closed:
            raise QmpError(f"QMP {name}: QEMU is not running")
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            self.closed = True
            raise QmpError(f"QMP {name}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer is None:
                raise QmpError(f"QMP {name}: no answer within {timeout:g} s" if not self.closed else
                               f"QMP {name}: QEMU closed the socket")
            if "event" in answer:
                self._events.append(answer)
                continue
            if "error" in answer:
                err = answer["error"]
                raise QmpError(f"QMP {name}: {err.get('desc', err)}")
            return answer.get("return")
