"""pytest fixtures: ONE real ``imagekit build debian-12`` per test session, shared by every test that needs it.

``debian`` (session): the result document of ``imagekit --json build debian-12 --upload
--cloud imagekit-local`` (real diskimage-builder, libguestfs, convert, check, upload to the
session's Glance), built once into its own cache (``build_env``: ``IMAGEKIT_CACHE_DIR`` and
``IMAGEKIT_STATE_DIR`` of the session, the session Glance's clouds.yaml). ``tests/test_build.py``
checks that build; other tests start from it: a recipe whose ``build.base.recipe`` is
``debian-12`` run with ``build_env`` finds its build, customise and convert stages in that
cache (the snapshot tests), so the suite builds the Debian image with diskimage-builder once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT


def run_build(*args: str, env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "imagekit", "--json", "build", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    from tests.json_contract import assert_document

    data: dict[str, Any] = assert_document("build", proc.stdout)  # one document, valid against its schema
    return data


@pytest.fixture(scope="session")
def build_env(tmp_path_factory: pytest.TempPathFactory, glance_server_session: Any) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("build-cache")
    return {**glance_server_session.env, "IMAGEKIT_CACHE_DIR": str(cache),
            "IMAGEKIT_STATE_DIR": str(tmp_path_factory.mktemp("build-state"))}


@pytest.fixture(scope="session")
def debian(tmp_path_factory: pytest.TempPathFactory, build_env: dict[str, str]) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("image builds need root")
    out = tmp_path_factory.mktemp("out")
    return run_build("debian-12", "--output-dir", str(out), "--upload", "--cloud", "imagekit-local", env=build_env)
