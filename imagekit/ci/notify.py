"""Notifications: a JSON POST to the pipeline's webhook (chat, incident tools, dashboards).

``notify(spec, kind, payload)`` posts ``{"event": kind, "pipeline": ..., ...payload}`` when
the webhook subscribes to ``kind`` (``failure`` for every failed command, ``run``,
``gate``, ``promote``, ``rotate``). A notification never fails the command: an unreachable
webhook is logged and returned as a warning. The URL (which often holds a token) is never
logged in full: only its scheme and host.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from imagekit.ci.model import PipelineSpec

log = logging.getLogger("imagekit.ci.notify")
TIMEOUT = 10.0


def notify(spec: PipelineSpec, kind: str, payload: dict[str, Any]) -> str | None:
    """Post the event; returns a warning when it could not be delivered, else None."""
    hook = spec.notify.webhook
    if hook is None or kind not in hook.events:
        return None
    body = json.dumps({"event": kind, "pipeline": spec.name, **payload}, default=str).encode()
    req = urllib.request.Request(hook.url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "imagekit-ci"})
    where = urllib.parse.urlsplit(hook.url)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - the configured webhook
            if resp.status >= 300:
                raise urllib.error.HTTPError(hook.url, resp.status, "refused", resp.headers, None)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "code", None) or getattr(exc, "reason", None) or type(exc).__name__
        warning = f"webhook {where.scheme}://{where.hostname}: notification not delivered ({reason})"
        log.warning("%s", warning)
        return warning
    return None
