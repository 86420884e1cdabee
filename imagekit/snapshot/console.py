"""Reading a guest's serial console: the reporter's markers and a readable tail.

The console is either QEMU's serial log (followed as it grows: :class:`LogFollower`) or
a Nova console log (fetched whole each time). :func:`scan` finds the markers of one
boot (its nonce; see ``imagekit.snapshot.userdata``) anywhere in the text: a kernel
message may share a line with a marker, so the markers are searched, not matched per
line. :func:`tail` gives the last lines without terminal escapes, for error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
KEEP_BYTES = 1 << 20


@dataclass(frozen=True)
class CloudInitResult:
    """What the reporter said about cloud-init: ``status`` (``done``, ``error``, ...) and its errors."""

    status: str
    errors: tuple[str, ...] = ()
    datasource: str | None = None
    readable: bool = True  # False when result.json could not be decoded (the status still counts)

    @property
    def ok(self) -> bool:
        return self.status == "done" and not self.errors


@dataclass(frozen=True)
class Progress:
    """The markers of one boot found so far."""

    started: bool = False
    result: CloudInitResult | None = None
    generalising: bool = False
    generalised_rc: int | None = None


def _result(status: str, encoded: str) -> CloudInitResult:
    try:
        doc = json.loads(base64.b64decode(encoded, validate=True).decode()) if encoded else {}
        v1 = doc.get("v1", {}) if isinstance(doc, dict) else {}
        errors = tuple(str(e) for e in v1.get("errors", []) or [])
        ds = v1.get("datasource")
        return CloudInitResult(status, errors, str(ds) if ds else None, readable=bool(encoded))
    except (binascii.Error, ValueError, UnicodeDecodeError, AttributeError):
        return CloudInitResult(status, (), None, readable=False)


def scan(text: str, nonce: str) -> Progress:
    """The markers of the boot with ``nonce`` in ``text``."""
    n = re.escape(nonce)
    started = re.search(rf"IMAGEKIT-STARTED {n}\b", text) is not None
    m = re.search(rf"IMAGEKIT-RESULT {n} status=(\S*) result=([A-Za-z0-9+/=]*)", text)
    result = _result(m.group(1), m.group(2)) if m else None
    generalising = re.search(rf"IMAGEKIT-GENERALISING {n}\b", text) is not None
    g = re.search(rf"IMAGEKIT-GENERALISED {n} rc=(\d+)", text)
    return Progress(started or result is not None, result, generalising or g is not None,
                    int(g.group(1)) if g else None)


def clean(text: str) -> str:
    """Console text without terminal escapes, carriage returns and control characters."""
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


_RESULT_DATA = re.compile(r"(IMAGEKIT-RESULT \S+ status=\S*) result=[A-Za-z0-9+/=]+")


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` non-empty lines of a console, cleaned (the reporter's encoded result shortened)."""
    kept = [_RESULT_DATA.sub(r"\1 result=...", line.rstrip()) for line in clean(text).splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


class LogFollower:
    """Follows a growing console log through ``read(offset) -> bytes`` (``Process.read_log``),
    keeping the last ``KEEP_BYTES`` as text."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._offset = 0
        self._buf = b""

    def poll(self) -> bool:
        """Read what is new; True when something was."""
        got = False
        while chunk := self._read(self._offset):
            self._offset += len(chunk)
            self._buf = (self._buf + chunk)[-KEEP_BYTES:]
            got = True
        return got

    @property
    def text(self) -> str:
        return self._buf.decode(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return tail(self.text, lines)
