"""How long each stage of a recipe's last build took: the estimates of the build progress display.

Kept in ``paths.state_dir()/timings.json`` as ``{recipe: {"stages": {stage: seconds}, "updated":
ISO time}}``, for the most recently built recipes (at most :data:`KEEP`). Only stages that ran
are recorded: a cache hit says nothing about how long the work takes, so a stage taken from the
cache keeps the duration of its last real run. The file is rewritten whole under a temporary
name and renamed, under an ``flock`` (two builds at once do not lose each other's entries).
Estimates are a convenience: a missing, unreadable or malformed file reads as empty, and a
failure to write is logged, never raised.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from imagekit import paths

log = logging.getLogger("imagekit.timings")

KEEP = 200  # recipes remembered


class Timed(Protocol):
    """A finished stage: ``pipeline.StageResult`` is one."""

    @property
    def name(self) -> str: ...

    @property
    def seconds(self) -> float: ...

    @property
    def cached(self) -> bool: ...


def _file() -> Path:
    return paths.state_dir() / "timings.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def last(recipe: str) -> Mapping[str, float]:
    """stage -> seconds of the recipe's last real run of each stage (empty when never built)."""
    entry = _read(_file()).get(recipe)
    stages = entry.get("stages") if isinstance(entry, dict) else None
    if not isinstance(stages, dict):
        return {}
    return {k: float(v) for k, v in stages.items() if isinstance(k, str) and isinstance(v, int | float) and v >= 0}


def record(recipe: str, stages: Iterable[Timed]) -> None:
    """Remember the durations of the stages that ran (not taken from the cache)."""
    ran = {s.name: round(float(s.seconds), 2) for s in stages if not s.cached}
    if not ran:
        return
    path = _file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(".timings.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(path)
            old = data.get(recipe)
            merged = dict(old["stages"]) if isinstance(old, dict) and isinstance(old.get("stages"), dict) else {}
            merged.update(ran)
            data.pop(recipe, None)
            data[recipe] = {"stages": merged, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            data = dict(list(data.items())[-KEEP:])  # most recently built last
            tmp = path.with_name(f".timings.json.{os.getpid()}")
            try:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=False), encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not record the stage durations in %s: %s", path, exc)
