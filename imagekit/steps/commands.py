"""Command steps: run, script, firstboot.

``run`` and ``script`` run inside the guest now (chroot, ``/bin/sh``), bounded by
their ``timeout`` (``90s``, ``30m``, ``2h``); they get the appliance's network when
the run has one. ``script`` reads its host ``file`` (relative to the recipe's
folder) or takes inline ``content``. ``firstboot`` installs a command or script
that the guest runs once, at its first boot.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from imagekit.specs import parse_duration
from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import Duration, HostPath

if TYPE_CHECKING:
    from typing import Self

FIRSTBOOT_DIR = "/usr/lib/imagekit/firstboot"
FIRSTBOOT_UNIT = "imagekit-firstboot.service"


class RunStep(StepBase):
    """run: run a shell command inside the guest (chroot; /bin/sh -c) with a timeout; its output is kept."""

    NETWORK = "optional"

    op: Literal["run"]
    command: str
    timeout: Duration = "30m"

    def linux(self, ctx: StepContext) -> StepOutcome:
        out = ctx.sh(self.command, parse_duration(self.timeout), "the command")
        return StepOutcome(f"ran: {ctx.one_line(self.command)}", out)


class ScriptStep(StepBase):
    """script: run a script (inline ``content`` or a host ``file``) inside the guest. A script with a
    ``#!`` line runs with that interpreter, others with /bin/sh."""

    NETWORK = "optional"

    op: Literal["script"]
    file: HostPath | None = None
    content: str | None = None
    timeout: Duration = "30m"

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.file is None) == (self.content is None):
            raise ValueError("give exactly one of file or content")
        return self

    def linux(self, ctx: StepContext) -> StepOutcome:
        content = self.content if self.content is not None else Path(self.file or "").read_text()
        timeout = parse_duration(self.timeout)
        what = f"script {self.file}" if self.file else "the script"
        if content.startswith("#!"):
            g = ctx.g
            path = f"/tmp/imagekit-script-{os.getpid()}-{int(time.monotonic() * 1000)}"
            ctx.session.write_text(path, content)
            g.chmod(0o755, path)
            try:
                out = ctx.sh(shlex.quote(path), timeout, what)
            finally:
                if g.exists(path):
                    g.rm_f(path)
        else:
            out = ctx.sh(content, timeout, what)
        return StepOutcome(f"ran {what} ({len(content.splitlines())} lines)", out)


FIRSTBOOT_RUNNER = f"""#!/bin/sh -
# imagekit firstboot: run each script in {FIRSTBOOT_DIR}/scripts once, in
# name order, at the first boot; output goes to /var/log/imagekit-firstboot.log.
d={FIRSTBOOT_DIR}
log=/var/log/imagekit-firstboot.log
mkdir -p "$d/scripts-done"
for f in "$d"/scripts/*; do
    [ -f "$f" ] || continue
    echo "=== $(date -u) running $f" >>"$log"
    "$f" >>"$log" 2>&1
    echo "=== $f: exit status $?" >>"$log"
    mv -f "$f" "$d/scripts-done/"
done
"""

FIRSTBOOT_SERVICE = f"""[Unit]
Description=imagekit firstboot scripts
After=network.target network-online.target
Wants=network-online.target
ConditionPathExistsGlob={FIRSTBOOT_DIR}/scripts/*

[Service]
Type=oneshot
ExecStart={FIRSTBOOT_DIR}/firstboot.sh
RemainAfterExit=yes
TimeoutSec=0
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


class FirstbootStep(StepBase):
    """firstboot: install a command or script to run once at the first boot, like virt-customize:
    scripts in /usr/lib/imagekit/firstboot/scripts/NNNN-imagekit run in order by a systemd oneshot
    unit (imagekit-firstboot.service, enabled in multi-user.target) and are moved aside once run."""

    op: Literal["firstboot"]
    command: str | None = None
    script: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.command is None) == (self.script is None):
            raise ValueError("give exactly one of command or script")
        return self

    def _install_runner(self, ctx: StepContext) -> str:
        """The runner script and its enabled unit; returns the scripts directory."""
        s, g = ctx.session, ctx.g
        scripts = f"{FIRSTBOOT_DIR}/scripts"
        g.mkdir_p(scripts)
        s.write_text(f"{FIRSTBOOT_DIR}/firstboot.sh", FIRSTBOOT_RUNNER)
        g.chmod(0o755, f"{FIRSTBOOT_DIR}/firstboot.sh")
        unit = f"/etc/systemd/system/{FIRSTBOOT_UNIT}"
        s.write_text(unit, FIRSTBOOT_SERVICE)
        g.chmod(0o644, unit)
        wants = "/etc/systemd/system/multi-user.target.wants"
        g.mkdir_p(wants)
        link = f"{wants}/{FIRSTBOOT_UNIT}"
        if not g.is_symlink(link):
            g.ln_sf(unit, link)
        return scripts

    def linux(self, ctx: StepContext) -> StepOutcome:
        s, g = ctx.session, ctx.g
        if not ctx.systemd():
            raise StepFailure("firstboot needs a systemd guest (no systemctl found)")
        scripts = self._install_runner(ctx)
        n = len(g.ls(scripts)) + 1
        done_dir = f"{FIRSTBOOT_DIR}/scripts-done"
        if s.is_dir(done_dir):
            n += len(g.ls(done_dir))
        body = self.script if self.script is not None else self.command or ""
        if not body.startswith("#!"):
            body = "#!/bin/sh\n" + body
        if not body.endswith("\n"):
            body += "\n"
        path = f"{scripts}/{n:04d}-imagekit"
        s.write_text(path, body)
        g.chmod(0o755, path)
        return StepOutcome(f"firstboot script {path} (run by {FIRSTBOOT_UNIT})")


STEPS: tuple[type[StepBase], ...] = (RunStep, ScriptStep, FirstbootStep)
