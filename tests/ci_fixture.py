"""pytest fixtures for ``imagekit ci``: a real OCI registry, two real Glances, small bootable images.

``registry`` (session): Debian's ``docker-registry`` (distribution 2.8) as a plain process on
a free 127.0.0.1 port with its own storage folder, stopped with SIGTERM at the end.
``two_clouds`` (session): two ``imagekit glance serve`` instances (separate homes, ports and
data) as the clouds ``cloud-a`` and ``cloud-b`` of one clouds.yaml; ``stop``/``start`` restart
one on its port with its data. ``served`` (session): the tiny bootable image
(``tests/tiny_boot_image.py``) on a local HTTP server, the base of every pipeline test.
``ci_project`` (function) writes a pipeline file and recipes into a folder and runs
``imagekit ci ...`` as a user would (a subprocess with its own HOME and caches).
``TcpPause`` is the one stand-in: a TCP relay on 127.0.0.1 that can hold the bytes a
client sends after a threshold (a network that stalls), so a test can act while an upload
is really in flight; the servers behind it are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.http_fixture import FileServer

REGISTRY = shutil.which("docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- registry


@dataclass
class Registry:
    port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        config = self.root / "config.yml"
        config.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": "imagekit-tests"}}))
        self.proc = subprocess.Popen([str(REGISTRY), "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=(self.root / "registry.log").open("wb"), start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the registry did not answer: " + (self.root / "registry.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tags(self, repo: str) -> list[str]:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/{repo}/tags/list", timeout=5) as r:  # noqa: S310
                return sorted(json.load(r).get("tags") or [])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (make setup installs it)")
    reg = Registry(free_port(), tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


# ---------------------------------------------------------------- two Glances


@dataclass
class Clouds:
    base: Path
    clouds_yaml: Path
    ports: dict[str, int] = field(default_factory=dict)

    def home(self, name: str) -> Path:
        return self.base / name

    def start(self, name: str) -> None:
        from imagekit import glance_server

        glance_server.serve(port=self.ports[name], home=self.home(name), clouds_yaml=self.clouds_yaml, cloud=name,
                            timeout=90)

    def stop(self, name: str) -> None:
        from imagekit import glance_server

        glance_server.stop(self.home(name))

    def images(self, name: str) -> list[dict[str, Any]]:
        """Every image of cloud ``name`` (hidden ones too), as plain dicts."""
        from imagekit.cloud import connect
        from imagekit.glance import list_images

        old = os.environ.get("OS_CLIENT_CONFIG_FILE")
        os.environ["OS_CLIENT_CONFIG_FILE"] = str(self.clouds_yaml)
        try:
            return list_images(connect(name))
        finally:
            if old is None:
                os.environ.pop("OS_CLIENT_CONFIG_FILE", None)
            else:
                os.environ["OS_CLIENT_CONFIG_FILE"] = old


@pytest.fixture(scope="session")
def two_clouds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clouds]:
    pytest.importorskip("glance", reason="the server extra (glance) is not installed")
    base = tmp_path_factory.mktemp("clouds")
    clouds = Clouds(base, base / "clouds.yaml", {"cloud-a": free_port(), "cloud-b": free_port()})
    try:
        for name in clouds.ports:
            clouds.start(name)
        yield clouds
    finally:
        for name in clouds.ports:
            clouds.stop(name)


# ---------------------------------------------------------------- images


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """The tiny bootable image at ``/boot.qcow2`` on 127.0.0.1."""
    from tests import tiny_boot_image

    why = tiny_boot_image.missing()
    if why:
        pytest.skip(f"cannot make the tiny bootable image: {why}")
    www = tmp_path_factory.mktemp("www")
    shutil.copyfile(tiny_boot_image.tiny_boot_image(), www / "boot.qcow2")
    srv = FileServer(www).start()
    try:
        yield srv
    finally:
        srv.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- a project and its CLI


@dataclass
class CliRun:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Project:
    folder: Path
    env: dict[str, str]
    timings: list[tuple[str, float]] = field(default_factory=list)  # (command, seconds) of ``ci``

    @property
    def pipeline(self) -> Path:
        return self.folder / "imagekit-pipeline.yaml"

    def write_recipe(self, name: str, base_url: str, sha: str, extra: str = "",
                     output: str = "{compat: '1.1', cluster_size: 64K}", disk_size: str = "64M") -> Path:
        p = self.folder / "recipes" / f"{name}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"name: {name}\ndescription: tiny bootable test image\n"
                     "os: {type: linux, distro: debian, version: '12'}\n"
                     f"build:\n  method: cloud-image\n  base: {{url: {base_url}, sha256: '{sha}'}}\n"
                     f"disk_size: {disk_size}\noutput: {output}\n" + extra)
        return p

    def write_pipeline(self, doc: dict[str, Any]) -> Path:
        self.pipeline.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.pipeline

    def runner_env(self, home: str) -> dict[str, str]:
        h = self.folder / "homes" / home
        return {**self.env, "HOME": str(h), "IMAGEKIT_CACHE_DIR": str(h / "cache"),
                "IMAGEKIT_STATE_DIR": str(h / "state")}

    def popen(self, *args: str, home: str = "runner", events: Path | None = None) -> subprocess.Popen[str]:
        extra = ["--events", str(events)] if events is not None else []
        return subprocess.Popen([sys.executable, "-m", "imagekit", "--json", "ci", *args, *extra],
                                cwd=self.folder, env={**os.environ, **self.runner_env(home)}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ci(self, *args: str, home: str = "runner", timeout: float = 600) -> CliRun:
        t = time.monotonic()
        proc = self.popen(*args, home=home)
        out, err = proc.communicate(timeout=timeout)
        self.timings.append((" ".join(args[:2]), round(time.monotonic() - t, 1)))
        if out.strip():  # every --json document validates against its published schema (docs/schemas)
            from tests.json_contract import assert_document

            assert_document(f"ci {args[0]}", out)
        return CliRun(proc.returncode, out, err)


@pytest.fixture
def ci_project(tmp_path: Path, two_clouds: Clouds) -> Project:
    env = {"OS_CLIENT_CONFIG_FILE": str(two_clouds.clouds_yaml), "IMAGEKIT_ACCEL": "tcg",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Project(tmp_path / "project", env)


# ---------------------------------------------------------------- a relay that can stall


class TcpPause:
    """A TCP relay 127.0.0.1:port -> target. ``hold_after(n)``: once a connection has sent n bytes
    towards the server, its further bytes are held (``held`` is set) until ``release()`` or
    ``cut()`` (close every connection)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.threshold: int | None = None
        self.held = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_after(self, n: int) -> None:
        self.threshold = n
        self.held.clear()
        self._go.clear()

    def release(self) -> None:
        self.threshold = None
        self._go.set()

    def cut(self) -> None:
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._conns.clear()
        self.release()

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self.threshold is not None and sent + len(data) > self.threshold:
                    self.held.set()
                    self._go.wait()
                    if src.fileno() < 0:
                        break
                sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
