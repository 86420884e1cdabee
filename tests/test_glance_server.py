"""The local Glance itself (serve / status / stop, clouds.yaml) and a server that dies mid-upload."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagekit import glance, glance_server
from imagekit.cloud import connect
from tests.conftest import ROOT
from tests.glance_fixture import GlanceFixture, start

MiB = 1 << 20


def test_clouds_yaml_merge_keeps_other_clouds(tmp_path: Path) -> None:
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump({"clouds": {"prod": {"auth": {"auth_url": "https://keystone.example/v3",
                                                                  "password": "x"}}}}))
    glance_server.write_clouds_yaml(path, "http://127.0.0.1:9999")
    data = yaml.safe_load(path.read_text())
    assert set(data["clouds"]) == {"prod", "imagekit-local"}
    assert data["clouds"]["prod"]["auth"]["password"] == "x"
    local = data["clouds"]["imagekit-local"]
    assert local["auth_type"] == "admin_token" and local["auth"]["endpoint"] == "http://127.0.0.1:9999"
    assert local["auth"]["token"] == glance_server.TOKEN and local["image_endpoint_override"] == "http://127.0.0.1:9999/"
    assert not any(k.startswith("imagekit") for k in local)  # only standard keys: every client can use it
    assert (tmp_path / "clouds.yaml.bak").exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    glance_server.write_clouds_yaml(path, "http://127.0.0.1:9998")  # replaced, not duplicated
    assert yaml.safe_load(path.read_text())["clouds"]["imagekit-local"]["auth"]["endpoint"].endswith(":9998")


def test_cli_serve_status_stop(imagekit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("glance")
    clouds = tmp_path / "clouds.yaml"
    env = {"IMAGEKIT_STATE_DIR": str(tmp_path / "state"), "OS_CLIENT_CONFIG_FILE": str(clouds)}
    res = imagekit("glance", "serve", "--json", env=env)
    assert res.code == 0, res.err
    info = res.json()
    assert isinstance(info, dict)
    try:
        assert info["endpoint"].startswith("http://127.0.0.1:") and info["cloud"] == "imagekit-local"
        assert Path(info["home"]) == (tmp_path / "state" / "glance").resolve()
        again = imagekit("glance", "serve", "--json", env=env)  # idempotent: the running one is reported
        assert again.code == 0 and again.json()["pid"] == info["pid"]  # type: ignore[index]
        st = imagekit("glance", "status", env=env)
        assert st.code == 0 and "running" in st.out
        img = tmp_path / "x.raw"
        img.write_bytes(os.urandom(MiB))
        up = imagekit("upload", str(img), "--cloud", "imagekit-local", "--json", env=env)
        assert up.code == 0, up.err
    finally:
        stop = imagekit("glance", "stop", env=env)
    assert stop.code == 0 and "stopped" in stop.out
    assert not Path(f"/proc/{info['pid']}").exists() or b"gunicorn" not in Path(
        f"/proc/{info['pid']}/cmdline").read_bytes()
    st = imagekit("glance", "status", env=env)
    assert st.code == 1 and "not running" in st.err


def test_server_killed_mid_upload(fresh_glance: GlanceFixture, tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(768 * MiB)
    c = connect(fresh_glance.cloud)
    name = "killed-mid-upload"
    env = {**os.environ, **fresh_glance.env}
    proc = subprocess.Popen([sys.executable, "-m", "imagekit", "upload", str(big), "--cloud", fresh_glance.cloud,
                             "--name", name], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            imgs = [i for i in glance.list_images(c) if i["name"] == name]
            if imgs and imgs[0]["status"] == "saving":
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        else:
            pytest.fail("the upload never reached 'saving'")
        glance_server.kill(fresh_glance.home)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "cannot reach" in err and "could NOT be deleted" in err and "imagekit_incomplete" in err
    # the record that survived is not usable: restart the same server and look
    again = glance_server.serve(home=fresh_glance.home, clouds_yaml=fresh_glance.clouds_yaml, timeout=90)
    assert again.pid != fresh_glance.info.pid
    c2 = connect(fresh_glance.cloud)
    left = [i for i in glance.list_images(c2) if i["name"] == name]
    assert left, "the record should still exist (it could not be deleted)"
    for i in left:
        assert i["status"] != "active"
        assert i["properties"].get("imagekit_incomplete") == "true"
    # and the idempotency check never reuses it
    small = tmp_path / "s.raw"
    small.write_bytes(os.urandom(MiB))
    res = glance.upload(c2, small, glance.UploadOptions(name=name))
    assert not res.reused and res.image["status"] == "active"


def test_upload_verifies_a_glance_that_hashes_with_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cloud configured with ``hashing_algorithm = sha256``: the sha512 computed while streaming cannot be
    compared, so imagekit hashes the file once more with Glance's algorithm and verifies that."""
    import hashlib

    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    fx = start(tmp_path / "g256", hashing_algorithm="sha256")
    try:
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fx.clouds_yaml))
        c = connect(fx.cloud)
        img = tmp_path / "x.raw"
        img.write_bytes(os.urandom(3 * MiB))
        res = glance.upload(c, img, glance.UploadOptions(name="sha256-cloud"))
        assert res.verified and res.image["status"] == "active"
        got = c.glance.images.get(res.image["id"])
        assert got["os_hash_algo"] == "sha256"
        assert got["os_hash_value"] == hashlib.sha256(img.read_bytes()).hexdigest()
        assert res.sha512 == hashlib.sha512(img.read_bytes()).hexdigest()
    finally:
        glance_server.stop(fx.home)
