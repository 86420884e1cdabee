"""Offline customisation on a real Debian 12 image in the real libguestfs appliance (TCG).

Appliance launches cost ~15-25 s each under TCG, so ONE customise run applies
most steps (module fixture ``customised``) and ONE read-only session on its
output verifies them all (``result`` fixture); the remaining tests each launch
at most once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from imagekit.steps import Step
from tests import guest_image
from tests.json_contract import assert_document

pytestmark = guest_image.NEEDS_GUEST

STEPS = TypeAdapter(list[Step])
ROOT_HASH = "$6$imagekitRoot$Wq3Jv8hT0d1PqZ8yqk2rV4mQdK0cPj9bWq2n6sE1bZ5aY7xO8uI3tR4eW5qP6oL7kJ8hG9fD0sA1zX2cV3bN4m"
ALICE_HASH = "$6$imagekitAlice$Aa1Bb2Cc3Dd4Ee5Ff6Gg7Hh8Ii9Jj0Kk1Ll2Mm3Nn4Oo5Pp6Qq7Rr8Ss9Tt0Uu1Vv2Ww3Xx4Yy5Zz6aa7bb8cc"
KEY_ALICE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKc0WnYdtYgrJ0U6M5bvOj2DqsyX4ErUeGxQiRcbeyRb alice@laptop"
KEY_ROOT = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFv9hRhMg5e4m6Yh7rZ1pPq2Rk5G3T8nLwXyVb0cDeFg ops@bastion"
GROW_TO = 2 * 1024 * 1024 * 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def base_image() -> Path:
    """The cached Debian 12 test image (built once, ~2.5 min cold, under the machine's build lock)."""
    return guest_image.debian_image()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Customised:
    input: Path
    input_sha_before: str
    output: Path
    results: list[Any]
    callback_results: list[Any]
    logs: list[str]
    upload_src: Path


@pytest.fixture(scope="module")
def customised(base_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Customised]:
    """ONE customise run over nearly every step kind, on a qcow2 copy grown to 2 GiB."""
    from imagekit.customise import customise

    tmp = tmp_path_factory.mktemp("customise")
    src = tmp / "input.qcow2"
    qemu_img("convert", "-f", "qcow2", "-O", "qcow2", base_image, src)
    qemu_img("resize", "-f", "qcow2", src, str(GROW_TO))
    payload = tmp / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 40)
    key_file = tmp / "root_key.pub"
    key_file.write_text(KEY_ROOT + "\n")
    before = sha256(src)
    steps = STEPS.validate_python([
        {"op": "user", "name": "alice", "groups": ["adm", "imagekit-ops"], "password_hash": ALICE_HASH,
         "ssh_keys": [KEY_ALICE], "sudo": True},                                                  # 0
        {"op": "write", "path": "/etc/imagekit/hello.txt", "content": "hello\n", "mode": "0640",
         "owner": "alice:adm"},                                                                   # 1
        {"op": "append", "path": "/etc/imagekit/hello.txt", "content": "world\n"},               # 2
        {"op": "upload", "src": str(payload), "dest": "/opt/data/", "mode": "0600",
         "owner": "alice"},                                                                       # 3
        {"op": "mkdir", "path": "/srv/app/logs", "mode": "0750", "owner": "alice:alice"},        # 4
        {"op": "chmod", "path": "/srv/app", "mode": "0711"},                                      # 5
        {"op": "chown", "path": "/srv/app", "owner": "alice:imagekit-ops"},                       # 6
        {"op": "delete", "path": "/etc/motd"},                                                    # 7
        {"op": "delete", "path": "/usr/share/doc/apt", "recursive": True},                        # 8
        {"op": "run", "command": "echo out-marker; echo err-marker >&2; touch /root/ran-by-imagekit"},  # 9
        {"op": "script", "content": "#!/bin/bash\necho \"bash ${BASH_VERSINFO[0]}\" > /root/script-ran\n"},  # 10
        {"op": "install", "packages": ["tree", "hello"]},                                         # 11
        {"op": "uninstall", "packages": ["hello"]},                                               # 12
        {"op": "services", "enable": ["systemd-networkd.service"], "disable": ["ssh.service"],
         "mask": ["apt-daily.timer"]},                                                            # 13
        {"op": "root-password", "hash": ROOT_HASH},                                               # 14
        {"op": "ssh-key", "user": "root", "key_file": str(key_file)},                             # 15
        {"op": "hostname", "hostname": "web01.example.org"},                                      # 16
        {"op": "timezone", "timezone": "Europe/Paris"},                                           # 17
        {"op": "locale", "locale": "C.UTF-8"},                                                    # 18
        {"op": "cloud-init", "datasources": ["NoCloud", "OpenStack", "None"],
         "config": {"ssh_pwauth": False, "users": ["default"]}},                                  # 19
        {"op": "firstboot", "command": "echo first > /root/firstboot-ran"},                       # 20
        {"op": "selinux-relabel"},                                                                # 21
        {"op": "grow-root"},                                                                      # 22
        {"op": "sysprep"},                                                                        # 23
        {"op": "sparsify"},                                                                       # 24
    ])
    handler = _Records()
    logger = logging.getLogger("imagekit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    seen: list[Any] = []
    out = tmp / "output.qcow2"
    t0 = time.monotonic()
    try:
        results = customise(src, steps, output=out, log=seen.append)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    print(f"\ncustomise: {time.monotonic() - t0:.1f} s in all")
    for r in results:  # timings, shown with pytest -s
        print(f"step {r.index:2d} {r.op:<16} {r.duration:6.1f} s  {r.summary}")
    yield Customised(src, before, out, results, seen, handler.lines, payload)


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagekit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def cli_in_place(customised: Customised) -> subprocess.CompletedProcess[str]:
    """``imagekit customise --in-place`` on the OUTPUT of the shared run, before it is read back
    (saves two appliance launches: the read-back session verifies both)."""
    return _cli("customise", str(customised.output), "--in-place", "--json",
                "--step", "{op: write, path: /etc/cli-marker, content: \"written by the CLI\\n\"}",
                "--step", '{"op": "root-password", "hash": "' + ROOT_HASH + '"}')


@dataclass
class Readback:
    files: dict[str, str]
    modes: dict[str, int]
    owners: dict[str, tuple[int, int]]
    exists: dict[str, bool]
    links: dict[str, str]
    dirs: dict[str, list[str]]
    info: dict[str, Any]
    root_size: int
    part_end: int
    disk_size: int


READ_FILES = ("/etc/imagekit/hello.txt", "/etc/passwd", "/etc/shadow", "/etc/group", "/etc/hostname", "/etc/hosts",
              "/etc/timezone", "/etc/default/locale", "/etc/locale.conf",
              "/etc/cloud/cloud.cfg.d/95_imagekit_datasources.cfg", "/etc/cloud/cloud.cfg.d/96_imagekit.cfg",
              "/etc/systemd/system/imagekit-firstboot.service", "/usr/lib/imagekit/firstboot/scripts/0001-imagekit",
              "/etc/machine-id", "/home/alice/.ssh/authorized_keys", "/root/.ssh/authorized_keys",
              "/etc/sudoers.d/90-imagekit-alice", "/var/lib/dpkg/status", "/root/script-ran",
              "/var/log/imagekit-test.log", "/etc/cli-marker")
STAT_PATHS = ("/etc/imagekit/hello.txt", "/opt/data/payload.bin", "/srv/app", "/srv/app/logs", "/home/alice/.ssh",
              "/home/alice/.ssh/authorized_keys", "/root/.ssh", "/root/.ssh/authorized_keys",
              "/etc/sudoers.d/90-imagekit-alice", "/usr/lib/imagekit/firstboot/firstboot.sh",
              "/usr/lib/imagekit/firstboot/scripts/0001-imagekit", "/etc/shadow")
EXISTS = ("/etc/motd", "/usr/share/doc/apt", "/root/ran-by-imagekit", "/usr/bin/tree", "/usr/bin/hello",
          "/root/.bash_history", "/var/lib/dhcp/dhclient.eth0.leases", "/etc/resolv.conf", "/.autorelabel",
          "/var/cache/apt/pkgcache.bin")
LINKS = ("/etc/localtime", "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
         "/etc/systemd/system/apt-daily.timer",
         "/etc/systemd/system/multi-user.target.wants/imagekit-firstboot.service")


@pytest.fixture(scope="module")
def result(customised: Customised, cli_in_place: subprocess.CompletedProcess[str]) -> Readback:
    """Everything the assertions need, read back from the output in ONE fresh read-only session."""
    from imagekit.guest import open_image
    from imagekit.sbom import guest_info

    with open_image(customised.output, readonly=True, fmt="qcow2") as s:
        g = s.g
        files = {p: s.read_text(p) for p in READ_FILES if s.is_file(p)}
        modes, owners = {}, {}
        for p in STAT_PATHS:
            if s.exists(p):
                st = g.lstatns(p)
                modes[p] = st["st_mode"] & 0o7777
                owners[p] = (st["st_uid"], st["st_gid"])
        exists = {p: bool(g.exists(p)) or bool(g.is_symlink(p)) for p in EXISTS}
        links = {p: g.readlink(p) for p in LINKS if g.is_symlink(p)}
        dirs = {d: sorted(g.ls(d)) for d in ("/etc/ssh", "/tmp", "/var/lib/cloud", "/etc/cloud/cloud.cfg.d")
                if s.is_dir(d)}
        stv = g.statvfs("/")
        parts = g.part_list("/dev/sda")
        return Readback(files, modes, owners, exists, links, dirs, guest_info(s),
                        stv["blocks"] * stv["bsize"], max(p["part_end"] for p in parts) + 1,
                        g.blockdev_getsize64("/dev/sda"))


def _passwd(text: str, name: str) -> list[str]:
    return next(line.split(":") for line in text.splitlines() if line.split(":")[0] == name)


# ---------------------------------------------------------------- the shared run


def test_every_step_succeeded_and_was_reported(customised: Customised) -> None:
    ops = [r.op for r in customised.results]
    assert len(ops) == 25
    assert all(r.ok for r in customised.results), [r.summary for r in customised.results if not r.ok]
    assert [r.index for r in customised.results] == list(range(25))
    assert customised.callback_results == customised.results
    assert all(r.duration >= 0 for r in customised.results)
    assert any("step 11 (install)" in line for line in customised.logs)


def test_input_untouched_and_no_leftovers(customised: Customised) -> None:
    assert sha256(customised.input) == customised.input_sha_before
    names = sorted(p.name for p in customised.output.parent.iterdir())
    assert not [n for n in names if "imagekit" in n], names  # overlay and partial output are gone
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(customised.output)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info  # a standalone image, not an overlay


def test_password_hashes_never_logged(customised: Customised) -> None:
    texts = list(customised.logs)
    for r in customised.results:
        texts += [r.summary, r.output]
    blob = "\n".join(texts)
    assert ROOT_HASH not in blob and ALICE_HASH not in blob
    assert "$6$imagekit" not in blob
    assert "hash not shown" in customised.results[14].summary


def test_files_written_appended_uploaded(customised: Customised, result: Readback) -> None:
    assert result.files["/etc/imagekit/hello.txt"] == "hello\nworld\n"
    assert result.modes["/etc/imagekit/hello.txt"] == 0o640
    alice = _passwd(result.files["/etc/passwd"], "alice")
    adm = _passwd(result.files["/etc/group"], "adm")
    assert result.owners["/etc/imagekit/hello.txt"] == (int(alice[2]), int(adm[2]))
    assert result.modes["/opt/data/payload.bin"] == 0o600
    assert result.owners["/opt/data/payload.bin"][0] == int(alice[2])
    assert "uploaded" in customised.results[3].summary and "10240 bytes" in customised.results[3].summary


def test_mkdir_chmod_chown_delete(result: Readback) -> None:
    alice = _passwd(result.files["/etc/passwd"], "alice")
    ops = _passwd(result.files["/etc/group"], "imagekit-ops")
    assert result.modes["/srv/app/logs"] == 0o750
    assert result.owners["/srv/app/logs"] == (int(alice[2]), int(alice[3]))
    assert result.modes["/srv/app"] == 0o711
    assert result.owners["/srv/app"] == (int(alice[2]), int(ops[2]))
    assert not result.exists["/etc/motd"]
    assert not result.exists["/usr/share/doc/apt"]


def test_run_and_script_inside_the_guest(customised: Customised, result: Readback) -> None:
    assert result.exists["/root/ran-by-imagekit"]
    run = customised.results[9]
    assert "out-marker" in run.output and "err-marker" in run.output
    assert result.files["/root/script-ran"] == "bash 5\n"


def test_packages_installed_and_removed_from_the_mirror(customised: Customised, result: Readback) -> None:
    status = guest_image.dpkg_status(result.files["/var/lib/dpkg/status"])
    assert status["tree"]["Status"] == "install ok installed"
    assert result.exists["/usr/bin/tree"]
    assert "hello" not in status or status["hello"]["Status"] != "install ok installed"
    assert not result.exists["/usr/bin/hello"]
    assert "Setting up tree" in customised.results[11].output
    # the appliance's resolv.conf was only there while the commands ran
    assert not result.exists["/etc/resolv.conf"]
    # the SBOM of the result lists the package just installed, with dpkg's version
    apps = {a["name"]: a for a in result.info["applications"]}
    assert apps["tree"]["version"] == status["tree"]["Version"]


def test_services(result: Readback) -> None:
    assert result.links["/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"].endswith(
        "/systemd-networkd.service")
    assert result.links["/etc/systemd/system/apt-daily.timer"] == "/dev/null"


def test_users_passwords_and_ssh_keys(result: Readback) -> None:
    alice = _passwd(result.files["/etc/passwd"], "alice")
    assert alice[5] == "/home/alice" and alice[6] == "/bin/bash"
    shadow = {f[0]: f for f in (ln.split(":") for ln in result.files["/etc/shadow"].splitlines())}
    assert shadow["alice"][1] == ALICE_HASH
    assert shadow["root"][1] == ROOT_HASH
    assert result.modes["/etc/shadow"] & 0o007 == 0  # the shadow file stays private
    groups = {f[0]: f for f in (ln.split(":") for ln in result.files["/etc/group"].splitlines())}
    assert "alice" in groups["adm"][3].split(",") and "alice" in groups["imagekit-ops"][3].split(",")
    uid, gid = int(alice[2]), int(alice[3])
    assert result.files["/home/alice/.ssh/authorized_keys"] == KEY_ALICE + "\n"
    assert result.modes["/home/alice/.ssh"] == 0o700
    assert result.modes["/home/alice/.ssh/authorized_keys"] == 0o600
    assert result.owners["/home/alice/.ssh"] == (uid, gid)
    assert result.owners["/home/alice/.ssh/authorized_keys"] == (uid, gid)
    assert result.files["/root/.ssh/authorized_keys"] == KEY_ROOT + "\n"
    assert result.modes["/root/.ssh/authorized_keys"] == 0o600
    assert result.owners["/root/.ssh/authorized_keys"] == (0, 0)
    assert result.files["/etc/sudoers.d/90-imagekit-alice"] == "alice ALL=(ALL) NOPASSWD:ALL\n"
    assert result.modes["/etc/sudoers.d/90-imagekit-alice"] == 0o440


def test_hostname_timezone_locale(result: Readback) -> None:
    assert result.files["/etc/hostname"] == "web01.example.org\n"
    assert "127.0.1.1\tweb01.example.org web01" in result.files["/etc/hosts"].splitlines()
    assert result.links["/etc/localtime"] == "../usr/share/zoneinfo/Europe/Paris"
    assert result.files["/etc/timezone"] == "Europe/Paris\n"
    assert result.files["/etc/default/locale"] == "LANG=C.UTF-8\n"
    assert result.files["/etc/locale.conf"] == "LANG=C.UTF-8\n"
    assert result.info["os"]["hostname"] == "web01.example.org"


def test_cloud_init_config(result: Readback) -> None:
    import yaml

    ds = yaml.safe_load(result.files["/etc/cloud/cloud.cfg.d/95_imagekit_datasources.cfg"])
    assert ds == {"datasource_list": ["NoCloud", "OpenStack", "None"]}
    cfg_text = result.files["/etc/cloud/cloud.cfg.d/96_imagekit.cfg"]
    assert cfg_text.startswith("#cloud-config\n")
    assert yaml.safe_load(cfg_text) == {"ssh_pwauth": False, "users": ["default"]}


def test_firstboot_unit(result: Readback) -> None:
    unit = result.files["/etc/systemd/system/imagekit-firstboot.service"]
    assert "Type=oneshot" in unit and "ExecStart=/usr/lib/imagekit/firstboot/firstboot.sh" in unit
    assert "WantedBy=multi-user.target" in unit
    assert result.links["/etc/systemd/system/multi-user.target.wants/imagekit-firstboot.service"] == \
        "/etc/systemd/system/imagekit-firstboot.service"
    script = result.files["/usr/lib/imagekit/firstboot/scripts/0001-imagekit"]
    assert script == "#!/bin/sh\necho first > /root/firstboot-ran\n"
    assert result.modes["/usr/lib/imagekit/firstboot/scripts/0001-imagekit"] == 0o755
    assert result.modes["/usr/lib/imagekit/firstboot/firstboot.sh"] == 0o755


def test_selinux_relabel_is_a_noop_on_debian(customised: Customised, result: Readback) -> None:
    assert "not an SELinux guest" in customised.results[21].summary
    assert not result.exists["/.autorelabel"]


def test_grow_root_filled_the_disk(customised: Customised, result: Readback) -> None:
    assert result.disk_size == GROW_TO
    assert result.part_end > GROW_TO - 2 * 1024 * 1024
    assert result.root_size > 1800 * 1024 * 1024  # was 1.5 GiB
    assert "grew /dev/sda1" in customised.results[22].summary


def test_sysprep(result: Readback) -> None:
    assert result.files["/etc/machine-id"] == ""
    assert not [f for f in result.dirs["/etc/ssh"] if f.startswith("ssh_host_")]
    assert not result.exists["/root/.bash_history"]
    assert not result.exists["/var/lib/dhcp/dhclient.eth0.leases"]
    assert not result.exists["/var/cache/apt/pkgcache.bin"]
    assert result.files["/var/log/imagekit-test.log"] == ""
    assert result.dirs["/tmp"] == []
    assert result.dirs.get("/var/lib/cloud", []) == []


def test_sparsify_made_the_output_compact(customised: Customised) -> None:
    # trimmed free space is not stored: the output is far smaller than its 2 GiB disk
    assert customised.output.stat().st_size < 700 * 1024 * 1024
    assert "trimmed free space on /" in customised.results[24].summary


# ---------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def raw_input(base_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "input.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", base_image, path)
    return path


@pytest.mark.parametrize(("command", "timeout", "why"), [
    ("echo about-to-fail; ls /no/such/dir", "30m", "the command exited with status 2"),
    ("echo about-to-fail; ls /no/such/dir; sleep 120; echo not-reached", "3s", "the command did not finish within 3 s"),
], ids=["exit-status", "timeout"])
def test_failing_command_stops_the_run_and_leaves_the_input(raw_input: Path, command: str, timeout: str,
                                                            why: str) -> None:
    from imagekit.customise import CustomiseError, customise
    from imagekit.guest import _child_qemu_pids

    before = sha256(raw_input)
    steps = STEPS.validate_python([
        {"op": "hostname", "hostname": "never"},
        {"op": "root-password", "hash": ROOT_HASH},
        {"op": "run", "command": command, "timeout": timeout},
        {"op": "hostname", "hostname": "not-reached"},
    ])
    seen: list[Any] = []
    t0 = time.monotonic()
    with pytest.raises(CustomiseError) as ei:
        customise(raw_input, steps, in_place=True, fmt="raw", log=seen.append)  # even in place
    assert time.monotonic() - t0 < 100
    err = ei.value
    assert err.index == 2 and err.op == "run"
    assert err.message.startswith(f"step 2 (run) failed: {why}")
    assert err.command == command
    assert "about-to-fail" in err.output and "No such file or directory" in err.output
    assert "not-reached" not in err.output
    assert "about-to-fail" in err.message  # the output tail is in the message the CLI prints
    assert [r.ok for r in err.results] == [True, True, False]
    assert [r.ok for r in seen] == [True, True, False]
    assert ROOT_HASH not in json.dumps(err.to_dict())
    assert _child_qemu_pids() == []  # the appliance is gone
    assert sha256(raw_input) == before  # the overlay was dropped, not committed
    assert not [p for p in raw_input.parent.iterdir() if p.name != raw_input.name]


def test_missing_upload_source_fails_before_launching(raw_input: Path, tmp_path: Path) -> None:
    from imagekit.customise import CustomiseError, customise

    before = sha256(raw_input)
    steps = STEPS.validate_python([
        {"op": "write", "path": "/etc/x", "content": "x"},
        {"op": "upload", "src": str(tmp_path / "missing.bin"), "dest": "/opt/missing.bin"},
    ])
    with pytest.raises(CustomiseError) as ei:
        customise(raw_input, steps, output=tmp_path / "out.qcow2", fmt="raw")
    assert ei.value.index == 1 and ei.value.op == "upload"
    assert "step 1 (upload) cannot be done" in ei.value.message and "missing.bin" in ei.value.message
    assert sha256(raw_input) == before
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(raw_input: Path, tmp_path: Path) -> None:
    from imagekit.customise import customise
    from imagekit.errors import OutputExistsError, UsageError

    with pytest.raises(UsageError):
        customise(raw_input, [], fmt="raw")  # neither output nor in_place
    with pytest.raises(UsageError):
        customise(raw_input, [], fmt="raw", in_place=True, output=tmp_path / "o.qcow2")
    with pytest.raises(UsageError):
        customise(raw_input, [], output=raw_input)
    (tmp_path / "exists.qcow2").write_text("x")
    with pytest.raises(OutputExistsError):
        customise(raw_input, [], output=tmp_path / "exists.qcow2")


def test_install_without_network_is_refused_before_launch(raw_input: Path, tmp_path: Path) -> None:
    from imagekit.customise import CustomiseError, customise

    steps = STEPS.validate_python([{"op": "hostname", "hostname": "a"}, {"op": "install", "packages": ["tree"]}])
    with pytest.raises(CustomiseError) as ei:
        customise(raw_input, steps, output=tmp_path / "o.qcow2", fmt="raw", network=False)
    assert ei.value.index == 1 and "network" in ei.value.message


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_image(base_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "cli.qcow2"
    qemu_img("convert", "-f", "qcow2", "-O", "qcow2", base_image, path)
    return path


def test_cli_customise_in_place(cli_in_place: subprocess.CompletedProcess[str], result: Readback) -> None:
    assert cli_in_place.returncode == 0, cli_in_place.stderr
    data = assert_document("customise", cli_in_place.stdout)
    assert data["ok"] is True and data["in_place"] is True and data["output"] is None
    assert [s["op"] for s in data["steps"]] == ["write", "root-password"]
    assert all(s["ok"] for s in data["steps"])
    assert ROOT_HASH not in cli_in_place.stdout + cli_in_place.stderr
    # the change was committed into the image the CLI was given
    assert result.files["/etc/cli-marker"] == "written by the CLI\n"


def test_cli_invalid_step_is_a_usage_error(cli_image: Path) -> None:
    proc = _cli("customise", str(cli_image), "-o", "/tmp/never.qcow2", "--json", "--step", "{op: hostname}")
    assert proc.returncode == 2
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    assert any("hostname" in p and "required" in p for p in data["error"]["problems"]), data
    proc = _cli("customise", str(cli_image), "-o", "/tmp/never.qcow2", "--step", "{op: frobnicate}")
    assert proc.returncode == 2 and "frobnicate" in proc.stderr


def test_cli_failing_step_exit_code_and_json(cli_image: Path, tmp_path: Path) -> None:
    # A step that cannot be done (here: it requires the network and the run has none; a missing
    # upload source, used before, is now refused when --step is validated, exit 2).
    before = sha256(cli_image)
    proc = _cli("customise", str(cli_image), "-o", str(tmp_path / "o.qcow2"), "--json", "--no-network",
                "--step", "{op: hostname, hostname: x}",
                "--step", "{op: install, packages: [tree]}")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["ok"] is False and data["error"]["step"] == 1 and data["error"]["op"] == "install"
    assert "step 1 (install)" in proc.stderr
    assert sha256(cli_image) == before


def test_cli_recipe_steps(cli_image: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\ndescription: d\nos: {type: linux, distro: debian, version: '12'}\n"
        "build: {method: dib, elements: [vm]}\ndisk_size: 2G\n"
        "customise:\n  - {op: chmod, path: /etc/hostname, mode: '999'}\n")
    proc = _cli("customise", str(cli_image), "--recipe", str(recipe), "-o", str(tmp_path / "o.qcow2"), "--json")
    # a bad mode is found when the recipe is loaded, before anything is launched (it used to fail
    # at step 0, exit 1, after the appliance had started)
    assert proc.returncode == 2
    data = json.loads(proc.stdout)
    assert any(p.startswith("customise[0].mode: ") and "octal" in p for p in data["error"]["problems"]), data
    # a recipe's step that cannot be done is named by its index in the recipe
    recipe.write_text(recipe.read_text().replace("{op: chmod, path: /etc/hostname, mode: '999'}",
                                                 "{op: install, packages: [tree]}"))
    proc = _cli("customise", str(cli_image), "--recipe", str(recipe), "-o", str(tmp_path / "o.qcow2"), "--json",
                "--no-network")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["error"]["step"] == 0 and data["error"]["op"] == "install" and "network" in data["error"]["message"]
