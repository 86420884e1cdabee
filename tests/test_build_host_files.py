"""A recipe's host files are read relative to the recipe's folder, whatever the current directory.

The recipe lives in its own folder with ``files/motd`` next to it and an ``upload`` step that
names ``files/motd``. Built through the CLI from two different current directories (each with
a fresh step cache), the customise stage has the same cache key and the image carries the
file's bytes; changing the file changes the key and the image. The base is the suite's small
Debian image served from 127.0.0.1 (cloud-image method), so a real guest receives the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import guest_image
from tests.conftest import ROOT
from tests.http_fixture import FileServer

pytestmark = guest_image.NEEDS_GUEST


def _build(recipe: Path, cwd: Path, cache: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "IMAGEKIT_CACHE_DIR": str(cache), "IMAGEKIT_ACCEL": "tcg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "imagekit", "--json", "build", str(recipe), "--output-dir",
                           str(out)], capture_output=True, text=True, env=env, cwd=cwd, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _key(result: dict[str, Any], stage: str) -> str:
    return next(s["key"] for s in result["stages"] if s["name"] == stage)


def _motd(image: str) -> str:
    from imagekit.guest import open_image

    with open_image(image, readonly=True, fmt="qcow2", accel="tcg") as s:
        return s.read_text("/etc/motd")


@pytest.fixture(scope="module")
def served_debian(tmp_path_factory: pytest.TempPathFactory) -> tuple[FileServer, str]:
    www = tmp_path_factory.mktemp("www")
    base = www / "debian.qcow2"
    base.symlink_to(guest_image.debian_image())
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    srv = FileServer(www).start()
    yield srv, sha
    srv.stop()


def test_upload_step_reads_relative_to_the_recipe(served_debian: tuple[FileServer, str], tmp_path: Path) -> None:
    srv, sha = served_debian
    folder = tmp_path / "recipes" / "motd"
    (folder / "files").mkdir(parents=True)
    motd = folder / "files" / "motd"
    motd.write_text("built by imagekit, first version\n")
    recipe = folder / "motd.yaml"
    recipe.write_text(
        "name: motd\ndescription: upload relative to the recipe\n"
        "os: {type: linux, distro: debian, version: '12'}\n"
        f"build:\n  method: cloud-image\n  base: {{url: {srv.url('debian.qcow2')}, sha256: '{sha}'}}\n"
        "disk_size: 2G\n"
        "customise:\n  - {op: upload, src: files/motd, dest: /etc/motd, mode: '0644'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    first = _build(recipe, folder, tmp_path / "cache-a", tmp_path / "out-a")
    second = _build(recipe, elsewhere, tmp_path / "cache-b", tmp_path / "out-b")
    assert _key(first, "customise") == _key(second, "customise")
    assert not any(s["cached"] for s in second["stages"])  # really built again, from another directory
    assert _motd(second["output"]["path"]) == "built by imagekit, first version\n"

    motd.write_text("second version\n")
    third = _build(recipe, elsewhere, tmp_path / "cache-a", tmp_path / "out-c")
    assert [s["cached"] for s in third["stages"][:2]] == [True, False]  # same base, customise again
    assert _key(third, "customise") != _key(first, "customise")
    assert _motd(third["output"]["path"]) == "second version\n"
