"""``imagekit ci rotate [--dry-run]``: retention per channel, on imagekit's own images only.

In every cloud, the pipeline's images (``imagekit_pipeline`` and ``imagekit_unit`` set:
:mod:`imagekit.ci.clouds`) are grouped by unit and channel, newest first. The channel's
``retention`` rule keeps the ``keep`` newest usable images and applies its ``action``
(``hide``: ``os_hidden``, still bootable by ID, so instances and rebuilds keep working;
``deactivate``; ``delete``) to the older ones. Never touched: protected images (they do not
count either), images of other owners (no ownership properties, or another pipeline's), a
unit's current output (the sha256 of its last record) in the last channel, and images in a
channel without a rule. Records that never became usable are left to ``ci promote``, which
removes them.
"""

from __future__ import annotations

from collections.abc import Callable

from imagekit.ci import clouds as cl
from imagekit.ci import notify
from imagekit.ci.events import EventLog
from imagekit.ci.model import Pipeline
from imagekit.ci.results import RotateResult, RotateRow
from imagekit.ci.shared import open_cache, read_record
from imagekit.cloud import Cloud
from imagekit.errors import ImagekitError

Say = Callable[[str, str], None]


def _decide(pipeline: Pipeline, images: list[cl.CloudImage], current: dict[str, str]) -> list[tuple[cl.CloudImage,
                                                                                                      str, str]]:
    out: list[tuple[cl.CloudImage, str, str]] = []
    kept: dict[tuple[str, str | None], int] = {}
    last = pipeline.spec.channels[-1]
    for img in images:  # newest first
        rule = pipeline.spec.retention.get(img.channel or "")
        group = (img.unit, img.channel)
        if img.protected:
            out.append((img, "skip", "protected"))
        elif not img.usable and img.status != "deactivated":
            out.append((img, "skip", f"status {img.status}"))
        elif rule is None:
            out.append((img, "keep", f"no retention rule for channel {img.channel}"))
        elif img.channel == last and current.get(img.unit) == img.sha256:
            kept[group] = kept.get(group, 0) + 1
            out.append((img, "keep", "the unit's current image"))
        elif kept.get(group, 0) < rule.keep:
            kept[group] = kept.get(group, 0) + 1
            out.append((img, "keep", f"one of the {rule.keep} newest in {img.channel}"))
        elif (rule.action == "hide" and img.hidden) or (rule.action == "deactivate" and img.status == "deactivated"):
            out.append((img, "skip", f"already {'hidden' if img.hidden else 'deactivated'}"))
        else:
            out.append((img, rule.action, f"older than the {rule.keep} newest in {img.channel}"))
    return out


def _act(c: Cloud, img: cl.CloudImage, action: str) -> None:
    if action == "hide":
        c.call(f"hide image {img.id}", lambda: c.glance.images.update(img.id, os_hidden=True))
    elif action == "deactivate":
        c.call(f"deactivate image {img.id}", lambda: c.glance.images.deactivate(img.id))
    elif action == "delete":
        cl.delete(c, img.id)


def rotate(pipeline: Pipeline, events: EventLog, *, dry_run: bool = False, only: list[str] | None = None,
           say: Say | None = None) -> RotateResult:
    shared = open_cache(pipeline)
    current = {}
    for u in pipeline.units:
        rec = read_record(pipeline, u, shared)
        if rec is not None:
            current[u.name] = rec.sha256
    rows: list[RotateRow] = []
    errors: list[str] = []
    changed = 0
    for spec in pipeline.spec.clouds:
        if only and spec.name not in only:
            continue
        (say or (lambda _s, _m: None))("rotate", spec.name)
        try:
            c = cl.open_cloud(spec.name, spec.retries)
            decisions = _decide(pipeline, cl.owned(c, pipeline.spec.name), current)
            for img, action, reason in decisions:
                if action in ("hide", "deactivate", "delete") and not dry_run:
                    _act(c, img, action)
                    changed += 1
                rows.append(RotateRow(spec.name, img.unit, img.channel, img.id, img.name, img.created_at, action,
                                      reason))
                events.emit("rotate.image", data={"cloud": spec.name, "image": img.id, "action": action,
                                                  "reason": reason, "dry_run": dry_run})
        except ImagekitError as exc:
            errors.append(f"{spec.name}: {exc.message}")
    if changed:
        notify.notify(pipeline.spec, "rotate", {"changed": changed, "images": [r.id for r in rows
                                                                             if r.action not in ("keep", "skip")]})
    return RotateResult(dry_run, tuple(rows), changed, tuple(errors))
