"""The shared step cache: step-cache entries shared between machines (CI runners) through a store.

``imagekit.cache`` keeps this machine's entries; a :class:`SharedCache` puts them in a
store every runner reaches and takes them from it, so a base built by one runner is pulled
by the others instead of being built again. Stores: :class:`DirectoryStore` (a folder every
runner mounts) here and ``imagekit.ci.cache_oci.OciStore`` (an OCI registry through the
``oras`` SDK: GitLab's or GitHub's registry, Harbor, Quay, ``registry``).

What every store guarantees, and how:

- An entry is complete or absent. Its files are published first, its index (the list of
  files with their sha256 and the entry's metadata) last, in one step: the directory store
  renames a finished folder into place, the registry store PUTs the manifest (the tag names
  the entry only from then on). Readers look for the index only, and check every file
  against the digest the index gives while pulling: an entry that does not match is a miss.
- Two runners publishing one key never corrupt it: files are written under private
  temporary names (or content-addressed blobs) and the index in one atomic step; when an
  entry is already there the later runner keeps it.
- A runner killed mid-push leaves only data nobody refers to (a temporary folder, a blob
  upload session), never an index.

Avoiding duplicate work is separate from correctness: before building a key a runner
takes a *lease* on it, by Fischer's timed mutual exclusion (read: free; write own token;
wait ``settle`` seconds, longer than any runner takes between its read and its write;
read again: still its token means it holds the lease). The holder renews the lease
(a new token) every third of ``lease_ttl``; the others wait, pulling the entry as soon
as it appears. A lease whose token does not change for ``lease_ttl`` seconds of the
waiter's own clock belongs to a runner that died and is taken over (no clock is
compared between machines). A failed lease or store operation never fails a build: the
runner builds on its own and the problem is reported (``SharedCache.warnings``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from imagekit import cache
from imagekit.errors import ImagekitError

log = logging.getLogger("imagekit.cache_remote")

LEASE_TTL = 600.0
SETTLE = 1.0
POLL = 1.0
WAIT_TIMEOUT = 4 * 3600.0
INDEX = "index.json"


class SharedCacheError(ImagekitError):
    """The shared cache's store could not be read or written."""

    code = "shared-cache-failed"


# ---------------------------------------------------------------- what a store holds


@dataclass(frozen=True)
class EntryFile:
    path: str  # relative to the entry's folder
    sha256: str
    size: int


@dataclass(frozen=True)
class EntryIndex:
    """An entry as published: its files with their digests (the entry's ``meta.json`` among them)."""

    stage: str
    key: str
    files: tuple[EntryFile, ...]
    created: str
    runner: str

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Lease:
    owner: str  # the runner (host:pid:random)
    token: str  # new at every write: a renewal changes it


INDEX_JSON = TypeAdapter(EntryIndex)
LEASE_JSON = TypeAdapter(Lease)


class Store(Protocol):
    """Where shared entries, leases and small records live (one implementation per backend)."""

    @property
    def url(self) -> str: ...

    def index(self, stage: str, key: str) -> EntryIndex | None:
        """The published entry's index, or None (absent)."""
        ...

    def pull(self, index: EntryIndex, into: Path) -> None:
        """Write the entry's files into the folder ``into``; raise SharedCacheError when one does
        not match its digest or cannot be read."""
        ...

    def push(self, folder: Path, index: EntryIndex, replace: bool = False) -> bool:
        """Publish the files of ``folder`` as listed by ``index`` (index last); False when an entry
        with this key was already there (it is kept, unless ``replace``: a rebuild without the cache)."""
        ...

    def read_lease(self, name: str) -> Lease | None: ...

    def write_lease(self, name: str, lease: Lease) -> None: ...

    def delete_lease(self, name: str, lease: Lease) -> None:
        """Remove the lease if it still holds ``lease.token`` (another runner's is kept)."""
        ...

    def get_record(self, name: str) -> bytes | None:
        """A small document stored under ``name`` (``imagekit ci``'s unit records), or None."""
        ...

    def put_record(self, name: str, data: bytes) -> None: ...


# ---------------------------------------------------------------- helpers shared by the stores


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def index_of(folder: Path, stage: str, key: str, runner: str) -> EntryIndex:
    """The index of a local entry's folder (every regular file, sorted)."""
    files = tuple(EntryFile(str(p.relative_to(folder)), sha256_file(p), p.stat().st_size)
                  for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())
    return EntryIndex(stage, key, files, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runner)


def safe_relative(path: str) -> str:
    """``path`` when it stays inside an entry's folder; SharedCacheError otherwise (a hostile index)."""
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise SharedCacheError(f"the shared entry names a file outside its folder: {path!r}",
                               "the store holds something imagekit did not write; remove the entry")
    return str(p)


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def copy_file(src: Path, dst: Path) -> None:
    """Copy keeping holes (disk images are sparse), through a temporary name."""
    from imagekit.run import run

    dst.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], timeout=3600)


# ---------------------------------------------------------------- the directory store


class DirectoryStore:
    """A folder every runner mounts: ``entries/<stage>-<key>/`` (files + ``index.json``),
    ``leases/``, ``records/``, and ``tmp/`` for pushes in progress (never read)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return f"file://{self.root.resolve()}"

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / "entries" / f"{stage}-{key}"

    def index(self, stage: str, key: str) -> EntryIndex | None:
        path = self._entry(stage, key) / INDEX
        try:
            idx = INDEX_JSON.validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("shared entry %s is unreadable, ignored: %s", path.parent, exc)
            return None
        return idx if (idx.stage, idx.key) == (stage, key) else None

    def pull(self, index: EntryIndex, into: Path) -> None:
        src = self._entry(index.stage, index.key)
        for f in index.files:
            rel = safe_relative(f.path)
            try:
                copy_file(src / rel, into / rel)
            except ImagekitError as exc:
                raise SharedCacheError(f"cannot copy {src / rel}: {exc.message}") from exc
            if sha256_file(into / rel) != f.sha256:
                raise SharedCacheError(f"{src / rel} does not match the digest its index gives",
                                       "the shared entry was altered; it is ignored")

    def push(self, folder: Path, index: EntryIndex, replace: bool = False) -> bool:
        final = self._entry(index.stage, index.key)
        if (final / INDEX).exists() and not replace:
            return False
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{index.stage}-{index.key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            for f in index.files:
                copy_file(folder / f.path, tmp / f.path)
            _write_synced(tmp / INDEX, INDEX_JSON.dump_json(index, indent=2))  # the index last
            if replace and final.exists():  # absent for a moment (a miss for readers), never mixed
                old = tmp_root / f"old-{index.stage}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)  # atomic; fails when another runner's entry is there
            except OSError:
                if (final / INDEX).exists():
                    return False
                shutil.rmtree(final, ignore_errors=True)  # a folder without index: not an entry
                os.rename(tmp, final)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _lease_path(self, name: str) -> Path:
        return self.root / "leases" / f"{name}.json"

    def read_lease(self, name: str) -> Lease | None:
        try:
            return LEASE_JSON.validate_json(self._lease_path(name).read_bytes())
        except (OSError, ValidationError):
            return None

    def write_lease(self, name: str, lease: Lease) -> None:
        _write_atomic(self._lease_path(name), LEASE_JSON.dump_json(lease))

    def delete_lease(self, name: str, lease: Lease) -> None:
        cur = self.read_lease(name)
        if cur is not None and cur.token == lease.token:
            self._lease_path(name).unlink(missing_ok=True)

    def get_record(self, name: str) -> bytes | None:
        try:
            return (self.root / "records" / f"{name}.json").read_bytes()
        except OSError:
            return None

    def put_record(self, name: str, data: bytes) -> None:
        _write_atomic(self.root / "records" / f"{name}.json", data)

    def prune_tmp(self, older_than: float = cache.LEFTOVER_SECONDS) -> int:
        """Remove pushes abandoned by runners that died (older than ``older_than`` seconds)."""
        n = 0
        tmp_root = self.root / "tmp"
        for d in tmp_root.iterdir() if tmp_root.is_dir() else ():
            if time.time() - d.stat().st_mtime > older_than:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the shared cache


@dataclass(frozen=True)
class CacheEvent:
    """What the shared cache did, for event logs: ``pull``, ``push``, ``wait`` (for another
    runner's lease), ``lease`` (taken), ``skip`` (an entry was already there), ``warning``."""

    kind: str
    stage: str
    key: str
    seconds: float = 0.0
    bytes: int = 0
    detail: str = ""


Listener = Callable[[CacheEvent], None]


@dataclass
class Slot:
    """One stage's turn with the shared cache: ``found`` (pulled into the local cache) or the
    lease to build it, ended by ``publish``."""

    found: tuple[cache.Entry, Any] | None
    publish: Callable[[cache.Entry], None] = lambda _e: None


def _keep(_entry: cache.Entry) -> None:
    return None


class _NotUsable(Exception):
    """A pulled entry that is not this imagekit's (its result does not decode): a miss."""


@dataclass
class SharedCache:
    """The step cache shared through ``store``; see the module documentation."""

    store: Store
    runner: str = field(default_factory=runner_id)
    lease_ttl: float = LEASE_TTL
    settle: float = SETTLE
    poll: float = POLL
    wait_timeout: float = WAIT_TIMEOUT
    listener: Listener | None = None
    warnings: list[str] = field(default_factory=list)
    _seen: dict[str, tuple[str, float]] = field(default_factory=dict)

    def _say(self, event: CacheEvent) -> None:
        if event.kind == "warning":
            self.warnings.append(event.detail)
            log.warning("shared cache: %s", event.detail)
        if self.listener is not None:
            self.listener(event)

    @contextlib.contextmanager
    def slot(self, stage: str, key: str, result_type: Any, *, lookup: bool = True) -> Iterator[Slot]:
        """Pull ``stage``/``key`` (waiting while another runner holds its lease), or hold the
        lease while the caller builds it; ``Slot.publish`` pushes what was built."""
        name = f"{stage}-{key}"
        found, lease = self._find_or_lease(stage, key, result_type, lookup)
        if found is not None or lease is None:
            # found: nothing to publish; no lease (the store failed, or waited too long): publish anyway
            yield Slot(found, _keep if found is not None else lambda e: self._publish(e, replace=not lookup))
            return
        held = [lease]  # the newest token, renewed by the heartbeat
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(name, held, stop), daemon=True)
        beat.start()
        try:
            yield Slot(None, lambda entry: self._publish(entry, replace=not lookup))
        finally:
            stop.set()
            beat.join(timeout=30)
            self._quietly("release the lease", lambda: self.store.delete_lease(name, held[0]))

    def _find_or_lease(self, stage: str, key: str, result_type: Any,
                       lookup: bool) -> tuple[tuple[cache.Entry, Any] | None, Lease | None]:
        name = f"{stage}-{key}"
        deadline = time.monotonic() + self.wait_timeout
        waited = time.monotonic()
        announced = False
        while True:
            if lookup:
                hit = self._pull(stage, key, result_type)
                if hit is not None:
                    return hit, None
            try:
                lease = self._try_lease(name)
            except SharedCacheError as exc:
                self._say(CacheEvent("warning", stage, key, detail=f"no lease, building anyway: {exc.message}"))
                return None, None
            if lease is not None:
                hit = self._pull(stage, key, result_type) if lookup else None
                if hit is not None:  # published by the previous holder while we settled
                    self._quietly("release the lease", functools.partial(self.store.delete_lease, name, lease))
                    return hit, None
                self._say(CacheEvent("lease", stage, key, round(time.monotonic() - waited, 2)))
                return None, lease
            if not announced:
                holder = self.store.read_lease(name)
                self._say(CacheEvent("wait", stage, key, detail=holder.owner if holder else ""))
                announced = True
            if time.monotonic() > deadline:
                self._say(CacheEvent("warning", stage, key, detail="waited too long for another runner, building"))
                return None, None
            time.sleep(self.poll)

    def _try_lease(self, name: str) -> Lease | None:
        """Fischer's algorithm: free (or dead) -> write ours -> wait ``settle`` -> still ours?"""
        cur = self.store.read_lease(name)
        if cur is not None and cur.owner != self.runner and not self._dead(name, cur):
            return None
        mine = Lease(self.runner, uuid.uuid4().hex)
        self.store.write_lease(name, mine)
        time.sleep(self.settle)
        cur = self.store.read_lease(name)
        return mine if cur is not None and cur.token == mine.token else None

    def _dead(self, name: str, lease: Lease) -> bool:
        """True once the same token has been seen for ``lease_ttl`` seconds (this runner's clock)."""
        now = time.monotonic()
        token, since = self._seen.get(name, ("", now))
        if token != lease.token:
            self._seen[name] = (lease.token, now)
            return False
        return now - since > self.lease_ttl

    def _heartbeat(self, name: str, held: list[Lease], stop: threading.Event) -> None:
        """Renew the lease (a new token) every third of the TTL while the build runs."""
        while not stop.wait(self.lease_ttl / 3):
            try:
                cur = self.store.read_lease(name)
                if cur is None or cur.token != held[0].token:
                    log.warning("shared cache: lost the lease on %s", name)
                    return
                renewed = Lease(self.runner, uuid.uuid4().hex)
                self.store.write_lease(name, renewed)
                held[0] = renewed
            except (SharedCacheError, OSError) as exc:
                log.warning("shared cache: cannot renew the lease on %s: %s", name, exc)

    def _pull(self, stage: str, key: str, result_type: Any) -> tuple[cache.Entry, Any] | None:
        try:
            idx = self.store.index(stage, key)
        except SharedCacheError as exc:
            self._say(CacheEvent("warning", stage, key, detail=f"cannot read the shared cache: {exc.message}"))
            return None
        if idx is None:
            return None
        t = time.monotonic()
        try:
            with cache.new_entry(stage, key) as tmp:
                self.store.pull(idx, tmp.dir)
                meta = tmp.meta()
                if meta.key != key:
                    raise _NotUsable(f"its metadata names key {meta.key[:12]}")
                cache.decode(result_type, meta.result)
        except (_NotUsable, ValueError, cache.CacheError) as exc:
            self._say(CacheEvent("warning", stage, key, detail=f"shared entry not usable here: {exc}"))
            return None
        except SharedCacheError as exc:
            self._say(CacheEvent("warning", stage, key, detail=exc.message))
            return None
        self._say(CacheEvent("pull", stage, key, round(time.monotonic() - t, 2), idx.bytes))
        return cache.lookup(stage, key, result_type)

    def _publish(self, entry: cache.Entry, replace: bool = False) -> None:
        t = time.monotonic()
        idx = index_of(entry.dir, entry.stage, entry.key, self.runner)
        try:
            pushed = self.store.push(entry.dir, idx, replace)
        except SharedCacheError as exc:
            self._say(CacheEvent("warning", entry.stage, entry.key, detail=f"push failed: {exc.message}"))
            return
        self._say(CacheEvent("push" if pushed else "skip", entry.stage, entry.key, round(time.monotonic() - t, 2),
                             idx.bytes if pushed else 0))

    def _quietly(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (SharedCacheError, OSError) as exc:
            log.warning("shared cache: cannot %s: %s", what, exc)

    def has(self, stage: str, key: str) -> EntryIndex | None:
        """The published entry's index (None: absent, or the store cannot be read: a warning)."""
        try:
            return self.store.index(stage, key)
        except SharedCacheError as exc:
            self._say(CacheEvent("warning", stage, key, detail=f"cannot read the shared cache: {exc.message}"))
            return None
