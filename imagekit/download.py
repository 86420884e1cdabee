"""Verified downloads into a content-addressed cache, with resume.

A recipe ``Source`` names a URL and how to verify it: a pinned ``sha256`` or
``sha512``, an upstream ``checksum_url`` (``SHA256SUMS`` / ``sha256sum.txt`` style
or BSD ``SHA256 (name) = hex``), or ``trust: first-use`` (the digest of the first
download is recorded in imagekit's state and enforced afterwards). Files land in
``<cache>/downloads/<algo>/<hex>``; an interrupted download keeps its partial
file and the next attempt resumes it with an HTTP Range request. A checksum
mismatch deletes the download and says which checksum differed; nothing
unverified ever enters the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit import paths
from imagekit.errors import ImagekitError
from imagekit.specs import Source

log = logging.getLogger("imagekit.download")

CHUNK = 1 << 20
TIMEOUT = 60.0
USER_AGENT = "imagekit (+https://docs.openstack.org/image-guide/)"
Progress = Callable[[int, int | None], None]


class DownloadError(ImagekitError):
    pass


class ChecksumMismatch(DownloadError):
    pass


@dataclass(frozen=True)
class Expected:
    algo: str  # sha256 | sha512
    digest: str | None  # None: first use (recorded after download)
    origin: str  # where the digest came from, for messages


@dataclass(frozen=True)
class Fetched:
    path: Path
    url: str
    algo: str
    digest: str
    size: int
    cached: bool
    resumed_from: int = 0


def cache_root() -> Path:
    return paths.cache_dir() / "downloads"


def _open(url: str, headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Any:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s)/file URLs from recipes
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: the server answered {exc.code} {exc.reason}",
                            "check the URL in the recipe; the upstream file may have moved") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason})",
                            "check the network, a proxy (https_proxy) or the URL") from exc


def parse_checksum_file(text: str, filename: str) -> tuple[str, str] | None:
    """(algo, hex) for ``filename`` from a GNU (``HEX  *name``) or BSD (``SHA256 (name) = HEX``) checksum file."""
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)$", line)
        if m:
            if os.path.basename(m.group(2)) == filename:
                return m.group(1).lower(), m.group(3).lower()
            continue
        m = re.match(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+[* ]?(.+)$", line)
        if m and os.path.basename(m.group(2).strip()) == filename:
            hexd = m.group(1).lower()
            return ("sha256" if len(hexd) == 64 else "sha512"), hexd
    return None


def _trust_file() -> Path:
    return paths.state_dir() / "trust-on-first-use.json"


def _trusted(url: str) -> tuple[str, str] | None:
    try:
        data = json.loads(_trust_file().read_text())
    except (OSError, ValueError):
        return None
    rec = data.get(url)
    return (rec["algo"], rec["digest"]) if isinstance(rec, dict) else None


def _record_trust(url: str, algo: str, digest: str) -> None:
    f = _trust_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        data = {}
    data[url] = {"algo": algo, "digest": digest, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, f)


def expected_digest(src: Source) -> Expected:
    if src.sha256:
        return Expected("sha256", src.sha256, "the sha256 pinned in the recipe")
    if src.sha512:
        return Expected("sha512", src.sha512, "the sha512 pinned in the recipe")
    if src.checksum_url:
        filename = os.path.basename(urllib.parse.urlparse(src.url).path)
        with _open(src.checksum_url) as resp:
            text = resp.read(4 << 20).decode("utf-8", errors="replace")
        found = parse_checksum_file(text, filename)
        if found is None:
            raise DownloadError(f"{src.checksum_url} lists no checksum for {filename}",
                                "the upstream release may have changed; check the recipe's URLs")
        return Expected(found[0], found[1], f"the checksum file {src.checksum_url}")
    trusted = _trusted(src.url)
    if trusted:
        return Expected(trusted[0], trusted[1], f"the digest recorded on first use in {_trust_file()}")
    return Expected("sha256", None, "first use")


def _partial_path(url: str) -> Path:
    return cache_root() / "partial" / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".part")


def fetch(src: Source, progress: Progress | None = None) -> Fetched:
    """Download ``src`` (or take it from the cache) and verify it; return the cached file."""
    exp = expected_digest(src)
    if exp.digest:
        final = cache_root() / exp.algo / exp.digest
        if final.exists():
            log.info("download cache hit for %s", src.url)
            return Fetched(final, src.url, exp.algo, exp.digest, final.stat().st_size, cached=True)
    part = _partial_path(src.url)
    part.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.new(exp.algo)
    have = part.stat().st_size if part.exists() else 0
    if have:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
    headers = {"Range": f"bytes={have}-"} if have else {}
    resumed_from = 0
    with _open(src.url, headers) as resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        if have and status == 206:
            resumed_from = have
            log.info("resuming %s at byte %d", src.url, have)
        elif have:
            have = 0
            hasher = hashlib.new(exp.algo)
        total = (int(length) + have) if length and length.isdigit() else None
        mode = "ab" if resumed_from else "wb"
        done = have
        try:
            with open(part, mode) as out:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except (OSError, TimeoutError) as exc:
            raise DownloadError(f"{src.url}: the download was interrupted after {done} bytes ({exc})",
                                "run the same command again: it resumes where it stopped") from exc
        if total is not None and done < total:
            raise DownloadError(f"{src.url}: the connection closed after {done} of {total} bytes",
                                "run the same command again: it resumes where it stopped")
    digest = hasher.hexdigest()
    if exp.digest and digest != exp.digest:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{src.url}: {exp.algo} {digest} does not match {exp.digest} from {exp.origin}; the download was deleted",
            "the file changed upstream or was tampered with; update the recipe only if you trust the new file",
        )
    final = cache_root() / exp.algo / digest
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    if exp.digest is None:
        _record_trust(src.url, exp.algo, digest)
        log.warning("trusting %s on first use: %s %s (recorded)", src.url, exp.algo, digest)
    return Fetched(final, src.url, exp.algo, digest, final.stat().st_size, cached=False, resumed_from=resumed_from)
