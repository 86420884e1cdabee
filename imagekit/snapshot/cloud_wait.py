"""The waits of the cloud snapshot workflow, each bounded, each failing with a reason.

Every wait polls (``time.sleep``, so Ctrl-C and SIGTERM interrupt it at once: the caller's
clean-up then runs) and raises a typed error instead of waiting out its timeout when the
cloud already said no:

- :func:`server_status`: a server reaching a status; ERROR (with Nova's fault) or the
  server vanishing end the wait;
- :func:`console`: imagekit's reporter markers (or a caller's text) in the console log;
  cloud-init's errors end the wait with the console's tail;
- :func:`image_active`: the snapshot image becoming ``active``. The image disappearing
  (404: Nova deletes it when the upload fails), ``killed``/``deleted``, or Nova's snapshot
  task ending while the image is still not active all end the wait; :func:`diagnose` then
  reads the server's state and its ``createImage`` instance action to say what is known;
- :func:`gone`: a deleted server disappearing.

``conn`` is an openstacksdk connection (compute); images are read through imagekit's
Glance client (``imagekit.cloud.Cloud``) so that every property is seen, first-class or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from imagekit.cloud import Cloud, CloudError, translate
from imagekit.glance_images import image_dict
from imagekit.snapshot import console as console_mod
from imagekit.snapshot.errors import ImageFailed, ProvisionFailed, ProvisionTimeout, ServerFailed

log = logging.getLogger("imagekit.snapshot")

T = TypeVar("T")
CONSOLE_LINES = 5000


@dataclass(frozen=True)
class Waits:
    """Seconds: each wait's limit, the poll interval, and how long an image may stay inactive
    once Nova's snapshot task has ended."""

    active: float = 900.0
    provision: float = 3600.0
    stop: float = 600.0
    image: float = 3600.0
    delete: float = 300.0
    poll: float = 2.0
    stalled: float = 30.0


def call(cloud: str, what: str, fn: Callable[[], T]) -> T:
    """An openstacksdk call; its errors become CloudError."""
    try:
        return fn()
    except (CloudError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - translated
        raise translate(exc, cloud, what) from exc


def _not_found(exc: BaseException) -> bool:
    from openstack import exceptions as osexc

    return isinstance(exc, osexc.NotFoundException)


def get_server(conn: Any, cloud: str, server_id: str) -> Any | None:
    """The server, or None when it does not exist (any more)."""
    from openstack import exceptions as osexc

    try:
        return conn.compute.get_server(server_id)
    except osexc.NotFoundException:
        return None
    except Exception as exc:  # noqa: BLE001 - translated
        raise translate(exc, cloud, f"read server {server_id}") from exc


def _fault(server: Any) -> str:
    fault = server.fault or {}
    return str(fault.get("message") or "no fault recorded") if isinstance(fault, dict) else str(fault)


def server_status(conn: Any, cloud: str, server_id: str, want: str, timeout: float, poll: float) -> Any:
    """Wait for the server to reach ``want`` (ACTIVE, SHUTOFF)."""
    deadline = time.monotonic() + timeout
    while True:
        server = get_server(conn, cloud, server_id)
        if server is None:
            raise ServerFailed(f"server {server_id} disappeared while waiting for {want}",
                               "someone (or the cloud) deleted it")
        if server.status == want and not server.task_state:
            return server
        if server.status == "ERROR":
            raise ServerFailed(f"server {server.name} ({server_id}) went to ERROR: {_fault(server)}",
                               "the cloud could not build or run it: check the image, flavor and network")
        if time.monotonic() > deadline:
            raise ServerFailed(f"server {server.name} ({server_id}) is still {server.status} "
                               f"(task {server.task_state or 'none'}) after {timeout:g} s, not {want}",
                               "the cloud is slow or stuck; raise the timeout")
        time.sleep(poll)


def console_text(conn: Any, cloud: str, server_id: str) -> str:
    out = call(cloud, "read the console log",
               lambda: conn.compute.get_server_console_output(server_id, length=CONSOLE_LINES))
    return str((out or {}).get("output") or "")


def console(conn: Any, cloud: str, server_id: str, reached: Callable[[str], bool], nonce: str | None,
            timeout: float, poll: float) -> str:
    """Wait until ``reached(console text)``; with a reporter ``nonce``, cloud-init's errors fail at once."""
    deadline = time.monotonic() + timeout
    while True:
        text = console_text(conn, cloud, server_id)
        if nonce is not None:
            progress = console_mod.scan(text, nonce)
            if progress.result is not None and not progress.result.ok:
                errors = "; ".join(progress.result.errors) or "no error text"
                raise ProvisionFailed(f"cloud-init reported status '{progress.result.status}' on server {server_id}: "
                                      f"{errors}\n--- console (last lines) ---\n{console_mod.tail(text)}",
                                      "fix the user-data (the failing command's output is in the console)")
            if progress.generalised_rc not in (None, 0):
                raise ProvisionFailed(f"generalising the guest failed (status {progress.generalised_rc})\n"
                                      f"--- console (last lines) ---\n{console_mod.tail(text)}")
        if reached(text):
            return text
        if time.monotonic() > deadline:
            raise ProvisionTimeout(f"server {server_id}: the end of the customisation did not show on the console "
                                   f"within {timeout:g} s\n--- console (last lines) ---\n{console_mod.tail(text)}",
                                   "the guest may still be working (raise the timeout) or hang")
        time.sleep(poll)


def get_image(cloud: Cloud, image_id: str) -> dict[str, Any] | None:
    """Glance's record of the image (every property), or None on 404."""
    from glanceclient import exc as gexc

    try:
        return image_dict(cloud.glance.images.get(image_id))
    except gexc.HTTPNotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - translated
        raise translate(exc, cloud.name, f"read image {image_id}", cloud.endpoint) from exc


def image_active(conn: Any, cloud: Cloud, image_id: str, server_id: str, w: Waits) -> dict[str, Any]:
    """Wait for the snapshot image to become active (see the module documentation)."""
    deadline = time.monotonic() + w.image
    idle_since: float | None = None
    while True:
        img = get_image(cloud, image_id)
        if img is None or img.get("status") == "deleted":
            how = "disappeared (HTTP 404)" if img is None else "was deleted"
            raise ImageFailed(f"the snapshot image {image_id} {how} while Nova was making it: "
                              f"Nova deletes the image when the snapshot fails. {diagnose(conn, cloud.name, server_id)}",
                              "the cause is in nova-compute's log on the server's host (the instance action can "
                              "report the snapshot event as Success: Nova records it before the upload fails)")
        status = img.get("status")
        if status == "active":
            return img
        if status in ("killed", "deactivated"):
            raise ImageFailed(f"the snapshot image {image_id} is {status}. {diagnose(conn, cloud.name, server_id)}")
        server = get_server(conn, cloud.name, server_id)
        if server is not None and not server.task_state:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > w.stalled:
                raise ImageFailed(f"Nova's snapshot task on server {server_id} ended but the image {image_id} is "
                                  f"still {status} after {w.stalled:g} s. {diagnose(conn, cloud.name, server_id)}",
                                  "the hypervisor driver did not upload the data")
        else:
            idle_since = None
        if time.monotonic() > deadline:
            raise ImageFailed(f"the snapshot image {image_id} is still {status} after {w.image:g} s",
                              "big disks take long to upload: raise the timeout")
        time.sleep(w.poll)


def diagnose(conn: Any, cloud: str, server_id: str) -> str:
    """What the server and its last createImage instance action say (one paragraph)."""
    parts: list[str] = []
    try:
        server = get_server(conn, cloud, server_id)
        if server is None:
            return f"Server {server_id} no longer exists."
        host = f", host {server.compute_host}" if getattr(server, "compute_host", None) else ""
        parts.append(f"Server {server.name} ({server_id}): status {server.status}, task state "
                     f"{server.task_state or 'none'}, vm state {server.vm_state}{host}; fault: {_fault(server)}.")
        actions = [a for a in conn.compute.server_actions(server_id) if a.action == "createImage"]
        if actions:
            act = sorted(actions, key=lambda a: str(a.start_time))[-1]
            full = conn.compute.get_server_action(act.request_id, server_id)
            events = "; ".join(f"{_ev(e, 'event')}: {_ev(e, 'result')}"
                               + (f" ({_ev(e, 'traceback')[-200:]})" if _ev(e, "traceback") else "")
                               for e in (full.events or []))
            parts.append(f"Instance action createImage ({act.request_id}): {events or 'no events'}"
                         + (f", message: {full.message}" if full.message else "") + ".")
    except (CloudError, Exception) as exc:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
        parts.append(f"(could not read more: {exc})")
    return " ".join(parts)


def _ev(event: Any, key: str) -> str:
    value = event.get(key) if isinstance(event, dict) else getattr(event, key, None)
    return str(value) if value else ""


def gone(conn: Any, cloud: str, server_id: str, timeout: float, poll: float) -> bool:
    """Wait for a deleted server to disappear; False at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = get_server(conn, cloud, server_id)
        if server is None or server.status == "DELETED":
            return True
        time.sleep(min(poll, 1.0))
    return False
