"""A real Glance API on 127.0.0.1 for everyone without a cloud account.

``serve()`` runs the ``glance`` package from PyPI (the ``server`` extra) under
gunicorn with SQLite and a file store, each instance in its own directory:

    HOME/etc/      glance-api.conf, glance-api-paste.ini
    HOME/data/     glance.sqlite, images/, staging/, tasks/, cache/ (or --dir)
    HOME/server.json, HOME/server.log

``HOME`` defaults to ``paths.state_dir()/glance``. There is no Keystone: the
paste pipeline is Glance's keystone pipeline with ``imagekit.glance_identity`` in
place of ``authtoken`` (a token ``USER:PROJECT[:ROLES]`` from a loopback client
becomes Glance's identity headers), so the clouds.yaml entry written here (cloud
``imagekit-local``, ``auth_type: admin_token``: that token and the endpoint) works
for every OpenStack client; ``shell_env`` gives the same for clients that read no
clouds.yaml (``imagekit glance env``).

The server outlives the command that starts it: it is a detached
``imagekit.process.Process`` (its own process session, so a Ctrl-C in the terminal
does not reach it; PID in ``HOME/server.pid``), and it is stopped with SIGTERM to
its own PID (gunicorn ends its workers), SIGKILL to its group if it does not stop,
each only after ``/proc/PID/cmdline`` showed it is still the gunicorn serving HOME
(a recycled PID is never signalled).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from imagekit import paths
from imagekit.errors import ImagekitError
from imagekit.glance_identity import make_token
from imagekit.process import Process, cmdline_has
from imagekit.run import run

CLOUD_NAME = "imagekit-local"
PROJECT_ID = "0c1b5a9e6f3d4e2a9b7c8d6e5f4a3b21"
USER_ID = "5e2f3a1b9c8d4e7f8a6b5c4d3e2f1a09"
ROLES = "admin,member,reader"
# The token clients send (auth_type admin_token); imagekit.glance_identity turns it into the
# identity headers Glance's context middleware reads.
TOKEN = make_token(USER_ID, PROJECT_ID)
AUTH_HEADERS = {"X-Auth-Token": TOKEN}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class GlanceServerError(ImagekitError):
    """The local Glance cannot be started, stopped or found."""


@dataclass
class ServerInfo:
    pid: int
    port: int
    endpoint: str
    home: str
    data_dir: str
    log: str
    started_at: str
    start_seconds: float
    cloud: str
    clouds_yaml: str | None
    running: bool = True
    already_running: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_home() -> Path:
    return paths.state_dir() / "glance"


def default_clouds_yaml() -> Path:
    """``OS_CLIENT_CONFIG_FILE`` when set, else ``~/.config/openstack/clouds.yaml``."""
    env = os.environ.get("OS_CLIENT_CONFIG_FILE")
    if env:
        return Path(env)
    return Path.home() / ".config" / "openstack" / "clouds.yaml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_glance() -> None:
    try:
        import glance  # noqa: F401
        import gunicorn  # noqa: F401
    except ImportError as exc:
        raise GlanceServerError(
            f"the local Glance needs the 'glance' and 'gunicorn' packages ({exc.name} is missing)",
            "install the server extra: .venv/bin/pip install -e '.[server]' (make setup does it)",
        ) from exc


# ---------------------------------------------------------------- configuration

_PASTE = """\
# Written by imagekit: Glance's keystone pipeline with imagekit.glance_identity where
# authtoken would be: X-Auth-Token USER:PROJECT[:ROLES] from loopback clients becomes the
# identity headers (no Keystone runs).
[composite:glance-api-imagekit]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
imagekit = cors http_proxy_to_wsgi versionnegotiation osprofiler identity context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = {data}/healthcheck_disable

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:identity]
paste.filter_factory = imagekit.glance_identity:filter_factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:osprofiler]
paste.filter_factory = osprofiler.web:WsgiMiddleware.factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = glance
oslo_config_program = glance-api

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
"""

_CONF = """\
# Written by imagekit for a loopback-only Glance (SQLite, file store, no Keystone).
[DEFAULT]
bind_host = 127.0.0.1
bind_port = {port}
workers = 1
hashing_algorithm = {hashing_algorithm}
enabled_backends = fs:file, http:http
enabled_import_methods = [glance-direct,web-download,copy-image]
worker_self_reference_url = http://127.0.0.1:{port}
image_cache_dir = {data}/cache
show_image_direct_url = false
use_stderr = true
debug = false

[database]
connection = sqlite:///{data}/glance.sqlite

[paste_deploy]
flavor = imagekit
config_file = {etc}/glance-api-paste.ini

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {data}/images

[os_glance_staging_store]
filesystem_store_datadir = {data}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {data}/tasks

[task]
task_executor = taskflow

[taskflow_executor]
engine_mode = serial

[import_filtering_opts]
allowed_schemes = [http]
allowed_hosts = [127.0.0.1]
allowed_ports = []

[oslo_concurrency]
lock_path = {data}/locks

[oslo_policy]
enforce_scope = false
"""


def _write_config(home: Path, data: Path, port: int, hashing_algorithm: str = "sha512") -> Path:
    etc = home / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "staging", "tasks", "cache", "locks"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (etc / "glance-api-paste.ini").write_text(_PASTE.format(data=data), encoding="utf-8")
    conf = etc / "glance-api.conf"
    conf.write_text(_CONF.format(port=port, data=data, etc=etc, hashing_algorithm=hashing_algorithm),
                    encoding="utf-8")
    return conf


def _db_sync(conf: Path, data: Path) -> None:
    if (data / "glance.sqlite").exists() and (data / ".db-synced").exists():
        return
    run([sys.executable, "-c", "import sys; from glance.cmd.manage import main; sys.exit(main())",
         "--config-file", str(conf), "db_sync"], timeout=180)
    (data / ".db-synced").write_text("ok\n", encoding="utf-8")


# ---------------------------------------------------------------- process state


def _state_file(home: Path) -> Path:
    return home / "server.json"


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_state_file(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _identity(home: Path) -> str:
    """What the server's command line carries (gunicorn's ``--name``): how a PID is recognised as ours."""
    return f"imagekit-glance:{home}"


def _pid_file(home: Path) -> Path:
    return home / "server.pid"


def _is_ours(pid: int, home: Path) -> bool:
    """PID is alive and is the gunicorn that serves HOME (not a recycled PID)."""
    return cmdline_has(pid, _identity(home)) and cmdline_has(pid, "gunicorn")


def _attach(home: Path, timeout: float = STOP_TIMEOUT) -> Process | None:
    """The running server of HOME (from its PID file, else the PID in server.json), or None."""
    pf = _pid_file(home)
    if not pf.exists():
        st = _read_state(home)
        pid = int(st.get("pid", 0)) if st else 0
        if pid <= 0:
            return None
        pf.write_text(f"{pid}\n", encoding="utf-8")
    proc = Process.attach(pf, _identity(home), log_path=home / "server.log", term_group=False, stop_timeout=timeout)
    return proc if proc is not None and _is_ours(proc.pid or 0, home) else None


def _answers(endpoint: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/versions", timeout=timeout) as resp:  # noqa: S310 - loopback URL
            return bool(resp.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- clouds.yaml


def write_clouds_yaml(path: Path, endpoint: str, cloud: str = CLOUD_NAME) -> Path:
    """Add or replace ``cloud`` in clouds.yaml, keeping other clouds and a ``.bak`` copy."""
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise GlanceServerError(f"cannot read {path}: {exc}",
                                    "fix or move the file, or point OS_CLIENT_CONFIG_FILE at another file") from exc
        if not isinstance(loaded, dict):
            raise GlanceServerError(f"{path} is not a YAML mapping", "fix or move the file")
        existing = loaded
        shutil.copy2(path, path.with_name(path.name + ".bak"))
    clouds = existing.get("clouds")
    if not isinstance(clouds, dict):
        clouds = {}
    # Standard keystoneauth: a fixed token and an endpoint, so openstack, glance,
    # openstacksdk, imagekit and Nova all use this entry as it is.
    clouds[cloud] = {
        "auth_type": "admin_token",
        "auth": {"token": TOKEN, "endpoint": endpoint},
        "image_api_version": "2",
        # the base URL with a slash: openstacksdk then discovers /v2 (without it, admin_token's
        # endpoint is used as the versioned one)
        "image_endpoint_override": endpoint.rstrip("/") + "/",
    }
    existing["clouds"] = clouds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(existing, sort_keys=False), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- serve / stop / status


def _wait_answers(proc: Process, endpoint: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise GlanceServerError(f"the local Glance exited with status {proc.returncode} while starting:\n"
                                    f"{proc.log_tail()}", f"full log: {log}")
        if _answers(endpoint, timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise GlanceServerError(f"the local Glance did not answer within {timeout:g} s:\n{proc.log_tail()}",
                                    f"full log: {log}")
        time.sleep(0.1)


def serve(port: int | None = None, data_dir: str | os.PathLike[str] | None = None,
          home: str | os.PathLike[str] | None = None, clouds_yaml: str | os.PathLike[str] | None = None,
          write_clouds: bool = True, cloud: str = CLOUD_NAME, timeout: float = START_TIMEOUT,
          hashing_algorithm: str = "sha512", sqlite_tuning: bool = False) -> ServerInfo:
    """Start the local Glance (or return the one already running for HOME) and wait until it answers.

    ``hashing_algorithm`` is Glance's option of that name (what ``os_hash_value`` holds).
    ``sqlite_tuning``: serve ``imagekit.glance_wsgi`` (WAL, busy timeout, immediate writer
    transactions: ``imagekit.sqlite_tuning``) for a Glance that other services such as Nova
    call while clients upload."""
    home_p = Path(home) if home is not None else default_home()
    home_p = home_p.resolve()
    current = status(home_p)
    if current is not None and current.running:
        current.already_running = True
        return current
    _require_glance()
    data = Path(data_dir).resolve() if data_dir is not None else home_p / "data"
    port = port or free_port()
    if port < 1 or port > 65535:
        raise GlanceServerError(f"port {port} is out of range")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise GlanceServerError(f"port {port} on 127.0.0.1 is in use", "choose another one with --port") from exc
    home_p.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    conf = _write_config(home_p, data, port, hashing_algorithm)
    _db_sync(conf, data)
    log = home_p / "server.log"
    endpoint = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--threads", "4", "--timeout", "600", "--graceful-timeout", "5",
            "--name", _identity(home_p),
            "imagekit.glance_wsgi:application" if sqlite_tuning else "glance.wsgi.api:application"]
    proc = Process(argv, log_path=log, env={"OS_GLANCE_CONFIG_DIR": str(conf.parent)}, cwd=home_p, detached=True,
                   pid_file=_pid_file(home_p), identity=_identity(home_p), term_group=False,
                   stop_timeout=STOP_TIMEOUT).start()
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    try:
        _wait_answers(proc, endpoint, timeout, log)
    except BaseException:
        proc.stop()
        raise
    elapsed = round(time.monotonic() - t0, 2)
    clouds_path = Path(clouds_yaml) if clouds_yaml is not None else default_clouds_yaml()
    assert proc.pid is not None
    info = ServerInfo(pid=proc.pid, port=port, endpoint=endpoint, home=str(home_p), data_dir=str(data),
                      log=str(log), started_at=started_at, start_seconds=elapsed, cloud=cloud,
                      clouds_yaml=str(clouds_path) if write_clouds else None)
    _state_file(home_p).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
    if write_clouds:
        write_clouds_yaml(clouds_path, endpoint, cloud)
    return info


def status(home: str | os.PathLike[str] | None = None) -> ServerInfo | None:
    """The recorded server for HOME (``running`` False when it is gone), or None if none was started."""
    home_p = (Path(home) if home is not None else default_home()).resolve()
    st = _read_state(home_p)
    if st is None:
        return None
    try:
        info = ServerInfo(**{k: st[k] for k in ServerInfo.__dataclass_fields__ if k in st})
    except TypeError:
        return None
    info.running = _is_ours(info.pid, home_p) and _answers(info.endpoint)
    return info


def stop(home: str | os.PathLike[str] | None = None, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
    """Stop the local Glance of HOME. Returns what was done; not running is not an error."""
    home_p = (Path(home) if home is not None else default_home()).resolve()
    st = _read_state(home_p)
    if st is None:
        return {"stopped": False, "reason": "no local Glance was started here", "home": str(home_p)}
    pid = int(st.get("pid", 0))
    proc = _attach(home_p, timeout)
    was = proc is not None and proc.stop()
    for f in (_state_file(home_p), _pid_file(home_p)):
        with contextlib.suppress(OSError):
            f.unlink()
    return {"stopped": was, "pid": pid, "home": str(home_p),
            "reason": None if was else "it was not running any more"}


def kill(home: str | os.PathLike[str]) -> None:
    """SIGKILL the server of HOME and its workers at once (tests: a server that dies mid-upload)."""
    proc = _attach(Path(home).resolve())
    if proc is not None:
        proc.kill()


def shell_env(endpoint: str, cloud: str = CLOUD_NAME) -> dict[str, str]:
    """Variables for clients that read no clouds.yaml (the ``glance`` CLI): token and image URL."""
    return {"OS_CLOUD": cloud, "OS_AUTH_TOKEN": TOKEN, "OS_IMAGE_URL": endpoint}
