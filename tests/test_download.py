"""Verified downloads against a real HTTP server on 127.0.0.1: pinned checksum,
checksum file, mismatch (refused, nothing cached), interrupted download resumed,
trust on first use, unreachable URL."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from imagekit import download
from imagekit.specs import Source
from tests.http_fixture import FileServer


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    img = root / "base.qcow2"
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB of data
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True)
    srv = FileServer(root).start()
    try:
        yield srv
    finally:
        srv.stop()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cached_files() -> list[Path]:
    root = download.cache_root()
    return sorted(p for p in root.rglob("*") if p.is_file() and "partial" not in p.parts) if root.exists() else []


def test_pinned_checksum_then_cache_hit(server: FileServer) -> None:
    digest = sha256(server.root / "base.qcow2")
    src = Source(url=server.url("base.qcow2"), sha256=digest)
    first = download.fetch(src)
    assert not first.cached and first.digest == digest and sha256(first.path) == digest
    n = len(server.requests)
    second = download.fetch(src)
    assert second.cached and second.path == first.path
    assert len(server.requests) == n  # served from the cache: no request at all


@pytest.mark.parametrize("style", ["gnu", "bsd", "sha512"])
def test_checksum_file(server: FileServer, style: str) -> None:
    data = (server.root / "base.qcow2").read_bytes()
    if style == "gnu":
        text = f"{'0' * 64}  other.img\n{hashlib.sha256(data).hexdigest()} *base.qcow2\n"
    elif style == "bsd":
        text = f"SHA256 (base.qcow2) = {hashlib.sha256(data).hexdigest()}\n"
    else:
        text = f"{hashlib.sha512(data).hexdigest()}  base.qcow2\n"
    (server.root / "SUMS").write_text(text)
    got = download.fetch(Source(url=server.url("base.qcow2"), checksum_url=server.url("SUMS")))
    assert got.algo == ("sha512" if style == "sha512" else "sha256")
    assert got.path.read_bytes() == data


def test_mismatch_refused_and_nothing_cached(server: FileServer) -> None:
    src = Source(url=server.url("base.qcow2"), sha256="ab" * 32)
    with pytest.raises(download.ChecksumMismatch) as info:
        download.fetch(src)
    msg = info.value.message
    assert "does not match " + "ab" * 32 in msg and "pinned in the recipe" in msg and "deleted" in msg
    assert cached_files() == []
    assert not any((download.cache_root() / "partial").glob("*"))


def test_checksum_file_without_entry(server: FileServer) -> None:
    (server.root / "SUMS").write_text(f"{'0' * 64}  other.img\n")
    with pytest.raises(download.DownloadError, match="lists no checksum for base.qcow2"):
        download.fetch(Source(url=server.url("base.qcow2"), checksum_url=server.url("SUMS")))


def test_interrupted_download_resumes(server: FileServer) -> None:
    digest = sha256(server.root / "base.qcow2")
    src = Source(url=server.url("base.qcow2"), sha256=digest)
    server.cut_after["base.qcow2"] = 1_000_000
    with pytest.raises(download.DownloadError, match="connection closed after 1000000 of") as info:
        download.fetch(src)
    assert info.value.hint and "resumes where it stopped" in info.value.hint
    assert cached_files() == []  # nothing unverified in the cache
    got = download.fetch(src)
    assert got.resumed_from == 1_000_000 and sha256(got.path) == digest
    assert server.requests[-1] == ("base.qcow2", "bytes=1000000-")


def test_trust_on_first_use_then_enforced(server: FileServer) -> None:
    src = Source(url=server.url("base.qcow2"), trust="first-use")
    first = download.fetch(src)
    assert not first.cached
    # upstream changes the file: the recorded digest now refuses it
    (server.root / "base.qcow2").write_bytes(b"something else")
    download.cache_root().joinpath(first.algo, first.digest).unlink()
    with pytest.raises(download.ChecksumMismatch, match="recorded on first use"):
        download.fetch(src)


def test_unreachable_and_404(server: FileServer) -> None:
    with pytest.raises(download.DownloadError, match="answered 404"):
        download.fetch(Source(url=server.url("nope.img"), sha256="a" * 64))
    with pytest.raises(download.DownloadError, match="cannot connect"):
        download.fetch(Source(url="http://127.0.0.1:9/x.img", sha256="a" * 64))
