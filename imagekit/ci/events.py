"""``--events FILE``: what a CI command does, as JSON lines for CI log viewers and dashboards.

One JSON object per line, written and flushed as it happens (a job killed half-way leaves
every line up to then): ``{"ts": "...Z", "event": "stage.start", "unit": "debian-12",
"stage": "customise", ...}``. Events: ``run.start``, ``stage.start`` / ``stage.end``
(seconds, cached), ``progress`` (a message of the running stage), ``cache.pull`` /
``cache.push`` / ``cache.wait`` / ``cache.lease`` / ``cache.skip`` / ``cache.warning``
(the shared step cache), ``gate.upload`` / ``gate.boot`` / ``gate.end``,
``promote.cloud.start`` / ``promote.attempt`` / ``promote.cloud.end``, ``rotate.image``
and, last, ``result`` (ok, and the command's summary) or ``error``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imagekit.cache_remote import CacheEvent


@dataclass(frozen=True)
class Event:
    event: str
    unit: str | None = None
    stage: str | None = None
    message: str | None = None
    seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        doc: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": self.event}
        for k in ("unit", "stage", "message", "seconds"):
            v = getattr(self, k)
            if v is not None:
                doc[k] = v
        doc.update(self.data)
        return json.dumps(doc, default=str, sort_keys=False)


class EventLog:
    """Append events to a file (or nowhere: ``EventLog(None)``); safe from several threads."""

    def __init__(self, path: str | Path | None, unit: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.unit = unit
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()
        self._stage: str | None = None
        self.count = 0

    def __enter__(self) -> EventLog:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def emit(self, event: str, **kw: Any) -> None:
        data = kw.pop("data", {})
        kw.setdefault("unit", self.unit)
        self.write(Event(event, data=data, **kw))

    def write(self, ev: Event) -> None:
        with self._lock:
            self.count += 1
            if self._fh is not None:
                self._fh.write(ev.line() + "\n")
                self._fh.flush()

    def phase(self, stage: str, message: str) -> None:
        """A pipeline ``phase`` callback: ``stage.start`` on each new stage, then ``progress``."""
        if stage != self._stage:
            self._stage = stage
            self.emit("stage.start", stage=stage)
        self.emit("progress", stage=stage, message=message)

    def cache_event(self, ev: CacheEvent) -> None:
        """A shared-cache listener."""
        self.emit(f"cache.{ev.kind}", stage=ev.stage, seconds=ev.seconds or None,
                  message=ev.detail or None, data={"key": ev.key, "bytes": ev.bytes} if ev.bytes else {"key": ev.key})
