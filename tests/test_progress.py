"""Build progress: each stage's name, what it does, the time spent in it and, from the second build
of a recipe on, the duration of its last run with about how much is left (``imagekit.timings``,
``cli.output.StatusLine``). Checked on a real terminal (a pseudo-terminal) with a small cloud
image served from 127.0.0.1, and quiet without a terminal or with --json."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from imagekit import timings
from imagekit.cli.output import State, StatusLine, clock
from imagekit.cli.root import cli
from tests.http_fixture import FileServer

SGR = re.compile(r"\x1b\[[0-9;]*m")  # colours and bold: removed
CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")  # cursor moves, line clears: a new line


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    cached: bool = False


# ---------------------------------------------------------------- the stage durations kept


def test_timings_keep_the_stages_that_ran(tmp_path: Path) -> None:
    assert timings.last("tiny") == {}
    timings.record("tiny", [Stage("build", 12.5), Stage("customise", 30), Stage("convert", 2)])
    timings.record("other", [Stage("build", 1)])
    assert timings.last("tiny") == {"build": 12.5, "customise": 30, "convert": 2}
    # a cache hit says nothing about the work: the last real run's duration stays
    timings.record("tiny", [Stage("build", 0.01, cached=True), Stage("customise", 25), Stage("convert", 0.0, True)])
    assert timings.last("tiny") == {"build": 12.5, "customise": 25, "convert": 2}
    assert timings.last("other") == {"build": 1}
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.startswith(".timings.json.")]  # no temporary left


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"tiny": 3}', '{"tiny": {"stages": [1]}}',
                                     '{"tiny": {"stages": {"build": "x", "convert": -1, "check": 2}}}'])
def test_timings_file_damaged_reads_as_empty_and_is_rewritten(tmp_path: Path, content: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "timings.json").write_text(content)
    assert timings.last("tiny") in ({}, {"check": 2.0})
    timings.record("tiny", [Stage("build", 3)])
    assert timings.last("tiny")["build"] == 3


def test_timings_unwritable_state_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the state folder should be")
    monkeypatch.setenv("IMAGEKIT_STATE_DIR", str(blocker / "state"))
    timings.record("tiny", [Stage("build", 3)])  # logged, not raised: estimates are a convenience
    assert timings.last("tiny") == {}


def test_timings_keep_the_most_recent_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timings, "KEEP", 3)
    for name in ("a", "b", "c", "d", "b"):
        timings.record(name, [Stage("build", 1)])
    assert [n for n in "abcd" if timings.last(n)] == ["b", "c", "d"]


# ---------------------------------------------------------------- the status line


def test_status_line_text_ticks_and_estimates() -> None:
    st = StatusLine(estimates={"build": 130})
    st("build", "diskimage-builder: root.d")
    since = st._since
    assert st.timing(since + 42) == "0:42 (last time 2:10, about 1:28 left)"
    assert st.timing(since + 150) == "2:30 (last time 2:10)"  # longer than last time: no "left"
    # re-rendered from the clock on every refresh, without a new message
    assert st.timing(since + 1) != st.timing(since + 2)
    st("customise", "step 1 install")
    assert st.timing(st._since + 5) == "0:05"  # no estimate for a stage never timed
    assert clock(3725) == "1:02:05"


# ---------------------------------------------------------------- a real build on a pseudo-terminal


@pytest.fixture
def tiny_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cloud-image recipe whose base is a small qcow2 served from 127.0.0.1 (no OS inside, no steps)."""
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    www = tmp_path / "www"
    www.mkdir()
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"imagekit" * (512 * 1024))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(www / "base.qcow2")],
                   check=True)
    sha = hashlib.sha256((www / "base.qcow2").read_bytes()).hexdigest()
    srv = FileServer(www).start()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\ndescription: tiny test image\nos: {type: linux, distro: debian, version: '12'}\n"
                      f"build:\n  method: cloud-image\n  base: {{url: {srv.url('base.qcow2')}, sha256: '{sha}'}}\n"
                      "disk_size: 64M\noutput: {compat: '0.10', cluster_size: 4K}\n")
    try:
        yield recipe
    finally:
        srv.stop()


def run_on_pty(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """``python -m imagekit ARGS`` with stderr on a pseudo-terminal (120 columns): exit code,
    stdout, and the terminal's text with the escape sequences removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "imagekit", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    screen = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        out = proc.stdout.read().decode() if proc.stdout else ""
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out, CONTROL.sub("\n", SGR.sub("", screen.decode(errors="replace")))


@pytest.mark.slow
def test_build_progress_on_a_terminal(tiny_recipe: Path, tmp_path: Path) -> None:
    # --accel tcg: the KVM probe (up to 10 s, once per cache folder) is not what is tested here
    first_code, _out, first = run_on_pty(["--accel", "tcg", "build", str(tiny_recipe), "--output-dir", str(tmp_path / "o1")],
                                         cwd=tmp_path)
    assert first_code == 0, first[-3000:]
    # every stage named, with what it does and the time spent in it; nothing estimated on a first build
    for stage in ("build", "customise", "convert"):
        assert re.search(rf"{stage} \d+:\d\d ", first), (stage, first[-3000:])
    assert "customise" in first and "inventory of the guest" in first
    assert "last time" not in first
    assert set(timings.last("tiny")) == {"build", "customise", "convert", "check"}
    first_customise = timings.last("tiny")["customise"]

    second_code, _out, second = run_on_pty(["--accel", "tcg", "build", str(tiny_recipe), "--no-cache",
                                            "--output-dir", str(tmp_path / "o2")], cwd=tmp_path)
    assert second_code == 0, second[-3000:]
    for stage in ("build", "customise", "convert"):
        assert re.search(rf"{stage} \d+:\d\d \(last time \d+:\d\d(, about \d+:\d\d left)?\)", second), \
            (stage, second[-3000:])
    # the estimate is the first build's duration of the stage (as the manifest says it), to the nearest second
    stages = json.loads((tmp_path / "o1" / "tiny.manifest.json").read_text())["stages"]
    customise = next(s["seconds"] for s in stages if s["name"] == "customise")
    assert abs(customise - first_customise) < 0.06
    assert re.search(rf"customise \d+:\d\d \(last time {clock(round(first_customise))}\b", second), \
        second[-3000:]


def test_status_line_quiet_without_terminal_and_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal: the stages as plain log lines, without timings; with --json: nothing."""
    with StatusLine(estimates={"build": 10}) as st:
        st("build", "downloading the base image")
    err = capsys.readouterr().err
    assert err == "build: downloading the base image\n"
    with click.Context(cli, obj=State(as_json=True)), StatusLine(estimates={"build": 10}) as st:
        st("build", "downloading the base image")
    assert capsys.readouterr() == ("", "")
