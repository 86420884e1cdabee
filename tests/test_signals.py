"""Signals as CI systems send them, for real.

SIGTERM and SIGHUP get the clean-up of Ctrl-C and exit 128 + the signal: during a real
diskimage-builder build (sent while it holds in finalise.d: its image on loop devices backed by
the build's work folder, partitioned, mounted, with /proc, /dev, /sys mounted in it and a hook
running in the chroot; its elements are test-only, see tests/dib_fixture.py), during a convert
(qemu-img still running) and during an upload to the real local Glance. Nothing is left: no process, mount, loop device, partial output, temporary file, or
queued image. A build killed with SIGKILL is cleaned up by the next ``imagekit build``, which
says what it removed. A second signal during the clean-up does not abort it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagekit import signals, workdir
from imagekit.cloud import Cloud
from tests.conftest import ROOT
from tests.dib_fixture import ELEMENTS, tiny_dib_recipe
from tests.glance_fixture import GlanceFixture
from tests.guest_image import build_lock
from tests.http_fixture import FileServer
from tests.test_glance import by_name, uniq

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root")
SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGHUP, id="SIGHUP")]


# ---------------------------------------------------------------- what is left on the host


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment mention ``text`` (not this test process)."""
    needle, found = text.encode(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
            if needle in blob:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name} {cmd[:200]}")
        except (OSError, IndexError):
            continue
    return found


def tagged_processes(folder: str) -> list[int]:
    """Processes carrying a work folder's tag (``IMAGEKIT_WORKDIR``)."""
    tag, found = f"IMAGEKIT_WORKDIR={folder}\0".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and tag in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def mounts_under(prefix: str) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)]


def loops_under(prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True, check=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return [f"{d['name']} {d.get('back-file')}" for d in devs if str(d.get("back-file") or "").startswith(prefix)]


def assert_nothing_left(where: Path) -> None:
    prefix = str(where)
    deadline = time.monotonic() + 5  # processes that were just killed may take a moment to be reaped
    while processes_mentioning(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(prefix) == [], "processes left behind"
    assert mounts_under(prefix) == [], "mounts left behind"
    assert loops_under(prefix) == [], "loop devices left behind"


def stray_files(root: Path) -> list[str]:
    """Partial outputs and temporary files (hidden names, .part, .tmp) under ``root``."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith((".part", ".tmp"))]


def cli(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """``python -m imagekit ARGS`` with stdout/stderr to files (a pipe nobody reads could block it)."""
    return subprocess.Popen([sys.executable, "-m", "imagekit", *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=open(out.with_suffix(".out"), "wb"),  # noqa: SIM115 - closed with the process
                            stderr=open(out.with_suffix(".err"), "wb"))  # noqa: SIM115


def wait_until(proc: subprocess.Popen[bytes], cond: Callable[[], bool], timeout: float, err: Path) -> float:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"imagekit ended ({proc.returncode}) before the condition: {err.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not reached within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def finish(proc: subprocess.Popen[bytes], timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the signals module


def test_interrupted_is_a_keyboard_interrupt_with_the_exit_code() -> None:
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        exc = signals.Interrupted(signum)
        assert isinstance(exc, KeyboardInterrupt) and exc.signum == signum and exc.exit_code == code
        assert signals.exit_code_of(exc) == code
        wrapped = RuntimeError("abort")
        wrapped.__cause__ = exc
        assert signals.exit_code_of(wrapped) == code  # click's Abort wraps it


CLEANUP_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from imagekit import run, signals
    signals.install()
    out = Path(sys.argv[1])
    try:
        run.run(["sh", "-c", f"sleep 600 & echo $! > {out}/child; wait"], timeout=600)
    except signals.Interrupted as exc:
        (out / "cleanup-started").write_text("")
        time.sleep(1.5)  # a slow clean-up, long enough for a second signal
        (out / "cleanup-done").write_text(str(exc.signum))
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_ends_the_child_group_and_a_second_one_does_not_abort_the_cleanup(tmp_path: Path,
                                                                                  signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CLEANUP_SCRIPT, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "child").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        child = int((tmp_path / "child").read_text())
        proc.send_signal(signum)
        while not (tmp_path / "cleanup-started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the CI runner insists
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signum
    assert (tmp_path / "cleanup-done").read_text() == str(int(signum))
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


# ---------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def big_sparse_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 GiB virtual, 192 MiB of random data scattered in it: qemu-img needs seconds to compress it."""
    path = tmp_path_factory.mktemp("sparse") / "big.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 30)
        for i in range(96):
            f.seek(i * (42 << 20))
            f.write(os.urandom(2 * MiB))
    return path


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_convert(big_sparse_raw: Path, tmp_path: Path, signum: int) -> None:
    src = tmp_path / "in" / "big.raw"
    src.parent.mkdir()
    os.link(big_sparse_raw, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.qcow2"
    proc = cli(["convert", str(src), "-o", str(out), "--compress", "zlib"], {}, tmp_path / "convert")
    # converting: qemu-img's process, or imagekit's own qcow2 writer's temporary output
    wait_until(proc, lambda: any("qemu-img convert" in p for p in processes_mentioning(str(out_dir)))
               or any(p.name.endswith(".part") for p in out_dir.iterdir()), 60, tmp_path / "convert.err")
    time.sleep(0.5)
    assert proc.poll() is None, "the conversion ended before the signal"
    proc.send_signal(signum)
    code = finish(proc, 60)
    err = (tmp_path / "convert.err").read_text()
    assert code == 128 + signum, err
    assert "interrupted" in err and "Traceback" not in err
    assert_nothing_left(tmp_path)
    assert list(out_dir.iterdir()) == []  # no output, no partial output


# ---------------------------------------------------------------- upload


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_upload(glance_env: GlanceFixture, glance_cloud: Cloud, tmp_path: Path, signum: int) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(768 * MiB)
    name = uniq(f"sig{int(signum)}")
    proc = cli(["upload", str(big), "--cloud", glance_env.cloud, "--name", name], glance_env.env, tmp_path / "up")

    def saving() -> bool:
        imgs = by_name(glance_cloud, name)
        return bool(imgs) and imgs[0]["status"] == "saving"

    wait_until(proc, saving, 60, tmp_path / "up.err")
    proc.send_signal(signum)
    code = finish(proc, 60)
    err = (tmp_path / "up.err").read_text()
    assert code == 128 + signum, err
    assert "interrupted" in err and "Traceback" not in err
    assert by_name(glance_cloud, name) == []  # deleted: not left queued, saving or active
    assert_nothing_left(tmp_path)


# ---------------------------------------------------------------- diskimage-builder builds


@pytest.fixture
def build_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"IMAGEKIT_CACHE_DIR": str(tmp_path / "cache"), "IMAGEKIT_STATE_DIR": str(tmp_path / "state"),
           "IMAGEKIT_ACCEL": "tcg", "IMAGEKIT_ELEMENTS_PATH": str(ELEMENTS)}
    with build_lock():
        yield env
        # A safety net for a test that failed half-way: what its build left (a held or frozen build whose
        # imagekit is gone) is cleaned as the next build would. Nothing is left when the test passed.
        workdir.reap_stale(tmp_path / "cache" / "work")


def image_mounts(prefix: str) -> list[str]:
    """Mount points under ``prefix`` whose source is a loop device (an image's partition)."""
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix) and line.split()[0].startswith("/dev/loop")]


def holding(work: Path) -> bool:
    """The build is held in finalise.d (imagekit-test-hold): its hook runs in the chroot, the image mounted."""
    folders = list(work.glob("dib-*"))
    return (len(folders) == 1 and bool(image_mounts(str(work))) and bool(loops_under(str(work)))
            and any("imagekit-test-hold" in p for p in processes_mentioning(str(folders[0]))))


def start_dib_build(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    """``imagekit build`` of a real diskimage-builder build (tests/dib_fixture.py) held in finalise.d: returned
    once DIB has the image on a loop device, partitioned through partloop, mounted, /proc, /dev and /sys
    mounted in it, and the hold's process running in the chroot."""
    work = tmp_path / "cache" / "work"
    recipe = tiny_dib_recipe(tmp_path / "held.yaml", "held", ["imagekit-test-hold"])
    proc = cli(["--json", "build", str(recipe), "--output-dir", str(tmp_path / "out")], env, tmp_path / "build")
    try:
        waited = wait_until(proc, lambda: holding(work), 600, tmp_path / "build.err")
    except BaseException:
        proc.send_signal(signal.SIGTERM)  # imagekit cleans up after itself (else build_env's reap does)
        finish(proc, 60)
        raise
    return proc, waited


def left_loops(held: list[str], prefix: str) -> list[str]:
    """Loop devices the build held (``loops_under`` lines) still attached to its file, even one whose path a
    lazy unmount has hidden ("/image0.raw"). A device someone else attached since then, to a file that
    exists outside ``prefix``, is not ours."""
    now = {line.split()[0]: line.split(maxsplit=1)[1] for line in loops_under("/")}
    left = []
    for line in held:
        dev = line.split()[0]
        back = now.get(dev)
        if back is not None and (back.startswith(prefix) or not os.path.exists(back.removesuffix(" (deleted)"))):
            left.append(f"{dev} {back}")
    return left


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_dib_build(tmp_path: Path, build_env: dict[str, str], signum: int) -> None:
    proc, waited = start_dib_build(tmp_path, build_env)
    held_mounts, held_loops = mounts_under(str(tmp_path)), loops_under(str(tmp_path))
    t = time.monotonic()
    proc.send_signal(signum)
    code = finish(proc, 300)
    err = (tmp_path / "build.err").read_text()
    print(f"\n{signal.Signals(signum).name} after {waited:.1f} s with {len(held_mounts)} mounts and "
          f"{len(held_loops)} loop devices; imagekit exited {code} {time.monotonic() - t:.1f} s later")
    assert code == 128 + signum, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert_nothing_left(tmp_path)
    assert left_loops(held_loops, str(tmp_path)) == [], "loop devices left behind"
    assert list((tmp_path / "cache" / "work").iterdir()) == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert stray_files(tmp_path / "cache") == []


def freeze(folder: str) -> list[int]:
    """SIGSTOP every process tagged with the work folder, until a scan finds no new one; return them."""
    stopped: set[int] = set()
    deadline = time.monotonic() + 30
    while new := set(tagged_processes(folder)) - stopped:
        assert time.monotonic() < deadline, "the build's processes kept multiplying"
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    return sorted(stopped)


LOOP_ON_TMPFS_OWNER = textwrap.dedent("""
    import json, subprocess, sys, time
    from imagekit.workdir import WorkDir
    wd = WorkDir("dib-", base=sys.argv[1], command="imagekit test-owner")
    images = wd.path / "dib_image.x"  # where diskimage-builder keeps its image file: a tmpfs
    images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "imagekit-test", str(images)], check=True)
    with open(images / "image0.raw", "wb") as f:
        f.truncate(8 << 20)
    loops = [subprocess.run(["losetup", "--show", "-f", *extra, str(images / "image0.raw")], check=True,
                            capture_output=True, text=True).stdout.strip()
             for extra in ([], ["-o", "1048576"])]  # the disk, and a partition as partloop maps it
    print(json.dumps(loops), flush=True)
    time.sleep(600)
""")


@needs_root
def test_reap_detaches_loop_devices_whose_file_is_on_a_tmpfs_in_the_folder(tmp_path: Path) -> None:
    """The layout a SIGKILLed diskimage-builder build leaves: the loop devices' file is on a tmpfs in the work
    folder, busy while they hold it. Unmounted lazily first, that tmpfs would hide the file's path
    ("/image0.raw") and the loop devices would be left behind, unreported (the flake of the test below)."""
    base = tmp_path / "work"
    devices: list[str] = []
    held: list[str] = []
    owner = subprocess.Popen([sys.executable, "-c", LOOP_ON_TMPFS_OWNER, str(base)], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert owner.stdout is not None
        devices = json.loads(owner.stdout.readline())
        held = loops_under(str(base))
        owner.kill()
        owner.wait()
        reports = workdir.reap_stale(base)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for dev in devices:  # whatever happens, do not leave the host our loop devices
            if any(line.split()[0] == dev for line in left_loops(held, str(base))):
                subprocess.run(["losetup", "-d", dev], check=False)
    assert len(reports) == 1 and reports[0].removed and not reports[0].problems, reports
    assert sorted(reports[0].loops) == sorted(devices), reports[0].summary()
    assert reports[0].unmounted == (f"{reports[0].path}/dib_image.x",)
    assert left_loops(held, str(base)) == [] and mounts_under(str(base)) == []


@needs_root
@pytest.mark.slow
def test_sigkilled_build_is_cleaned_by_the_next_build(tmp_path: Path, build_env: dict[str, str]) -> None:
    proc, waited = start_dib_build(tmp_path, build_env)
    work = tmp_path / "cache" / "work"
    stale = [str(p) for p in work.glob("dib-*")]
    # Freeze the build's processes first: left running, diskimage-builder notices its reader is gone
    # (SIGPIPE) and undoes part of its own state, which would make the test a race. Frozen, they are
    # what a hung build leaves: orphans that still hold mounts and loop devices. Held in finalise.d
    # (imagekit-test-hold), the build forks nothing, so the freeze catches every one of them.
    tagged = freeze(stale[0])
    proc.kill()
    proc.wait()
    held_mounts, held_loops = sorted(set(mounts_under(str(work)))), loops_under(str(work))
    assert tagged and image_mounts(str(work)) and held_loops  # SIGKILL: nothing was cleaned

    # The next build: a small cloud image served from 127.0.0.1 (no diskimage-builder).
    www = tmp_path / "www"
    www.mkdir()
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"imagekit" * (512 * 1024))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(www / "base.qcow2")],
                   check=True)
    sha = hashlib.sha256((www / "base.qcow2").read_bytes()).hexdigest()
    srv = FileServer(www).start()
    try:
        recipe = tmp_path / "tiny.yaml"
        recipe.write_text("name: tiny\ndescription: tiny test image\nos: {type: linux, distro: debian, version: '12'}\n"
                          f"build:\n  method: cloud-image\n  base: {{url: {srv.url('base.qcow2')}, sha256: '{sha}'}}\n"
                          "disk_size: 64M\n")
        t = time.monotonic()
        nxt = subprocess.run([sys.executable, "-m", "imagekit", "--json", "build", str(recipe), "--output-dir",
                              str(tmp_path / "out2")], cwd=ROOT, env={**os.environ, **build_env},
                             capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - t
    finally:
        srv.stop()
    print(f"\nSIGKILL after {waited:.1f} s; the next build took {seconds:.1f} s; it said:\n{nxt.stderr[-2000:]}")
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    reaped = [line for line in nxt.stderr.splitlines() if "removed a stale work folder" in line]
    assert len(reaped) == 1 and stale[0] in reaped[0], nxt.stderr[-3000:]
    # Everything the killed build held, counted: the flake this replaces reported a folder whose tmpfs had
    # been unmounted lazily before its loop devices were looked for (they were left behind, unseen).
    assert f"ended {len(tagged)} process(es)" in reaped[0], reaped[0]
    assert f"unmounted {len(held_mounts)} mount(s)" in reaped[0], (reaped[0], held_mounts)
    assert f"detached {len(held_loops)} loop device(s)" in reaped[0], (reaped[0], held_loops)
    assert "problems" not in reaped[0]
    assert json.loads(nxt.stdout)["output"]["path"].endswith("tiny.qcow2")
    assert_nothing_left(tmp_path)
    assert left_loops(held_loops, str(tmp_path)) == [], "loop devices left behind"
    assert list(work.iterdir()) == []
