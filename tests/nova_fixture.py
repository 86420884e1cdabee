"""pytest fixture: a real Nova on 127.0.0.1 for the cloud snapshot tests (session-scoped).

What runs for real: nova-api (under gunicorn), nova-conductor, nova-scheduler and the
nova-compute manager of **nova 34** from PyPI, **openstack-placement** (gunicorn),
oslo.messaging over **RabbitMQ** from Debian, **SQLite** databases (with imagekit's SQLite
tuning: WAL, busy timeout, immediate writer transactions), and **imagekit's own local
Glance** (``imagekit.glance_server.serve(sqlite_tuning=True)``), which Nova downloads root
disks from and uploads snapshots to.

What is NOT real:

- **the hypervisor**: ``tests/nova/virt/imagekit_fake.py``, a subclass of Nova's own fake
  driver that really downloads the root disk from Glance at spawn and really uploads it
  on snapshot (through Nova's task states); there is no guest, its console log is scripted
  (imagekit's reporter markers) and server metadata knobs inject delays and failures;
- **Neutron**: ``tests/nova/neutron_stub.py`` answers empty port and network lists (Nova
  calls Neutron even for servers with ``networks: none``);
- **Keystone**: an identity filter (``imagekit.glance_identity``) in Nova's and Glance's
  paste pipelines turns the token ``USER:PROJECT[:ROLES]`` into identity headers, for
  loopback clients only; Placement runs with ``noauth2``. There is no service catalog, so
  clients use endpoint overrides (the clouds.yaml written here) and Nova has no Cinder.

Each session gets its own folder, free loopback ports, RabbitMQ node and epmd port; every
process is started through ``imagekit.process.Process`` in its own session and stopped by
its PID (then ``epmd -kill`` on the private port). ``nova_cloud`` yields a
:class:`NovaCloud`: ``env`` points a CLI subprocess at it (``OS_CLIENT_CONFIG_FILE``),
``connect()`` gives an openstacksdk connection, ``flavor`` a small flavor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagekit import glance_server
from imagekit.glance_identity import make_token
from imagekit.process import Process
from imagekit.run import run
from tests.conftest import ROOT

CLOUD = "imagekit-nova"
HOST = "imagekit-test-compute"
USER_ID = "9d5c4b3a2f1e4d0c8b7a69584736251a"
PROJECT_ID = "3e2d1c0b9a8f4e7d6c5b4a3928170615"
TOKEN = make_token(USER_ID, PROJECT_ID)
RABBIT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT = 240.0

NOVA_CONF = """\
[DEFAULT]
host = {host}
state_path = {nova}
instances_path = {nova}/instances
compute_driver = imagekit_fake.ImagekitFakeDriver
transport_url = rabbit://guest:guest@127.0.0.1:{rabbit}/
my_ip = 127.0.0.1
use_stderr = true
debug = false
# stop quickly, find the compute host at once (the default delay is random, up to 60 s)
graceful_shutdown_timeout = 1
periodic_fuzzy_delay = 0
heal_instance_info_cache_interval = -1

[api]
auth_strategy = keystone

[wsgi]
api_paste_config = {etc}/api-paste.ini

[api_database]
connection = sqlite:///{nova}/nova_api.sqlite

[database]
connection = sqlite:///{nova}/nova_cell1.sqlite

[oslo_concurrency]
lock_path = {nova}/locks

[oslo_messaging_notifications]
driver = noop

[placement]
auth_type = admin_token
token = admin
endpoint = http://127.0.0.1:{placement}
endpoint_override = http://127.0.0.1:{placement}

[glance]
endpoint_override = http://127.0.0.1:{glance}
num_retries = 0

[neutron]
auth_type = admin_token
token = admin
endpoint = http://127.0.0.1:{neutron}
endpoint_override = http://127.0.0.1:{neutron}

[scheduler]
discover_hosts_in_cells_interval = 2
workers = 1

[conductor]
workers = 1

[vnc]
enabled = false
"""

PLACEMENT_CONF = """\
[DEFAULT]
use_stderr = true

[api]
auth_strategy = noauth2

[placement_database]
connection = sqlite:///{placement}/placement.sqlite
"""

IDENTITY_FILTER = """
[filter:identity]
# Keystone stand-in (imagekit.glance_identity): X-Auth-Token USER:PROJECT[:ROLES], loopback only
paste.filter_factory = imagekit.glance_identity:filter_factory
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str | None:
    """Why this machine cannot run the test cloud, or None."""
    for mod, what in (("nova", "nova 34"), ("placement", "openstack-placement"), ("glance", "glance")):
        if importlib.util.find_spec(mod) is None:
            return f"{what} is not installed in this Python (the test extra: pip install -e '.[test,server]')"
    if not os.access(RABBIT, os.X_OK):
        return "rabbitmq-server (Debian) is not installed (make setup installs it)"
    return None


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:  # noqa: S310
            return bool(r.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _http_json(url: str, headers: dict[str, str]) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:  # noqa: S310
        return json.loads(r.read())


@dataclass
class NovaCloud:
    run: Path
    ports: dict[str, int]
    clouds_yaml: Path
    cloud: str = CLOUD
    procs: dict[str, Process] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    flavor: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {"OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml)}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}/v2.1"

    def connect(self) -> Any:
        import openstack

        from imagekit.cloud import load_region

        old = os.environ.get("OS_CLIENT_CONFIG_FILE")
        os.environ["OS_CLIENT_CONFIG_FILE"] = str(self.clouds_yaml)
        try:
            return openstack.connection.Connection(config=load_region(self.cloud))
        finally:
            if old is None:
                os.environ.pop("OS_CLIENT_CONFIG_FILE", None)
            else:
                os.environ["OS_CLIENT_CONFIG_FILE"] = old

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.procs[name].log_tail(lines) if name in self.procs else ""


# ---------------------------------------------------------------- start / stop


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def _write_configs(nc: NovaCloud) -> None:
    p = nc.ports
    dirs = {k: nc.run / k for k in ("etc", "nova", "placement", "glance", "rabbit", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["nova"] / "instances").mkdir()
    (dirs["nova"] / "locks").mkdir()
    etc = dirs["etc"]
    (etc / "nova.conf").write_text(NOVA_CONF.format(host=HOST, etc=etc, nova=dirs["nova"], **p))
    paste = (Path(sys.prefix) / "etc" / "nova" / "api-paste.ini").read_text()
    assert paste.count(" authtoken keystonecontext ") == 2, "Nova's api-paste.ini changed: two keystone pipelines expected"
    (etc / "api-paste.ini").write_text(paste.replace(" authtoken keystonecontext ", " identity keystonecontext ")
                                       + IDENTITY_FILTER)
    (etc / "placement.conf").write_text(PLACEMENT_CONF.format(placement=dirs["placement"]))
    (dirs["rabbit"] / "rabbitmq.conf").write_text(f"loopback_users.guest = true\nlisteners.tcp.default = {p['rabbit']}\n")
    (dirs["rabbit"] / "enabled_plugins").write_text("[].\n")
    clouds = {"clouds": {CLOUD: {
        "auth_type": "admin_token", "auth": {"endpoint": nc.api, "token": TOKEN},
        "compute_endpoint_override": nc.api,
        "image_endpoint_override": f"http://127.0.0.1:{p['glance']}/",
        "network_endpoint_override": f"http://127.0.0.1:{p['neutron']}/",
        "placement_endpoint_override": f"http://127.0.0.1:{p['placement']}/",
        "image_api_version": "2"}}}
    nc.clouds_yaml.write_text(json.dumps(clouds, indent=2))  # JSON is YAML


def _rabbit_env(nc: NovaCloud) -> dict[str, str]:
    r, p = nc.run / "rabbit", nc.ports
    return _env({"HOME": str(r), "RABBITMQ_NODENAME": f"imagekit-{p['rabbit']}@localhost",
                 "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(p["rabbit"]),
                 "RABBITMQ_DIST_PORT": str(p["rabbit_dist"]), "ERL_EPMD_PORT": str(p["epmd"]),
                 "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
                 "RABBITMQ_LOG_BASE": str(r / "log"), "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq"),
                 "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
                 "RABBITMQ_PID_FILE": str(r / "rabbit.pid"), "RABBITMQ_LOGS": "-",
                 "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
                 "RABBITMQ_ADVANCED_CONFIG_FILE": str(r / "advanced.config")})


def _start(nc: NovaCloud, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
    proc = Process(argv, log_path=nc.run / "logs" / f"{name}.log", env=env or _env(), cwd=nc.run).start()
    nc.procs[name] = proc
    return proc


def _gunicorn(nc: NovaCloud, name: str, port: int, app: str, env: dict[str, str]) -> Process:
    return _start(nc, name, [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "4", "--keep-alive", "75",
                             "--timeout", "300", "--graceful-timeout", "5", "--bind", f"127.0.0.1:{port}",
                             "--name", f"imagekit-test-{name}", app], env)


def _wait(nc: NovaCloud, what: str, check: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    t = time.monotonic()
    while True:
        for name, proc in nc.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {name} exited ({proc.returncode}):\n{proc.log_tail(40)}")
        with contextlib.suppress(Exception):
            if check():
                nc.timings[what] = round(time.monotonic() - t, 2)
                return
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"{what}: not ready within {timeout:g} s; logs in {nc.run / 'logs'}")
        time.sleep(0.2)


def _finish(nc: NovaCloud, name: str, proc: Process, timeout: float = 300) -> None:
    if proc.wait(timeout) != 0:
        raise RuntimeError(f"{name} failed:\n{proc.log_tail(40)}")
    nc.procs.pop(name)


def _queue_exists(port: int, queue: str) -> bool:
    import kombu

    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:{port}//", connect_timeout=2) as conn:
        try:
            conn.default_channel.queue_declare(queue=queue, passive=True)
            return True
        except Exception:  # noqa: BLE001 - NOT_FOUND closes the channel
            return False


def _amqp_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        return s.recv(1) == b"\x01"  # frame type 1: Connection.Start


def _host_mapped(nc: NovaCloud) -> bool:
    con = sqlite3.connect(f"file:{nc.run / 'nova' / 'nova_api.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return bool(con.execute("select count(*) from host_mappings where host=?", (HOST,)).fetchone()[0])
    finally:
        con.close()


def _phase1(nc: NovaCloud) -> None:
    """RabbitMQ, the Neutron stub, Glance, and the databases (all at once), then Placement."""
    etc, p = nc.run / "etc", nc.ports
    _start(nc, "rabbitmq", [RABBIT], _rabbit_env(nc))
    _start(nc, "neutron-stub", [sys.executable, "-m", "tests.nova.neutron_stub", str(p["neutron"])])
    pdb = _start(nc, "placement-db", [sys.executable, "-c", "import sys; from placement.cmd.manage import main; "
                                      "sys.exit(main())", "--config-file", str(etc / "placement.conf"), "db", "sync"])
    ndb = _start(nc, "nova-db", [sys.executable, "-m", "tests.nova.launch", "manage-setup", str(etc / "nova.conf"),
                                 f"sqlite:///{nc.run / 'nova' / 'nova_cell0.sqlite'}"])
    t = time.monotonic()
    glance_server.serve(port=p["glance"], home=nc.run / "glance", write_clouds=False, timeout=START_TIMEOUT,
                        sqlite_tuning=True)
    nc.timings["glance"] = round(time.monotonic() - t, 2)
    _finish(nc, "placement-db", pdb)
    _gunicorn(nc, "placement", p["placement"], "tests.nova.launch:placement",
              _env({"OS_PLACEMENT_CONFIG_DIR": str(etc)}))
    _finish(nc, "nova-db", ndb)
    nc.timings["databases"] = round(time.monotonic() - t, 2)


def _phase2(nc: NovaCloud) -> None:
    """nova-api, conductor, scheduler; compute once the conductor consumes (else its first call
    waits for an RPC timeout); then wait until the compute host is up, in Placement and mapped."""
    conf, p = str(nc.run / "etc" / "nova.conf"), nc.ports
    _gunicorn(nc, "nova-api", p["api"], "tests.nova.launch:api", _env({"OS_NOVA_CONFIG_DIR": str(nc.run / "etc")}))
    for name in ("conductor", "scheduler"):
        _start(nc, f"nova-{name}", [sys.executable, "-m", "tests.nova.launch", name, "--config-file", conf])
    _wait(nc, "rabbitmq", lambda: _amqp_ok(p["rabbit"]))
    _wait(nc, "conductor queue", lambda: _queue_exists(p["rabbit"], "conductor"))
    _start(nc, "nova-compute", [sys.executable, "-m", "tests.nova.launch", "compute", "--config-file", conf])
    hdr = {"X-Auth-Token": TOKEN}

    def services_up() -> bool:
        svcs = _http_json(f"{nc.api}/os-services", hdr)["services"]
        return {"nova-conductor", "nova-scheduler", "nova-compute"} <= {s["binary"] for s in svcs if s["state"] == "up"}

    def provider() -> bool:
        rps = _http_json(f"http://127.0.0.1:{p['placement']}/resource_providers", {"X-Auth-Token": "admin"})
        return any(r["name"] == HOST for r in rps["resource_providers"])

    _wait(nc, "placement", lambda: _http_ok(f"http://127.0.0.1:{p['placement']}/"))
    _wait(nc, "nova-api", lambda: _http_ok(f"http://127.0.0.1:{p['api']}/"))
    _wait(nc, "nova services up", services_up)
    _wait(nc, "resource provider", provider)
    _wait(nc, "host mapped", lambda: _host_mapped(nc))


def start(base: Path) -> NovaCloud:
    ports = {k: free_port() for k in ("rabbit", "rabbit_dist", "epmd", "placement", "glance", "neutron", "api")}
    nc = NovaCloud(run=base, ports=ports, clouds_yaml=base / "clouds.yaml")
    t = time.monotonic()
    try:
        _write_configs(nc)
        _phase1(nc)
        _phase2(nc)
        conn = nc.connect()
        nc.flavor = conn.compute.create_flavor(name="imagekit-test", ram=64, vcpus=1, disk=1).id
    except BaseException:
        stop(nc)
        raise
    nc.timings["total"] = round(time.monotonic() - t, 2)
    return nc


def stop(nc: NovaCloud) -> None:
    """Every process by its PID, at the same time (RabbitMQ after the services), then the private epmd."""
    from concurrent.futures import ThreadPoolExecutor

    t = time.monotonic()
    rabbit = nc.procs.pop("rabbitmq", None)
    with ThreadPoolExecutor(max_workers=len(nc.procs) + 1) as pool:
        for proc in nc.procs.values():
            pool.submit(proc.stop, 20)
        pool.submit(glance_server.stop, nc.run / "glance")
    nc.procs.clear()
    if rabbit is not None:
        rabbit.stop(timeout=20)
    if shutil.which("epmd"):
        run(["epmd", "-kill"], env={"ERL_EPMD_PORT": str(nc.ports["epmd"])}, timeout=30, check=False)
    nc.timings["stop"] = round(time.monotonic() - t, 2)


@pytest.fixture(scope="session")
def nova_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NovaCloud]:
    """The session's Nova (see the module documentation)."""
    why = missing()
    if why:
        pytest.skip(why)
    nc = start(tmp_path_factory.mktemp("nova"))
    try:
        yield nc
    finally:
        stop(nc)
