"""``imagekit ci promote UNIT --to CHANNEL``: one unit's image into a channel of every cloud.

Cloud by cloud, each on its own (one that fails does not stop the others):

1. The pipeline's images of the unit in that cloud are listed. One with the same sha256,
   usable and already in the channel: the cloud is ``done`` (re-running skips it, so a
   promote that failed half-way is resumed by running it again).
2. Records left by an earlier attempt that never became usable (queued, saving, importing,
   marked incomplete) are deleted: nothing is left queued.
3. The same image, usable, in an earlier channel (the gate's ``tested`` image) moves: its
   channel, the cloud's visibility and properties are set. Otherwise it is uploaded
   (``imagekit.glance.upload``: checked, streamed, verified) with the cloud's import methods
   in order. A connection failure is retried with the same method after a back-off; a stalled
   import (``import_timeout``) or a failed one is deleted and retried with the next method;
   at most ``retries`` + 1 attempts in all.

Before anything, the image must have passed the gate (the second channel, ``tested``, in the
gate cloud) unless the target *is* that channel or ``force`` is given. The result lists
every cloud with its state (``done``, ``moved``, ``uploaded``, ``failed``) and attempts; the
command fails when a cloud failed, after the others completed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from imagekit import glance
from imagekit.ci import clouds as cl
from imagekit.ci import notify
from imagekit.ci.events import EventLog
from imagekit.ci.model import Cloud as CloudSpec
from imagekit.ci.model import Pipeline
from imagekit.ci.results import Attempt, CloudPromotion, PromoteResult
from imagekit.ci.shared import UnitRecord, require_record
from imagekit.cloud import Cloud, CloudError
from imagekit.errors import ImagekitError, UnsafeImageError, UsageError

log = logging.getLogger("imagekit.ci")
Say = Callable[[str, str], None]
BACKOFF = 2.0


class PromoteIncomplete(ImagekitError):
    """Some clouds could not be promoted to (the others were); running the command again resumes."""

    code = "ci-promote-incomplete"


class NotTested(ImagekitError):
    code = "ci-not-tested"


class CloudFailed(ImagekitError):
    """Every attempt on one cloud failed (``attempts`` says how)."""

    code = "ci-promote-cloud-failed"

    def __init__(self, message: str, hint: str | None, attempts: tuple[Attempt, ...]) -> None:
        super().__init__(message, hint)
        self.attempts = attempts


def _upload(c: Cloud, spec: CloudSpec, pipeline: Pipeline, rec: UnitRecord, image: Path, channel: str,
            events: EventLog) -> tuple[str, list[Attempt]]:
    """Upload with the cloud's import methods and retries; (image id, attempts) or PromoteIncomplete."""
    recipe = pipeline.unit(rec.unit).load_recipe()
    props = {**spec.properties, **cl.ownership(pipeline.spec.name, rec, channel)}
    attempts: list[Attempt] = []
    method_index = 0
    for n in range(spec.retries + 1):
        method = spec.import_methods[method_index % len(spec.import_methods)]
        url = spec.web_download_url.format(file=image.name, unit=rec.unit, sha256=rec.sha256) \
            if method == "web-download" and spec.web_download_url else None
        opts = glance.UploadOptions(name=rec.unit, recipe=recipe, visibility=spec.visibility, properties=props,
                                    force_upload=True, import_method=method, url=url,
                                    import_timeout=spec.import_timeout)
        t = time.monotonic()
        events.emit("promote.attempt", data={"cloud": spec.name, "method": method, "attempt": n + 1})
        try:
            res = glance.upload(c, image, opts)
        except UnsafeImageError:
            raise
        except ImagekitError as exc:
            attempts.append(Attempt(method, exc.message, round(time.monotonic() - t, 2)))
            unreachable = isinstance(exc, CloudError) or isinstance(exc.__cause__, CloudError)
            if not unreachable:
                method_index += 1  # stalled or failed import: the next method
                log.warning("%s: %s failed (%s); trying %s", spec.name, method, exc.message,
                            spec.import_methods[method_index % len(spec.import_methods)])
            elif n < spec.retries:
                time.sleep(BACKOFF * 2 ** min(n, 4))
            continue
        attempts.append(Attempt(method, None, round(time.monotonic() - t, 2)))
        return str(res.image["id"]), attempts
    raise CloudFailed(f"{spec.name}: {len(attempts)} attempts failed, the last: {attempts[-1].error}",
                      "run the promote again once the cloud answers: finished clouds are skipped", tuple(attempts))


def _promote_cloud(pipeline: Pipeline, spec: CloudSpec, rec: UnitRecord, image: Path, channel: str,
                   events: EventLog) -> CloudPromotion:
    c = cl.open_cloud(spec.name, spec.retries)
    mine = cl.with_retries(f"list images of {spec.name}", lambda: cl.owned(c, pipeline.spec.name, rec.unit),
                           spec.retries)
    same = [i for i in mine if i.sha256 == rec.sha256 and i.usable]
    if any(i.channel == channel for i in same):
        done = next(i for i in same if i.channel == channel)
        return CloudPromotion(spec.name, "done", done.id)
    removed = tuple(cl.remove_leftovers(c, mine, rec.sha256))
    channels = pipeline.spec.channels
    earlier = [i for i in same if i.channel in channels and channels.index(str(i.channel)) < channels.index(channel)]
    if earlier:
        img = earlier[0]
        cl.set_channel(c, img.id, channel, visibility=spec.visibility if channel == channels[-1] else None,
                       properties=spec.properties)
        return CloudPromotion(spec.name, "moved", img.id, (), removed)
    try:
        image_id, attempts = _upload(c, spec, pipeline, rec, image, channel, events)
    finally:
        # whatever happened, no record of this image stays queued (when the cloud answers)
        try:
            cl.remove_leftovers(c, cl.owned(c, pipeline.spec.name, rec.unit), rec.sha256)
        except ImagekitError as exc:
            log.warning("%s: cannot check for leftovers now (%s); the next promote removes them", spec.name,
                        exc.message)
    return CloudPromotion(spec.name, "uploaded", image_id, tuple(attempts), removed)


def _check_tested(pipeline: Pipeline, rec: UnitRecord) -> None:
    gate_cloud = pipeline.gate_cloud
    channels = pipeline.spec.channels
    if gate_cloud is None:
        return
    c = cl.open_cloud(gate_cloud, pipeline.cloud(gate_cloud).retries)
    ok = [i for i in cl.owned(c, pipeline.spec.name, rec.unit)
          if i.sha256 == rec.sha256 and i.usable and i.channel in channels[1:]]
    if not ok:
        raise NotTested(f"{rec.unit}: {rec.sha256[:12]} has not passed the gate ({channels[1]} in {gate_cloud})",
                        f"run 'imagekit ci gate {rec.unit}' first (or --force)")


def promote(pipeline: Pipeline, unit_name: str, channel: str, events: EventLog, *, artifacts: Path | None = None,
            only: list[str] | None = None, force: bool = False, say: Say | None = None) -> PromoteResult:
    """Promote one unit's image to ``channel`` in every configured cloud (or ``only`` these)."""
    unit = pipeline.unit(unit_name)
    channels = pipeline.spec.channels
    if channel not in channels[1:]:
        raise UsageError(f"cannot promote to '{channel}'", f"channels after the gate: {', '.join(channels[1:])}")
    rec, image = require_record(pipeline, unit, artifacts)
    if not force and channel != channels[1]:
        _check_tested(pipeline, rec)
    targets = [c for c in pipeline.spec.clouds if not only or c.name in only]
    if only and len(targets) != len(set(only)):
        raise UsageError(f"unknown cloud in {', '.join(only)}", f"clouds: {', '.join(c.name for c in pipeline.spec.clouds)}")
    results = []
    for spec in targets:
        (say or (lambda _s, _m: None))("promote", f"{unit.name} -> {channel} in {spec.name}")
        events.emit("promote.cloud.start", data={"cloud": spec.name, "channel": channel})
        try:
            res = _promote_cloud(pipeline, spec, rec, image, channel, events)
        except ImagekitError as exc:
            if isinstance(exc, UnsafeImageError):
                raise
            attempts = exc.attempts if isinstance(exc, CloudFailed) else ()
            res = CloudPromotion(spec.name, "failed", None, attempts, (), exc.message)
        events.emit("promote.cloud.end", data={"cloud": spec.name, "state": res.state, "image": res.image_id,
                                               "error": res.error})
        results.append(res)
    complete = all(r.state != "failed" for r in results)
    result = PromoteResult(unit.name, rec.sha256, channel, tuple(results), complete)
    notify.notify(pipeline.spec, "promote" if complete else "failure",
                  {"command": "promote", "unit": unit.name, "sha256": rec.sha256, "channel": channel,
                   "clouds": {r.cloud: r.state for r in results}})
    return result
