"""Publishing to a real Glance (the session server of tests/glance_fixture.py)."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagekit import glance
from imagekit import recipe as rec
from imagekit.cloud import Cloud
from imagekit.errors import UnsafeImageError
from tests.conftest import ROOT
from tests.glance_fixture import GlanceFixture
from tests.image_factory import need, qemu_img, write_pattern

MiB = 1 << 20


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def qcow2_file(path: Path, size: str = "48M") -> Path:
    raw = write_pattern(path.with_suffix(".src"), 8 * MiB)
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    qemu_img("resize", "-q", "-f", "qcow2", str(path), size)
    raw.unlink()
    return path


def raw_file(path: Path, size: int = 6 * MiB) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def digests(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    return hashlib.sha512(data).hexdigest(), hashlib.md5(data).hexdigest()  # noqa: S324 - Glance's checksum


def by_name(c: Cloud, name: str) -> list[dict[str, Any]]:
    return [i for i in glance.list_images(c) if i["name"] == name]


# ---------------------------------------------------------------- uploads


def test_qcow2_named_raw_uploads_as_qcow2(glance_cloud: Cloud, tmp_path: Path) -> None:
    need("qemu-img")
    img = qcow2_file(tmp_path / "disguised.raw", "3G")
    name = uniq("qcow2")
    seen: list[float] = []
    res = glance.upload(glance_cloud, img, glance.UploadOptions(
        name=name, recipe=rec.load("debian-12"), tags=["t1", "t2"], properties={"hw_vif_model": "e1000"}),
        progress=lambda phase, frac: seen.append(frac))
    sha512, md5 = digests(img)
    assert not res.reused and res.verified
    assert res.disk_format == "qcow2"
    i = res.image
    assert i["disk_format"] == "qcow2" and i["container_format"] == "bare" and i["status"] == "active"
    assert i["min_disk"] == 3  # GiB, from the virtual size
    assert i["os_hash_algo"] == "sha512" and i["os_hash_value"] == sha512 == res.sha512
    assert i["checksum"] == md5 == res.md5 and i["size"] == img.stat().st_size
    assert res.bytes_read == img.stat().st_size  # read once
    assert set(i["tags"]) >= {"t1", "t2", "imagekit"}
    p = i["properties"]
    assert p["os_distro"] == "debian" and p["os_type"] == "linux" and p["hw_disk_bus"] == "virtio"
    assert p["hw_vif_model"] == "e1000" and p["imagekit_recipe"] == "debian-12"
    assert "imagekit_incomplete" not in p
    assert seen and seen[-1] == 1.0


def test_raw_upload_cli(glance_env: GlanceFixture, glance_cloud: Cloud, imagekit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = raw_file(tmp_path / "disk.qcow2")  # raw content, misleading extension
    name = uniq("raw")
    res = imagekit("upload", str(img), "--cloud", glance_env.cloud, "--name", name, "--property", "os_distro=cirros",
                   "--property", "hw_qemu_guest_agent=no", "--tag", "demo", "--protected", "--min-ram", "256",
                   "--json", env=glance_env.env)
    assert res.code == 0, res.err
    data = res.json()
    assert isinstance(data, dict)
    i = data["image"]
    assert i["disk_format"] == "raw" and i["protected"] is True and i["min_ram"] == 256
    assert i["properties"]["os_distro"] == "cirros" and i["tags"] == ["demo"]
    assert i["os_hash_value"] == digests(img)[0]
    glance_cloud.glance.images.update(i["id"], protected=False)


def test_idempotent_reupload(glance_cloud: Cloud, tmp_path: Path) -> None:
    img = raw_file(tmp_path / "same.img")
    name = uniq("idem")
    first = glance.upload(glance_cloud, img, glance.UploadOptions(name=name))
    again = glance.upload(glance_cloud, img, glance.UploadOptions(name=name))
    assert not first.reused and again.reused
    assert again.image["id"] == first.image["id"]
    assert len(by_name(glance_cloud, name)) == 1
    # same name, different content: a new image
    other = raw_file(tmp_path / "other.img")
    third = glance.upload(glance_cloud, other, glance.UploadOptions(name=name))
    assert not third.reused and third.image["id"] != first.image["id"]
    forced = glance.upload(glance_cloud, img, glance.UploadOptions(name=name, force_upload=True))
    assert not forced.reused
    assert len(by_name(glance_cloud, name)) == 3


def test_glance_direct_import(glance_cloud: Cloud, tmp_path: Path) -> None:
    need("qemu-img")
    img = qcow2_file(tmp_path / "gd.qcow2")
    res = glance.upload(glance_cloud, img, glance.UploadOptions(name=uniq("gd"), import_method="glance-direct"))
    assert res.image["status"] == "active" and res.image["disk_format"] == "qcow2"
    assert res.image["os_hash_value"] == digests(img)[0] and res.verified
    assert res.bytes_read == img.stat().st_size


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on 127.0.0.1 (a thread) serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root
    finally:
        srv.shutdown()
        srv.server_close()


def test_web_download_verified(glance_cloud: Cloud, http_dir: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_dir
    img = raw_file(root / "image.raw")
    res = glance.upload(glance_cloud, img, glance.UploadOptions(
        name=uniq("web"), import_method="web-download", url=f"{base}/image.raw"))
    assert res.image["status"] == "active" and res.verified
    assert res.image["os_hash_value"] == digests(img)[0]


def test_web_download_mismatch_deletes(glance_cloud: Cloud, http_dir: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_dir
    raw_file(root / "served.raw")
    local = raw_file(tmp_path / "local.raw")  # same format, other bytes
    name = uniq("webbad")
    with pytest.raises(glance.GlanceError) as ei:
        glance.upload(glance_cloud, local, glance.UploadOptions(
            name=name, import_method="web-download", url=f"{base}/served.raw"))
    assert "does not hold what was sent" in ei.value.message and "deleted" in ei.value.message
    assert by_name(glance_cloud, name) == []


def test_hash_mismatch_direct_deletes(glance_cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = raw_file(tmp_path / "x.raw")
    real = glance.HashingReader.digests
    monkeypatch.setattr(glance.HashingReader, "digests",
                        lambda self: {**real(self), "sha512": "0" * 128})
    name = uniq("badhash")
    with pytest.raises(glance.VerifyError) as ei:
        glance.upload(glance_cloud, img, glance.UploadOptions(name=name))
    assert "sha512" in ei.value.message and "was deleted" in ei.value.message
    assert by_name(glance_cloud, name) == []


def test_unsafe_image_rejected_before_upload(glance_env: GlanceFixture, glance_cloud: Cloud, imagekit,  # type: ignore[no-untyped-def]
                                             tmp_path: Path) -> None:
    need("qemu-img")
    bad = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(bad), "16M")
    before = {i["id"] for i in glance.list_images(glance_cloud)}
    name = uniq("evil")
    res = imagekit("upload", str(bad), "--cloud", glance_env.cloud, "--name", name, env=glance_env.env)
    assert res.code == 3, res.err
    assert "unsafe" in res.err and "Traceback" not in res.err
    with pytest.raises(UnsafeImageError):
        glance.upload(glance_cloud, bad, glance.UploadOptions(name=name))
    assert {i["id"] for i in glance.list_images(glance_cloud)} == before


# ---------------------------------------------------------------- rotation


def test_rotation_with_protected(glance_env: GlanceFixture, glance_cloud: Cloud, imagekit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = uniq("rot") + "-"
    ids = []
    for n in range(5):
        img = raw_file(tmp_path / f"r{n}.raw", 64 * 1024)
        ids.append(glance.upload(glance_cloud, img, glance.UploadOptions(
            name=f"{prefix}{n}", protected=(n == 0))).image["id"])
        time.sleep(1.05)  # created_at has one-second resolution
    dry = glance.prune(glance_cloud, prefix, keep=2, action="delete", dry_run=True)
    assert dry["changed"] == 0
    acts = {r["name"]: r["action"] for r in dry["images"]}
    assert acts == {f"{prefix}4": "keep", f"{prefix}3": "keep", f"{prefix}2": "delete", f"{prefix}1": "delete",
                    f"{prefix}0": "skip"}
    res = imagekit("images", "prune", "--cloud", glance_env.cloud, "--name-prefix", prefix, "--keep", "3",
                   "--hide", "--json", env=glance_env.env)
    assert res.code == 0, res.err
    listed = {i["name"]: i for i in glance.list_images(glance_cloud, prefix)}
    assert listed[f"{prefix}1"]["os_hidden"] is True
    assert not listed[f"{prefix}2"]["os_hidden"] and not listed[f"{prefix}0"]["os_hidden"]
    glance.prune(glance_cloud, prefix, keep=1, action="deactivate")
    listed = {i["name"]: i for i in glance.list_images(glance_cloud, prefix)}
    assert listed[f"{prefix}3"]["status"] == "deactivated" and listed[f"{prefix}4"]["status"] == "active"
    assert listed[f"{prefix}0"]["status"] == "active"  # protected: never touched
    # upload --prune-keep deletes the older ones after a successful upload
    newest = raw_file(tmp_path / "r5.raw", 64 * 1024)
    res = imagekit("upload", str(newest), "--cloud", glance_env.cloud, "--name", f"{prefix}5", "--prune-keep", "2",
                   "--prune-prefix", prefix, "--prune-action", "delete", "--json", env=glance_env.env)
    assert res.code == 0, res.err
    names = sorted(i["name"] for i in glance.list_images(glance_cloud, prefix))
    assert names == [f"{prefix}0", f"{prefix}4", f"{prefix}5"]
    out = imagekit("images", "list", "--cloud", glance_env.cloud, "--name-prefix", prefix, env=glance_env.env)
    assert out.code == 0 and f"{prefix}5" in out.out and "protected" in out.out
    glance_cloud.glance.images.update(ids[0], protected=False)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_upload(glance_env: GlanceFixture, glance_cloud: Cloud, tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(768 * MiB)
    name = uniq("sigint")
    env = {**os.environ, **glance_env.env}
    proc = subprocess.Popen([sys.executable, "-m", "imagekit", "upload", str(big), "--cloud", glance_env.cloud,
                             "--name", name], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            imgs = by_name(glance_cloud, name)
            if imgs and imgs[0]["status"] == "saving":
                break
            if proc.poll() is not None:
                pytest.fail(f"upload ended before it could be interrupted: {proc.returncode} {proc.stderr.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("the upload never reached 'saving'")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert [i for i in by_name(glance_cloud, name) if i["status"] == "active"] == []
    assert by_name(glance_cloud, name) == []  # deleted, not just left queued


# ---------------------------------------------------------------- errors and credentials


def test_unreachable_endpoint(imagekit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from imagekit.glance_server import free_port, write_clouds_yaml

    clouds = write_clouds_yaml(tmp_path / "clouds.yaml", f"http://127.0.0.1:{free_port()}", "deadcloud")
    img = raw_file(tmp_path / "x.raw", 4096)
    res = imagekit("upload", str(img), "--cloud", "deadcloud", env={"OS_CLIENT_CONFIG_FILE": str(clouds)})
    assert res.code == 1
    assert "cannot reach" in res.err and "hint:" in res.err and "Traceback" not in res.err


@pytest.fixture
def fake_keystone() -> Iterator[str]:
    """An identity endpoint that refuses every credential (HTTP 401)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _deny(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/").endswith("/v3"):
                body = (b'{"version": {"id": "v3.14", "status": "stable", "links": [{"rel": "self", "href": "'
                        + f"http://127.0.0.1:{self.server.server_address[1]}/v3/".encode() + b'"}]}}')
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self._deny()

        do_POST = _deny  # noqa: N815

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v3"
    finally:
        srv.shutdown()
        srv.server_close()


SECRET = "Sup3r-S3cret-Pa55word!"


def test_wrong_credentials_clear_error_no_secret(imagekit, fake_keystone: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(yaml.safe_dump({"clouds": {"badcreds": {
        "auth_type": "password",
        "auth": {"auth_url": fake_keystone, "username": "demo", "password": SECRET, "project_name": "demo",
                 "user_domain_name": "Default", "project_domain_name": "Default"},
        "identity_api_version": 3}}}))
    img = raw_file(tmp_path / "x.raw", 4096)
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    res = imagekit("upload", str(img), "--cloud", "badcreds", env=env)
    assert res.code == 1, res.err
    assert "authentication failed" in res.err and "hint:" in res.err
    assert "Traceback" not in res.err + res.out
    assert SECRET not in res.err + res.out
    # verbose logs and JSON do not carry it either
    for args in (["-vv", "images", "list", "--cloud", "badcreds"], ["--json", "upload", str(img), "--cloud", "badcreds"]):
        r = imagekit(*args, env=env)
        assert r.code == 1
        assert SECRET not in r.err + r.out
    # nor does the password variable path (OS_* environment)
    r = imagekit("-vv", "upload", str(img), env={"OS_AUTH_URL": fake_keystone, "OS_USERNAME": "demo",
                                                   "OS_PASSWORD": SECRET, "OS_PROJECT_NAME": "demo",
                                                   "OS_USER_DOMAIN_NAME": "Default",
                                                   "OS_PROJECT_DOMAIN_NAME": "Default",
                                                   "OS_CLIENT_CONFIG_FILE": str(tmp_path / "none.yaml")})
    assert r.code == 1 and "authentication failed" in r.err, r.err
    assert SECRET not in r.err + r.out


def test_unknown_cloud(imagekit, glance_env: GlanceFixture, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = raw_file(tmp_path / "x.raw", 4096)
    res = imagekit("upload", str(img), "--cloud", "no-such-cloud", env=glance_env.env)
    assert res.code == 1
    assert "not configured" in res.err and "imagekit-local" in res.err and "Traceback" not in res.err
