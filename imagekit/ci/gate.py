"""``imagekit ci gate UNIT``: nothing reaches users untested.

The unit's output (from ``imagekit ci run``'s folder or the job's artifacts) is uploaded to
the gate cloud as the first channel (``candidate``, private, with imagekit's ownership
properties), then boot-tested: the local QEMU boot test (``imagekit.boot``: a throw-away
overlay, a NoCloud seed, waiting for ``gate.boot.wait_for``; a server in the cloud once
imagekit has a compute path). The JUnit report (``gate-junit.xml``) is written either way;
on success the image moves to the second channel (``tested``), on failure it is deleted
and the command fails. A unit whose output is already tested (or further) in the gate cloud
passes without booting again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from imagekit import accel as accel_mod
from imagekit import boot as bootmod
from imagekit import glance
from imagekit.ci import clouds as cl
from imagekit.ci import junit, notify
from imagekit.ci.events import EventLog
from imagekit.ci.model import Pipeline
from imagekit.ci.results import GateResult
from imagekit.ci.shared import UnitRecord, require_record
from imagekit.cloud import Cloud
from imagekit.errors import ImagekitError, UsageError

log = logging.getLogger("imagekit.ci")
Say = Callable[[str, str], None]


class GateFailed(ImagekitError):
    """The unit's image failed the test gate; it was removed from the gate cloud."""

    code = "ci-gate-failed"


def _upload_candidate(c: Cloud, pipeline: Pipeline, rec: UnitRecord, image: Path, channel: str) -> str:
    recipe = pipeline.unit(rec.unit).load_recipe()
    opts = glance.UploadOptions(name=rec.unit, recipe=recipe, visibility="private", force_upload=True,
                                properties=cl.ownership(pipeline.spec.name, rec, channel),
                                import_method="direct")
    res = glance.upload(c, image, opts)
    return str(res.image["id"])


def gate(pipeline: Pipeline, unit_name: str, accel: accel_mod.AccelChoice, events: EventLog, *,
         artifacts: Path | None = None, say: Say | None = None) -> GateResult:
    """Upload, boot-test and move (or remove) one unit's image; see the module documentation."""
    unit = pipeline.unit(unit_name)
    rec, image = require_record(pipeline, unit, artifacts)
    cloud = pipeline.gate_cloud
    if cloud is None:
        raise UsageError("the pipeline has no clouds: the gate uploads to one", "add clouds: to the pipeline file")
    channels = pipeline.spec.channels
    out = image.parent
    tell = say or (lambda _s, _m: None)
    c = cl.open_cloud(cloud, pipeline.cloud(cloud).retries)
    mine = cl.owned(c, pipeline.spec.name, unit.name)
    done = [i for i in mine if i.sha256 == rec.sha256 and i.usable and i.channel in channels[1:]]
    if done:
        report = junit.write(out / "gate-junit.xml", f"imagekit.gate.{unit.name}",
                             [junit.Case("boot", 0.0, skipped=f"already {done[0].channel} in {cloud}")])
        events.emit("gate.end", data={"ok": True, "already": True, "image": done[0].id})
        return GateResult(unit.name, cloud, rec.sha256, done[0].id, True, True, done[0].channel, 0.0, (),
                          str(report), None)
    cl.remove_leftovers(c, mine, rec.sha256)
    candidate = next((i for i in mine if i.sha256 == rec.sha256 and i.usable and i.channel == channels[0]), None)
    tell("gate", f"uploading {image.name} to {cloud} as {channels[0]}")
    image_id = candidate.id if candidate else _upload_candidate(c, pipeline, rec, image, channels[0])
    events.emit("gate.upload", data={"cloud": cloud, "image": image_id, "channel": channels[0]})
    boot = pipeline.spec.gate.boot
    tell("gate", f"booting {image.name} (waiting for {boot.wait_for}, at most {boot.timeout:g} s)")
    console = out / "gate-console.log"
    t = time.monotonic()
    try:
        res = bootmod.boot(image, rec.format, timeout=boot.timeout, memory_mib=boot.memory, wait_for=boot.wait_for,
                           accel_name=accel, console_log=console)
        ok, reached, tail = res.ok, res.reached, res.console_tail
    except ImagekitError as exc:
        ok, reached, tail = False, (), exc.message
    seconds = round(time.monotonic() - t, 1)
    events.emit("gate.boot", seconds=seconds, data={"ok": ok, "reached": list(reached)})
    failure = None if ok else f"did not reach {boot.wait_for} within {boot.timeout:g} s (reached: " \
                              f"{', '.join(reached) or 'nothing'})"
    report = junit.write(out / "gate-junit.xml", f"imagekit.gate.{unit.name}",
                         [junit.Case("boot", seconds, failure=failure, output=tail)])
    if not ok:
        cl.delete(c, image_id)
        events.emit("gate.end", data={"ok": False, "removed": image_id})
        notify.notify(pipeline.spec, "failure", {"command": "gate", "unit": unit.name, "error": failure})
        raise GateFailed(f"{unit.name}: the boot test failed: {failure}; the candidate {image_id} was removed "
                         f"from {cloud}", f"the console is in {console}; the JUnit report in {report}")
    cl.set_channel(c, image_id, channels[1])
    events.emit("gate.end", data={"ok": True, "image": image_id, "channel": channels[1]})
    notify.notify(pipeline.spec, "gate", {"unit": unit.name, "sha256": rec.sha256, "cloud": cloud,
                                          "image": image_id, "channel": channels[1]})
    return GateResult(unit.name, cloud, rec.sha256, image_id, True, False, channels[1], seconds, tuple(reached),
                      str(report), str(console))
