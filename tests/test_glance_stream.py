"""Streaming publish to the real local Glance: ``upload --convert`` sends the qcow2 as it is written.

* the scratch space (the work folders under IMAGEKIT_CACHE_DIR and TMPDIR) is a 4 MiB tmpfs, far smaller
  than the image: a scratch copy of the image could not be written there, and the upload succeeds;
* Glance keeps the image only when its size and hash match: the stored bytes are the very bytes
  ``imagekit convert`` writes for the same input (the writer is deterministic), downloaded back and hashed;
* with ``tee`` (what ``build --upload`` does) the same bytes also land in a verified local file;
* a Glance killed mid-stream leaves no active image.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imagekit import convert as conv
from imagekit import glance, glance_server
from imagekit.cloud import Cloud, connect
from imagekit.glance_stream import upload_converted
from tests.conftest import ROOT
from tests.glance_fixture import GlanceFixture

MiB = 1 << 20


def data_raw(path: Path, data_mib: int, hole_mib: int = 16) -> Path:
    """A sparse raw: ``data_mib`` MiB of half-compressible data after a hole."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate((hole_mib + data_mib + hole_mib) * MiB)
        f.seek(hole_mib * MiB)
        for _ in range(data_mib):
            f.write(bytes([0x5A]) * (MiB // 2) + rng.integers(0, 256, MiB // 2, dtype=np.uint8).tobytes())
    return path


def downloaded_sha512(c: Cloud, image_id: str) -> str:
    h = hashlib.sha512()
    for chunk in c.glance.images.data(image_id):
        h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def tiny_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real 4 MiB tmpfs as imagekit's cache (work folders) and TMPDIR (needs root, as the suite does)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)], check=True)
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(mnt))
    monkeypatch.setenv("TMPDIR", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("compress", [None, "zlib"])
def test_streamed_upload_writes_no_copy_and_matches(glance_cloud: Cloud, tiny_scratch: Path, tmp_path: Path,
                                                    compress: str | None) -> None:
    src = data_raw(tmp_path / "in.raw", 24)
    opts = conv.ConvertOptions(compress=compress)
    res = upload_converted(glance_cloud, src, glance.UploadOptions(name=f"stream-{compress}"), opts)
    up = res.upload
    assert up.image["status"] == "active" and up.verified and not up.reused
    assert up.size == res.size and up.disk_format == "qcow2" and up.bytes_read == res.size
    assert res.size > 4 * MiB  # bigger than the scratch space: no copy could have been made there
    # the bytes Glance holds are the bytes imagekit convert writes for this input (deterministic writer)
    local = conv.convert(src, tmp_path / "local.qcow2", conv.ConvertOptions(compress=compress, verify="map"))
    assert local.output.sha256 == res.sha256 and local.output.size == res.size
    assert up.image["os_hash_value"] == up.sha512 == hashlib.sha512((tmp_path / "local.qcow2").read_bytes()).hexdigest()
    assert downloaded_sha512(glance_cloud, up.image["id"]) == up.sha512
    assert list(tiny_scratch.rglob("*")) == [] or all(p.is_dir() for p in tiny_scratch.rglob("*"))


def test_tee_writes_the_same_bytes_verified(glance_cloud: Cloud, tmp_path: Path) -> None:
    src = data_raw(tmp_path / "in.raw", 8)
    out = tmp_path / "built.qcow2"
    res = upload_converted(glance_cloud, src, glance.UploadOptions(name="stream-tee"),
                           conv.ConvertOptions(compress="zstd"), tee=out)
    assert res.output == str(out) and out.stat().st_size == res.size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == res.sha256
    assert res.upload.image["os_hash_value"] == hashlib.sha512(out.read_bytes()).hexdigest()
    assert res.qemu_check == "consistent" and res.map_ranges >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_cli_upload_convert_json(glance_env: GlanceFixture, glance_cloud: Cloud, imagekit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = data_raw(tmp_path / "disk.raw", 4)
    r = imagekit("--json", "upload", str(src), "--convert", "--compress", "zlib", "--cloud", glance_env.cloud,
                 "--name", "stream-cli", env=glance_env.env)
    assert r.code == 0, r.err
    d = r.json()
    assert d["image"]["status"] == "active" and d["disk_format"] == "qcow2"  # type: ignore[index]
    assert d["converted"]["input_format"] == "raw" and d["converted"]["compressed_clusters"] > 0  # type: ignore[index]
    assert d["sha512"] == d["image"]["os_hash_value"]  # type: ignore[index]
    bad = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(bad), "1M"],
                   check=True)
    r2 = imagekit("upload", str(bad), "--convert", "--cloud", glance_env.cloud, "--name", "stream-bad",
                  env=glance_env.env)
    assert r2.code == 3 and "backing-file" in r2.err
    assert [i for i in glance.list_images(glance_cloud) if i["name"] == "stream-bad"] == []


def test_glance_killed_mid_stream_leaves_no_active_image(fresh_glance: GlanceFixture, tmp_path: Path) -> None:
    src = data_raw(tmp_path / "big.raw", 384, hole_mib=1)
    name = "stream-killed"
    env = {**os.environ, **fresh_glance.env}
    c = connect(fresh_glance.cloud)
    proc = subprocess.Popen([sys.executable, "-m", "imagekit", "upload", str(src), "--convert", "--cloud",
                             fresh_glance.cloud, "--name", name], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            imgs = [i for i in glance.list_images(c) if i["name"] == name]
            if imgs and imgs[0]["status"] == "saving":
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        else:
            pytest.fail("the stream never reached 'saving'")
        glance_server.kill(fresh_glance.home)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "could NOT be deleted" in err
    glance_server.serve(home=fresh_glance.home, clouds_yaml=fresh_glance.clouds_yaml, timeout=90)
    left = [i for i in glance.list_images(connect(fresh_glance.cloud)) if i["name"] == name]
    assert all(i["status"] != "active" and i["properties"].get("imagekit_incomplete") == "true" for i in left)
    ps = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    assert str(src) not in ps
