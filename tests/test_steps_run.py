"""The customise run loop without an appliance: a stand-in session answers the few calls the
steps under test make. The steps' secrets are masked in every text that leaves the loop (the
error, its command and output, the results, the log); a step is dispatched by the guest's OS
type; the checks made just before launching name the step."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from imagekit.customise import CustomiseError, StepResult, preflight, run_steps
from imagekit.guest import CommandResult
from imagekit.steps import Step, parse_step_texts

STEPS = TypeAdapter(list[Step])
HASH = "$6$imagekitTest$Wq3Jv8hT0d1PqZ8yqk2rV4mQdK0cPj9bWq2n6sE1bZ5aY7xO8uI3tR4eW5qP6oL7kJ8hG9fD0sA1zX2cV3bN4m"


class FakeSession:
    """What ``run`` steps use of a GuestSession: its OS type and ``run``."""

    def __init__(self, result: CommandResult, os_type: str = "linux", fails: str | None = None,
                 failure: CommandResult | None = None) -> None:
        self.os_type = os_type
        self.result = result
        self.fails, self.failure = fails, failure  # a command containing ``fails`` gets ``failure``
        self.ran: list[str] = []

    def run(self, script: str, timeout: float, env: dict[str, str] | None = None) -> CommandResult:
        self.ran.append(script)
        if self.fails and self.failure and self.fails in script:
            return self.failure
        return self.result

    def is_file(self, path: str) -> bool:
        return False


def test_failing_step_is_reported_with_its_secrets_masked(caplog: pytest.LogCaptureFixture) -> None:
    steps = STEPS.validate_python([
        {"op": "run", "command": "echo ok"},
        {"op": "run", "command": f"usermod -p '{HASH}' bob"},
        {"op": "root-password", "hash": HASH},  # carries the secret; never reached
    ])
    session = FakeSession(CommandResult(0, "fine\n", 0.1), fails="usermod",
                          failure=CommandResult(3, f"usermod: invalid hash '{HASH}'\n", 0.2))
    seen: list[StepResult] = []
    caplog.set_level(logging.DEBUG, logger="imagekit")
    with pytest.raises(CustomiseError) as info:
        run_steps(session, steps, network=False, log=seen.append)  # type: ignore[arg-type]
    err = info.value
    assert err.index == 1 and err.op == "run"
    assert session.ran[-1] == f"usermod -p '{HASH}' bob"  # the guest got the real command
    assert err.command == "usermod -p '****' bob"
    assert err.output == "usermod: invalid hash '****'\n"
    assert err.message.startswith("step 1 (run) failed: the command exited with status 3")
    assert "command: usermod -p '****' bob" in err.message and "invalid hash '****'" in err.message
    texts = [err.message, json.dumps(err.to_dict()), caplog.text] + [r.summary + r.output for r in seen]
    assert not [t for t in texts if HASH in t]
    assert [r.ok for r in err.results] == [r.ok for r in seen] == [True, False]


def test_secrets_masked_in_successful_results(caplog: pytest.LogCaptureFixture) -> None:
    steps = STEPS.validate_python([{"op": "run", "command": f"echo '{HASH}' > /root/h"},
                                   {"op": "root-password", "hash": HASH}])
    caplog.set_level(logging.DEBUG, logger="imagekit")
    session = FakeSession(CommandResult(0, f"{HASH}\n", 0.1))
    seen: list[StepResult] = []
    with pytest.raises(CustomiseError):  # the stand-in has no /etc/shadow for step 1
        run_steps(session, steps, network=False, log=seen.append)  # type: ignore[arg-type]
    results = seen[:1]
    assert results[0].summary == "ran: echo '****' > /root/h" and results[0].output == "****\n"
    assert HASH not in caplog.text


def test_a_step_runs_only_on_the_guests_it_applies_to() -> None:
    steps = STEPS.validate_python([{"op": "run", "command": "echo hi"}])
    session = FakeSession(CommandResult(0, "", 0.0), os_type="windows")
    with pytest.raises(CustomiseError) as info:
        run_steps(session, steps, network=False)  # type: ignore[arg-type]
    assert info.value.message == "step 0 (run) failed: step 'run' does not apply to windows guests"
    assert session.ran == []


def test_preflight_finds_a_host_file_gone_since_validation(tmp_path: Path) -> None:
    (tmp_path / "payload").write_text("x")
    steps = [*STEPS.validate_python([{"op": "hostname", "hostname": "h"}]),
             *parse_step_texts(["{op: upload, src: payload, dest: /opt/}"], tmp_path)]
    preflight(steps, network=False)
    (tmp_path / "payload").unlink()
    with pytest.raises(CustomiseError) as info:
        preflight(steps, network=False)
    assert info.value.index == 1 and info.value.op == "upload"
    assert info.value.message == f"step 1 (upload) cannot be done: host file {tmp_path}/payload does not exist"


def test_preflight_refuses_a_step_that_requires_the_network() -> None:
    steps: list[Any] = STEPS.validate_python([{"op": "run", "command": "true"}, {"op": "install", "packages": ["tree"]}])
    preflight(steps, network=True)
    preflight(steps[:1], network=False)  # run only uses the network when there is one
    with pytest.raises(CustomiseError) as info:
        preflight(steps, network=False)
    assert info.value.index == 1 and "needs the network" in info.value.message
