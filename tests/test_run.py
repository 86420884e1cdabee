"""The external-program helper: argument lists, timeouts, masked secrets, typed errors."""

from __future__ import annotations

import logging
import time

import pytest

from imagekit import run as runmod
from imagekit.errors import ToolFailed, ToolNotFound, ToolTimeout


def test_runs_argument_list_without_shell() -> None:
    res = runmod.run(["printf", "%s", "a; echo injected"], timeout=10)
    assert res.stdout == "a; echo injected" and res.returncode == 0


def test_missing_program() -> None:
    with pytest.raises(ToolNotFound, match="'no-such-tool-xyz' was not found"):
        runmod.run(["no-such-tool-xyz"], timeout=5)


def test_failure_carries_output_tail() -> None:
    with pytest.raises(ToolFailed) as info:
        runmod.run(["sh", "-c", "echo boom >&2; exit 7"], timeout=10)
    assert info.value.returncode == 7
    assert "exited with status 7" in info.value.message and "boom" in info.value.message


def test_timeout_kills_the_process_group(tmp_path) -> None:
    marker = tmp_path / "child.pid"
    with pytest.raises(ToolTimeout, match="did not finish within 1 s"):
        runmod.run(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], timeout=1)
    pid = int(marker.read_text())
    for _ in range(50):  # the grandchild was killed too (a zombie waiting for init counts as dead)
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]


def test_secrets_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imagekit")
    res = runmod.run(["echo", "--password=s3cr3t-value"], timeout=10, secrets=["s3cr3t-value"])
    assert "s3cr3t-value" not in caplog.text and "****" in caplog.text
    assert "s3cr3t-value" not in res.stdout


def test_output_callback_splits_progress_lines() -> None:
    seen: list[str] = []
    runmod.run(["printf", "    (10.00/100%%)\\r    (55.00/100%%)\\r    (100.00/100%%)\\n"], timeout=10,
               on_output=seen.append)
    assert [s.strip() for s in seen] == ["(10.00/100%)", "(55.00/100%)", "(100.00/100%)"]


def test_resource_limits_apply() -> None:
    res = runmod.run(["sh", "-c", "ulimit -v; ulimit -t"], timeout=10,
                     limits=runmod.Limits(cpu_seconds=30, address_space=1 << 30))
    assert res.stdout.split() == [str((1 << 30) // 1024), "30"]
