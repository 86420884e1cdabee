"""imagekit as a user installs it: the sdist and the wheel built from it (``python -m build``, as a
release would) carry the shipped recipes and elements, and the wheel installed into a fresh
virtualenv outside the checkout works from another folder (recipes list/validate/show/new, a
convert, the elements on diskimage-builder's path, shell completion).

The fresh virtualenv gets imagekit's dependencies from a wheelhouse kept between runs
(``~/.cache/imagekit-tests/wheelhouse``) at the versions the test run itself uses (the shared
venv's); pip fills it from the package index only with what it lacks, so a run after the first
needs no network.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

WHEELHOUSE = Path.home() / ".cache" / "imagekit-tests" / "wheelhouse"
BUILD_REQUIRES = ["setuptools>=68", "wheel"]  # pyproject.toml [build-system]
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for d in ("recipes", "elements")
                 for p in (ROOT / d).rglob("*") if p.is_file())


def _constraints(path: Path) -> Path:
    """The versions of this test run's environment, as pip constraints (pip's own tools left free)."""
    skip = {"imagekit", "pip", "setuptools", "wheel"}
    pins = sorted({f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in md.distributions()
                   if d.metadata["Name"] and canonicalize_name(d.metadata["Name"]) not in skip})
    path.write_text("\n".join(pins) + "\n")
    return path


def _pip_download(reqs: list[str], constraints: Path) -> None:
    """Into the wheelhouse: from the wheelhouse alone when it has everything, else from the index."""
    base = [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), "-c", str(constraints)]
    offline = subprocess.run([*base, "--no-index", "--find-links", str(WHEELHOUSE), *reqs],
                             capture_output=True, text=True)
    if offline.returncode != 0:
        subprocess.run([*base, *reqs], check=True, capture_output=True, text=True, timeout=600)


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a user of the installed package: not this checkout's (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "IMAGEKIT_RECIPE_PATH", "IMAGEKIT_ELEMENTS_PATH",
                        "XDG_CONFIG_HOME", "PIP_CONSTRAINT")}
    env.update(HOME=str(home), IMAGEKIT_CACHE_DIR=str(home / "cache"), IMAGEKIT_STATE_DIR=str(home / "state"))
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, from a copy of the checkout's files (tracked or new)."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
            (src / rel).chmod((ROOT / rel).stat().st_mode)
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    constraints = _constraints(base / "constraints.txt")
    _pip_download(BUILD_REQUIRES, constraints)
    out = base / "dist"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELHOUSE))
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("imagekit-*.whl")
    (sdist,) = out.glob("imagekit-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "constraints": constraints}


@pytest.fixture(scope="module")
def venv(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (no system or shared site-packages) with the wheel and its dependencies."""
    _pip_download([str(dists["wheel"])], dists["constraints"])
    for stale in WHEELHOUSE.glob("imagekit-*"):
        stale.unlink()
    home = tmp_path_factory.mktemp("user")
    env = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    proc = subprocess.run([str(env / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE),
                           "--no-compile", "-c", str(dists["constraints"]), str(dists["wheel"])],
                          capture_output=True, text=True, timeout=300, env=_clean_env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_sdist_and_wheel_carry_the_shipped_recipes_and_elements(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        in_sdist = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile()}
    assert set(SHIPPED) <= set(in_sdist), sorted(set(SHIPPED) - set(in_sdist))
    assert "setup.py" in in_sdist and "imagekit/shipped/__init__.py" in in_sdist
    with zipfile.ZipFile(dists["wheel"]) as whl:
        in_wheel = {i.filename: i for i in whl.infolist()}
    for rel in SHIPPED:
        info = in_wheel.get(f"imagekit/shipped/{rel}")
        assert info is not None, f"{rel} is not in the wheel"
        executable = bool((ROOT / rel).stat().st_mode & stat.S_IXUSR)
        assert bool((info.external_attr >> 16) & stat.S_IXUSR) == executable, rel  # element scripts stay executable
    assert not [n for n in in_wheel if n.startswith(("tests/", "bench/", "recipes/", "elements/"))]


def test_installed_wheel_works_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    env = _clean_env(home)

    def imagekit(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "imagekit"), *args], cwd=elsewhere, env={**env, **(extra or {})},
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import imagekit, sys; print(imagekit.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout

    listed = imagekit("--json", "recipes", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["recipes"]}
    assert {"centos7", "debian-12", "ubuntu-22.04", "ubuntu-24.04", "windows-server-2022", "linux-base"} <= set(rows)
    assert {r["origin"] for r in rows.values()} == {"shipped"}
    assert rows["debian-12"]["path"].startswith(str(venv)) and rows["debian-12"]["valid"] is True
    text = imagekit("recipes", "list")
    assert "debian-12" in text.stdout and "shipped" in text.stdout

    valid = imagekit("recipes", "validate")
    here = subprocess.run([sys.executable, "-m", "imagekit", "recipes", "validate"], capture_output=True, text=True,
                          cwd=ROOT, check=True)  # the checkout's own recipes: the wheel must ship every one
    assert valid.returncode == 0 and valid.stdout == here.stdout and here.stdout.count("ok ") >= 5, valid.stdout + valid.stderr

    shown = imagekit("recipes", "show", "debian-12", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["name"] == "debian-12" and data["build"]["method"] == "dib"
    assert "imagekit-openstack" in data["build"]["elements"]
    assert data["customise"][0]["op"] == "cloud-init"  # inherited from the shipped linux-base

    # diskimage-builder finds the shipped elements in the installed package, scripts executable
    code = "from imagekit.builders.dib import element_paths; print(element_paths()[-1])"
    elements = Path(subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=elsewhere, env=env,
                                   capture_output=True, text=True, check=True).stdout.strip())
    assert str(elements).startswith(str(venv))
    assert os.access(elements / "imagekit-openstack" / "post-install.d" / "50-imagekit-release", os.X_OK)

    # a user's recipe next to the shipped ones: ./recipes, written by 'recipes new', found by name
    made = imagekit("recipes", "new", "web", "--from", "debian-12")
    assert made.returncode == 0 and (elsewhere / "recipes" / "web.yaml").is_file(), made.stderr
    web = json.loads(imagekit("recipes", "show", "web", "--json").stdout)
    assert web["build"]["elements"] == data["build"]["elements"] and web["name"] == "web"
    rows = {r["name"]: r for r in json.loads(imagekit("--json", "recipes", "list").stdout)["recipes"]}
    assert rows["web"]["origin"] == "./recipes" and rows["debian-12"]["origin"] == "shipped"

    raw = elsewhere / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 << 20)
        f.write(b"imagekit" * 4096)
    converted = imagekit("--json", "convert", "disk.raw", "-o", "disk.qcow2")
    assert converted.returncode == 0, converted.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2",
                                      str(elsewhere / "disk.qcow2")], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["virtual-size"] == 8 << 20

    # completion through the installed console script
    comp = imagekit(extra={"_IMAGEKIT_COMPLETE": "bash_complete", "COMP_WORDS": "imagekit build deb",
                           "COMP_CWORD": "2"})
    assert comp.returncode == 0 and "plain,debian-12" in comp.stdout.split(), comp.stdout + comp.stderr
