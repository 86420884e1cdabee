"""The build pipeline on a small cloud image served from 127.0.0.1 (no OS inside, no
customisation): stages, cache hits, --no-cache, the manifest, and a failed build
that leaves neither an output nor a cache entry."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from imagekit import accel, cache, pipeline
from imagekit import recipe as rec
from imagekit.download import ChecksumMismatch
from imagekit.errors import UnsafeImageError
from tests.http_fixture import FileServer


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    www = tmp_path / "www"
    www.mkdir()
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"imagekit" * (512 * 1024))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(www / "base.qcow2")],
                   check=True)
    srv = FileServer(www).start()
    try:
        yield srv
    finally:
        srv.stop()


def recipe_for(tmp: Path, srv: FileServer, sha: str, extra: str = "", base: str = "base.qcow2",
               declared: str | None = None) -> rec.Recipe:
    p = tmp / "tiny.yaml"
    p.write_text(
        "name: tiny\ndescription: tiny test image\nos: {type: linux, distro: debian, version: '12'}\n"
        f"build:\n  method: cloud-image\n  base: {{url: {srv.url(base)}, sha256: '{sha}'}}\n"
        + (f"  format: {declared}\n" if declared else "")
        + "disk_size: 64M\noutput: {compat: '0.10', cluster_size: 4K}\n" + extra)
    return rec.load(p)


def cached_entries() -> list[str]:
    return [e.stage or "?" for e in cache.entries()]


def options(**kw: bool) -> pipeline.BuildOptions:
    return pipeline.BuildOptions(accel=accel.resolve(), **kw)  # resolved once by the caller


def test_pipeline_cache_and_manifest(served: FileServer, tmp_path: Path) -> None:
    sha = hashlib.sha256((served.root / "base.qcow2").read_bytes()).hexdigest()
    r = recipe_for(tmp_path, served, sha)
    first = pipeline.build(r, tmp_path / "out1", options())
    assert [(s.name, s.cached) for s in first.stages] == [("build", False), ("customise", False),
                                                           ("convert", False), ("check", False)]
    out = Path(first.output.path)
    assert out.name == "tiny.qcow2" and first.verdict == "accept"
    assert first.output.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert first.output.virtual_size == 64 << 20 and first.output.compat == "0.10"
    m = json.loads(first.manifest.read_text())
    assert m["inputs"][0]["sha256"] == sha and m["recipe"]["digest"] == r.digest
    assert "error" in m["guest"]["os"]  # no OS in this image: recorded, not fatal without customise steps
    assert sorted(cached_entries()) == ["base", "convert", "customise"]

    again = pipeline.build(r, tmp_path / "out2", options())
    assert [s.cached for s in again.stages[:3]] == [True, True, True]
    assert again.output.sha256 == first.output.sha256

    changed = recipe_for(tmp_path, served, sha, "output: {compat: '1.1', cluster_size: 64K}\n")
    third = pipeline.build(changed, tmp_path / "out3", options())
    assert [s.cached for s in third.stages[:3]] == [True, True, False]  # only the conversion runs again

    fresh = pipeline.build(r, tmp_path / "out4", options(use_cache=False))
    assert not any(s.cached for s in fresh.stages)
    assert fresh.output.sha256 == first.output.sha256


def test_failed_build_leaves_no_output_or_cache(served: FileServer, tmp_path: Path) -> None:
    r = recipe_for(tmp_path, served, "0" * 64)
    with pytest.raises(ChecksumMismatch):
        pipeline.build(r, tmp_path / "out", options())
    assert cached_entries() == []
    assert not any((tmp_path / "out").iterdir())
    assert not any(p.name.startswith(".") for p in cache.root().iterdir())  # no half entries


def test_cache_prune(served: FileServer, tmp_path: Path, imagekit) -> None:
    sha = hashlib.sha256((served.root / "base.qcow2").read_bytes()).hexdigest()
    pipeline.build(recipe_for(tmp_path, served, sha), tmp_path / "out", options())
    env = {"IMAGEKIT_CACHE_DIR": str(tmp_path / "cache")}
    listed = imagekit("cache", "list", "--json", env=env).json()["entries"]
    assert len(listed) == 3 and {e["recipe"] for e in listed} == {"tiny"}  # type: ignore[union-attr]
    dry = imagekit("cache", "prune", "--recipe", "tiny", "--dry-run", env=env)
    assert dry.code == 0 and len(cached_entries()) == 3
    assert imagekit("cache", "prune", "--all", env=env).code == 0
    assert cached_entries() == []
    assert imagekit("cache", "prune", env=env).code == 2


def test_unsafe_or_mislabelled_base_is_refused(served: FileServer, tmp_path: Path) -> None:
    """The base passes the checksum but not the safety check (a backing-file reference), or its
    recipe declares another format: refused by the one check convert runs, nothing built."""
    hostile = served.root / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    str(hostile), "64M"], check=True)
    sha = hashlib.sha256(hostile.read_bytes()).hexdigest()
    with pytest.raises(UnsafeImageError) as exc:
        pipeline.build(recipe_for(tmp_path, served, sha, base="hostile.qcow2"), tmp_path / "out", options())
    assert exc.value.exit_code == 3
    assert "backing-file" in str(exc.value) and "failed the safety check" in str(exc.value)

    good = hashlib.sha256((served.root / "base.qcow2").read_bytes()).hexdigest()
    with pytest.raises(UnsafeImageError) as exc:
        pipeline.build(recipe_for(tmp_path, served, good, declared="raw"), tmp_path / "out", options())
    assert "format-mismatch" in str(exc.value)
    assert cached_entries() == []
    assert not any((tmp_path / "out").iterdir())


def test_failed_build_json_keeps_the_stages_that_ran(served: FileServer, tmp_path: Path, imagekit) -> None:
    """A build that fails in customise (this base has no OS for the hostname step) prints one --json
    document: the error, and the stages that ran before it (the base was built)."""
    from tests.json_contract import assert_document

    sha = hashlib.sha256((served.root / "base.qcow2").read_bytes()).hexdigest()
    recipe_for(tmp_path, served, sha, "customise:\n  - {op: hostname, hostname: web1}\n")
    res = imagekit("--json", "build", str(tmp_path / "tiny.yaml"), "--output-dir", str(tmp_path / "out"),
                   env={"IMAGEKIT_CACHE_DIR": str(tmp_path / "cache"), "IMAGEKIT_ACCEL": "tcg"})
    assert res.code == 1, res.err
    doc = assert_document("build", res.out)
    assert doc["ok"] is False and doc["error"]["message"]
    assert [s["name"] for s in doc["stages"]] == ["build"] and doc["recipe"] == "tiny"
