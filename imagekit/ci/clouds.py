"""The images a pipeline owns in a cloud, and its channels.

imagekit owns an image when it carries ``imagekit_pipeline`` (the pipeline's name) and
``imagekit_unit``; nothing else is ever changed, hidden or deleted by ``imagekit ci``.
Other properties it sets: ``imagekit_channel`` (candidate, tested, stable: the channel is a
property, so moving an image is one update), ``imagekit_sha256`` (the file's digest: the
same image in every cloud), ``imagekit_unit_key`` (the step-cache key of the output) and
``imagekit_built_at``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from imagekit.ci.shared import UnitRecord
from imagekit.cloud import Cloud, CloudError, connect
from imagekit.glance import INCOMPLETE, list_images

log = logging.getLogger("imagekit.ci")

PIPELINE = "imagekit_pipeline"
UNIT = "imagekit_unit"
CHANNEL = "imagekit_channel"
SHA256 = "imagekit_sha256"
UNIT_KEY = "imagekit_unit_key"
BUILT_AT = "imagekit_built_at"
T = TypeVar("T")


@dataclass(frozen=True)
class CloudImage:
    id: str
    name: str
    status: str
    unit: str
    channel: str | None
    sha256: str | None
    created_at: str
    protected: bool
    hidden: bool
    visibility: str | None
    incomplete: bool

    @property
    def usable(self) -> bool:
        return self.status == "active" and not self.incomplete


def owned(c: Cloud, pipeline: str, unit: str | None = None) -> list[CloudImage]:
    """The pipeline's images (of one unit), hidden ones too, newest first."""
    out = []
    for img in list_images(c, include_hidden=True):
        props = img.get("properties") or {}
        if props.get(PIPELINE) != pipeline or not props.get(UNIT) or (unit is not None and props.get(UNIT) != unit):
            continue
        out.append(CloudImage(id=str(img["id"]), name=str(img.get("name") or ""), status=str(img.get("status")),
                              unit=str(props[UNIT]), channel=props.get(CHANNEL), sha256=props.get(SHA256),
                              created_at=str(img.get("created_at") or ""), protected=bool(img.get("protected")),
                              hidden=bool(img.get("os_hidden")), visibility=img.get("visibility"),
                              incomplete=str(props.get(INCOMPLETE, "")).lower() == "true"))
    return out


def ownership(pipeline: str, record: UnitRecord, channel: str) -> dict[str, str]:
    return {PIPELINE: pipeline, UNIT: record.unit, CHANNEL: channel, SHA256: record.sha256,
            UNIT_KEY: record.keys.convert, BUILT_AT: record.created}


def set_channel(c: Cloud, image_id: str, channel: str, *, visibility: str | None = None,
                properties: dict[str, str] | None = None) -> None:
    changes: dict[str, Any] = dict(properties or {})
    changes[CHANNEL] = channel
    if visibility is not None:
        changes["visibility"] = visibility
    c.call(f"move image {image_id} to {channel}", lambda: c.glance.images.update(image_id, **changes))


def delete(c: Cloud, image_id: str) -> None:
    from glanceclient import exc as gexc

    def go() -> None:
        try:
            c.glance.images.delete(image_id)
        except gexc.HTTPNotFound:
            pass

    c.call(f"delete image {image_id}", go)


def remove_leftovers(c: Cloud, images: list[CloudImage], sha256: str | None = None) -> list[str]:
    """Delete the pipeline's records that never became usable (queued, saving, importing, killed,
    or still marked incomplete) — of one image (``sha256``) or all; protected ones are kept."""
    removed = []
    for img in images:
        if img.usable or img.protected or (sha256 is not None and img.sha256 != sha256):
            continue
        if img.status in ("deleted", "pending_delete"):
            continue
        delete(c, img.id)
        log.info("removed the leftover image %s (%s) from %s", img.id, img.status, c.name)
        removed.append(img.id)
    return removed


def with_retries(what: str, fn: Callable[[], T], retries: int, delay: float = 1.0) -> T:
    """``fn()`` again after a CloudError (the cloud did not answer), ``retries`` times, backing off."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except CloudError as exc:
            if attempt == retries:
                raise
            log.info("%s failed (%s); retrying in %.0f s", what, exc.message, delay * 2 ** attempt)
            time.sleep(delay * 2 ** attempt)
    raise AssertionError("unreachable")


def open_cloud(name: str, retries: int = 0) -> Cloud:
    return with_retries(f"connect to {name}", lambda: connect(name), retries)
