"""The step cache: one folder per stage output, found again by a key of everything it depends on.

``<cache>/steps/<stage>-<key[:32]>/`` holds ``artifact`` (the image), side files (build
logs) and ``meta.json`` (:class:`EntryMeta`: stage, key, recipe, the inputs the key was
made of, the stage's typed result as JSON, when it was created).

An entry is complete or absent. :func:`new_entry` fills a temporary folder
(``.<stage>-XXXX``) and renames it into place only when the block producing it ended
without an exception *and* wrote the metadata; otherwise the folder is removed. An entry
whose metadata cannot be read as the type asked for is a miss, and is replaced.

A stage's result (a dataclass) goes into the metadata with :func:`encode` and comes back
as the same dataclass with :func:`decode` (pydantic reads the dataclass' annotations).

The metadata's modification time is the entry's last use (:func:`lookup` touches it);
:func:`prune` removes entries unused for a while, those of a recipe, or all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from imagekit import paths
from imagekit.errors import ImagekitError

T = TypeVar("T")
LEFTOVER_SECONDS = 3600  # temporary folders older than this belong to runs that died


class CacheError(ImagekitError):
    code = "cache-failed"


def root() -> Path:
    return paths.cache_dir() / "steps"


def digest(*parts: Any) -> str:
    """A cache key: the SHA-256 of the parts as canonical JSON."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


_adapters: dict[Any, TypeAdapter[Any]] = {}


def _adapter(tp: Any) -> TypeAdapter[Any]:
    if tp not in _adapters:
        _adapters[tp] = TypeAdapter(tp)
    return _adapters[tp]


def encode(result: Any) -> Any:
    """A stage result (a dataclass) as JSON-able data."""
    return _adapter(type(result)).dump_python(result, mode="json")


def decode(tp: Any, data: Any) -> Any:
    """``data`` (from :func:`encode`) as an instance of ``tp`` again; ValueError when it does not fit."""
    return _adapter(tp).validate_python(data)


@dataclass(frozen=True)
class EntryMeta:
    stage: str
    key: str
    recipe: str
    inputs: dict[str, Any]
    result: Any  # the stage's result, encoded
    created: str


_META = TypeAdapter(EntryMeta)


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    dir: Path

    @property
    def artifact(self) -> Path:
        return self.dir / "artifact"

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def meta(self) -> EntryMeta:
        """The entry's metadata; ValueError when it is not (or no longer) imagekit's format."""
        try:
            return _META.validate_json(self.meta_path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ValueError(f"{self.meta_path}: {exc}") from exc

    def write_meta(self, meta: EntryMeta) -> None:
        self.meta_path.write_bytes(_META.dump_json(meta, indent=2))


def entry(stage: str, key: str) -> Entry:
    """Where the entry of ``stage`` and ``key`` is (or would be)."""
    return Entry(stage, key, root() / f"{stage}-{key[:32]}")


def lookup(stage: str, key: str, result_type: Any) -> tuple[Entry, Any] | None:
    """The entry and its result (as ``result_type``), or None when absent or unreadable."""
    e = entry(stage, key)
    if not e.artifact.exists():
        return None
    try:
        meta = e.meta()
        if meta.key != key:
            return None
        result = decode(result_type, meta.result)
    except ValueError:
        return None
    with contextlib.suppress(OSError):
        os.utime(e.meta_path)  # last used, for pruning
    return e, result


@contextlib.contextmanager
def new_entry(stage: str, key: str) -> Iterator[Entry]:
    """A new entry, filled by the block in a temporary folder; in place only when complete.

    The block writes ``artifact`` and calls ``write_meta``. If it raises (anything,
    KeyboardInterrupt included) or writes no metadata, nothing is left behind. An entry
    already there with the same key is replaced.
    """
    final = entry(stage, key)
    root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=root()))
    try:
        yield Entry(stage, key, tmp)
        if not (tmp / "meta.json").is_file():
            raise CacheError(f"the {stage} stage wrote no cache metadata", "this is a bug in imagekit")
        if final.dir.exists():
            shutil.rmtree(final.dir)
        os.replace(tmp, final.dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- listing and pruning


@dataclass(frozen=True)
class EntryInfo:
    entry: str  # the folder's name
    stage: str | None
    recipe: str | None
    created: str | None
    last_used: str
    disk_bytes: int
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _info(d: Path) -> EntryInfo:
    try:
        meta: EntryMeta | None = Entry("", "", d).meta()
    except ValueError:
        meta = None  # another version's entry: listed, prunable, never used
    size = sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())
    used = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((d / "meta.json").stat().st_mtime))
    return EntryInfo(d.name, meta.stage if meta else None, meta.recipe if meta else None,
                     meta.created if meta else None, used, size, str(d))


def entries() -> list[EntryInfo]:
    """Every complete entry, by folder name."""
    r = root()
    if not r.is_dir():
        return []
    return [_info(d) for d in sorted(r.iterdir()) if not d.name.startswith(".") and (d / "meta.json").exists()]


def prune(*, older_than: float | None = None, recipe: str | None = None, everything: bool = False,
          dry_run: bool = False) -> list[EntryInfo]:
    """Remove entries: all, those of ``recipe``, or those unused for ``older_than`` seconds.

    Returns what was (with ``dry_run``: would be) removed. Temporary folders of runs that
    died are removed too (not listed).
    """
    now = time.time()
    removed = []
    for e in entries():
        p = Path(e.path)
        unused = now - (p / "meta.json").stat().st_mtime
        if everything or (recipe and e.recipe == recipe) or (older_than is not None and unused > older_than):
            removed.append(e)
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
    r = root()
    if not dry_run and r.is_dir():
        for d in r.iterdir():
            if d.name.startswith(".") and now - d.stat().st_mtime > LEFTOVER_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
    return removed
