"""workdir.WorkDir and reap_stale with real state: a folder whose owner was SIGKILLed while a tagged
process ran, a tmpfs was mounted and a loop device was attached under it is cleaned by the next
reap (which says what it removed); a live owner's folder is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imagekit import workdir
from imagekit.workdir import WorkDir
from tests.conftest import ROOT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and loop devices need root")


def test_workdir_lifecycle(tmp_path: Path) -> None:
    base = tmp_path / "work"
    with WorkDir("t-", base=base, command="imagekit test") as wd:
        assert wd.path.parent == base.resolve() and wd.path.name.startswith("t-")
        assert wd.env() == {workdir.WORK_ENV: str(wd.path)}
        owner = workdir.read_owner(wd.path)
        assert owner is not None and owner.pid == os.getpid() and owner.command == "imagekit test"
        assert workdir.reap_stale(base) == []  # its owner holds the lock
        assert wd.path.is_dir()
        (wd.path / "sub").mkdir()
    assert not wd.path.exists()
    assert wd.report is not None and wd.report.removed and not wd.report.left_state
    assert list(base.iterdir()) == []


def test_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    base = tmp_path / "work"
    with WorkDir("t-", base=base) as wd:
        child = subprocess.Popen(["sleep", "600"], close_fds=False)
        try:
            fds = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
            assert str(wd.path / workdir.LOCK_NAME) not in fds
        finally:
            child.kill()
            child.wait()


def test_legacy_folder_without_lock(tmp_path: Path) -> None:
    base = tmp_path / "work"
    old, young = base / "dib-old", base / "dib-young"
    old.mkdir(parents=True)
    young.mkdir()
    (old / "leftover").write_text("x")
    past = time.time() - 2 * workdir.LEGACY_AGE
    os.utime(old, (past, past))
    reports = workdir.reap_stale(base)
    assert [r.path for r in reports] == [str(old)] and reports[0].removed
    assert not old.exists() and young.exists()


OWNER = textwrap.dedent("""
    import os, subprocess, sys, time
    from imagekit.workdir import WorkDir
    wd = WorkDir("stale-", base=sys.argv[1], command="imagekit test-owner")
    env = {**os.environ, **wd.env()}
    sleeper = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)
    mnt = wd.path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "imagekit-test", str(mnt)], check=True)
    (mnt / "deeper").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "imagekit-test", str(mnt / "deeper")], check=True)
    img = wd.path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    loop = subprocess.run(["losetup", "--show", "-f", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    print(json.dumps({"path": str(wd.path), "sleeper": sleeper.pid, "loop": loop}), flush=True)
    time.sleep(600)
""").replace("import os,", "import json, os,")


def mounts() -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}


def backed_loops(prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True, check=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devs if str(d.get("back-file") or "").startswith(prefix)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_root
def test_reap_stale_after_sigkill(tmp_path: Path) -> None:
    base = tmp_path / "work"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(base)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert owner.stdout is not None
        state = json.loads(owner.stdout.readline())
        path, sleeper, loop = state["path"], state["sleeper"], state["loop"]
        live = WorkDir("live-", base=base)  # a folder whose owner (this test) is alive
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert alive(sleeper) and f"{path}/mnt" in mounts() and backed_loops(path) == [loop]
        t = time.monotonic()
        reports = workdir.reap_stale(base)
        seconds = time.monotonic() - t
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert len(reports) == 1, reports
    r = reports[0]
    assert r.path == path and r.removed and not r.problems
    assert r.owner is not None and r.owner.pid == owner.pid and r.owner.command == "imagekit test-owner"
    assert r.processes == (f"{sleeper} (sleep)",)
    assert r.unmounted == (f"{path}/mnt/deeper", f"{path}/mnt")  # deepest first
    assert r.loops == (loop,)
    summary = r.summary()
    assert "ended 1 process" in summary and "unmounted 2 mount" in summary and loop in summary
    assert not alive(sleeper)
    assert not any(m.startswith(path) for m in mounts())
    assert backed_loops(path) == []
    assert not Path(path).exists()
    assert live.path.is_dir()  # the live owner's folder was not touched
    live.cleanup()
    assert seconds < 15
