"""pytest fixtures: a real Glance API on 127.0.0.1, started through ``imagekit.glance_server``.

``glance_server`` (session): one server for the whole test session, in its own
temporary directory, on a free loopback port, stopped by its own PID at the end.
``glance_env`` (function): the environment that points clients at it
(``OS_CLIENT_CONFIG_FILE``, any ``OS_*`` of the user removed) and ``glance_cloud``
a connected ``imagekit.cloud.Cloud``. ``fresh_glance`` starts a separate,
short-lived server for tests that kill it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagekit import glance_server
from imagekit.cloud import Cloud, connect


@dataclass
class GlanceFixture:
    info: glance_server.ServerInfo
    home: Path
    clouds_yaml: Path
    cloud: str = glance_server.CLOUD_NAME

    @property
    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess: only this clouds.yaml, no user OS_* settings."""
        return {"OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml)}


def _need_glance() -> None:
    pytest.importorskip("glance", reason="the server extra (glance) is not installed")
    pytest.importorskip("gunicorn", reason="the server extra (gunicorn) is not installed")


def _clean_os_env() -> None:
    for k in list(os.environ):
        if k.startswith("OS_") and k != "OS_CLIENT_CONFIG_FILE":
            del os.environ[k]


def start(base: Path, **serve_kwargs: str) -> GlanceFixture:
    _need_glance()
    clouds = base / "clouds.yaml"
    info = glance_server.serve(home=base / "server", clouds_yaml=clouds, timeout=90, **serve_kwargs)
    return GlanceFixture(info=info, home=base / "server", clouds_yaml=clouds)


@pytest.fixture(scope="session")
def glance_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceFixture]:
    """The session's Glance (started once, stopped by PID at the end)."""
    _clean_os_env()
    fx = start(tmp_path_factory.mktemp("glance"))
    try:
        yield fx
    finally:
        glance_server.stop(fx.home)


@pytest.fixture
def glance_env(glance_server_session: GlanceFixture, monkeypatch: pytest.MonkeyPatch) -> GlanceFixture:
    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(glance_server_session.clouds_yaml))
    return glance_server_session


@pytest.fixture
def glance_cloud(glance_env: GlanceFixture) -> Cloud:
    return connect(glance_env.cloud)


@pytest.fixture
def fresh_glance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GlanceFixture]:
    """A separate server for this test only (tests that kill or restart it)."""
    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    fx = start(tmp_path / "fresh-glance")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fx.clouds_yaml))
    try:
        yield fx
    finally:
        glance_server.stop(fx.home)
