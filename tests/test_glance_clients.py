"""Standard OpenStack clients against the local Glance, with only what imagekit wrote.

`openstack` (python-openstackclient) uses the clouds.yaml entry `imagekit glance serve` wrote
(auth_type admin_token); the `glance` CLI, which reads no clouds.yaml, uses the variables
`imagekit glance env` prints. Both list, create, show and delete images. The identity filter
that stands in for Keystone refuses requests without a token and strips identity headers a
client sends itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from imagekit import glance_identity, glance_server
from tests.glance_fixture import GlanceFixture

BIN = Path(sys.executable).parent


def _cli(tool: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed (the test extra installs python-openstackclient)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env={**clean, **env}, timeout=120)


def _openstack(fx: GlanceFixture, *args: str, fmt: bool = True) -> Any:
    proc = _cli("openstack", "--os-cloud", fx.cloud, *args, *(("-f", "json") if fmt else ()), env=fx.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def test_openstack_cli_image_lifecycle(glance_server_session: GlanceFixture, tmp_path: Path) -> None:
    fx = glance_server_session
    img = tmp_path / "osc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    created = _openstack(fx, "image", "create", "--disk-format", "qcow2", "--container-format", "bare",
                         "--file", str(img), "--property", "os_distro=debian", "osc-test")
    assert created["status"] == "active" and created["name"] == "osc-test"
    listed = _openstack(fx, "image", "list")
    assert any(i["ID"] == created["id"] for i in listed)
    shown = _openstack(fx, "image", "show", created["id"])
    assert shown["disk_format"] == "qcow2" and shown["properties"]["os_distro"] == "debian"
    _openstack(fx, "image", "delete", created["id"], fmt=False)
    assert not any(i["ID"] == created["id"] for i in _openstack(fx, "image", "list"))


def test_glance_cli_with_imagekit_glance_env(glance_server_session: GlanceFixture, tmp_path: Path) -> None:
    fx = glance_server_session
    env = glance_server.shell_env(fx.info.endpoint)
    img = tmp_path / "g.raw"
    img.write_bytes(b"\0" * 65536)
    proc = _cli("glance", "image-create", "--name", "glance-cli-test", "--disk-format", "raw",
                "--container-format", "bare", "--file", str(img), env=env)
    assert proc.returncode == 0, proc.stderr
    image_id = next(line.split("|")[2].strip() for line in proc.stdout.splitlines() if "| id " in line)
    proc = _cli("glance", "image-list", env=env)
    assert proc.returncode == 0 and image_id in proc.stdout, proc.stderr
    proc = _cli("glance", "image-show", image_id, env=env)
    assert proc.returncode == 0 and "active" in proc.stdout
    assert _cli("glance", "image-delete", image_id, env=env).returncode == 0
    assert image_id not in _cli("glance", "image-list", env=env).stdout


def test_glance_cli_after_eval_imagekit_glance_env(glance_server_session: GlanceFixture, tmp_path: Path) -> None:
    """As the README says: eval "$(imagekit glance env)", then the glance CLI, in a plain shell."""
    if not (BIN / "glance").exists():
        pytest.skip("glance is not installed (the test extra installs python-openstackclient)")
    state = tmp_path / "state"
    state.mkdir()
    (state / "glance").symlink_to(glance_server_session.home)  # the running server is the default one here
    img = tmp_path / "e.raw"
    img.write_bytes(b"\0" * 65536)
    script = ('eval "$(imagekit glance env)" && '
              f'glance image-create --name eval-env-test --disk-format raw --container-format bare --file {img} && '
              'glance image-list')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "imagekit").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imagekit "$@"\n')
    (bin_dir / "imagekit").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**clean, "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}", "IMAGEKIT_STATE_DIR": str(state),
                               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 0, proc.stderr
    image_id = next(line.split("|")[2].strip() for line in proc.stdout.splitlines() if "| id " in line)
    assert proc.stdout.count(image_id) == 2  # created, then listed
    assert _cli("glance", "image-delete", image_id, env=glance_server.shell_env(glance_server_session.info.endpoint)
                ).returncode == 0


def test_imagekit_glance_env_prints_exports(imagekit: Any, tmp_path: Path) -> None:
    """`imagekit glance env` reads the running server's state; without one it says how to start it."""
    res = imagekit("glance", "env", env={"IMAGEKIT_STATE_DIR": str(tmp_path / "none")})
    assert res.code == 1 and "imagekit glance serve" in res.err


def _get(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_identity_filter_needs_a_token(glance_server_session: GlanceFixture) -> None:
    url = glance_server_session.info.endpoint + "/v2/images"
    assert _get(url, {}) == 401
    # identity headers a client sends itself are stripped, not trusted
    assert _get(url, {"X-Identity-Status": "Confirmed", "X-Roles": "admin", "X-Project-Id": "p", "X-User-Id": "u"}) == 401
    assert _get(url, {"X-Auth-Token": "not a token"}) == 401
    assert _get(url, {"X-Auth-Token": "user:project:member,reader"}) == 200


def test_identity_filter_refuses_non_loopback_and_parses_tokens() -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [])
        return [b"ok"]

    mw = glance_identity.IdentityFromToken(app)
    statuses: list[str] = []
    body = mw({"REMOTE_ADDR": "10.0.0.5", "HTTP_X_AUTH_TOKEN": "u:p"}, lambda s, h: statuses.append(s))
    assert statuses == ["401 Unauthorized"] and b"loopback" in b"".join(body) and not seen
    mw({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_AUTH_TOKEN": "u%3Ap", "HTTP_X_ROLES": "admin"}, lambda s, h: None)
    assert seen[-1]["HTTP_X_USER_ID"] == "u" and seen[-1]["HTTP_X_PROJECT_ID"] == "p"
    assert seen[-1]["HTTP_X_ROLES"] == glance_identity.DEFAULT_ROLES
    assert glance_identity.parse_token("a:b:member") == ("a", "b", "member")
    assert glance_identity.parse_token("a:b:Member;drop") is None and glance_identity.parse_token("ab") is None
