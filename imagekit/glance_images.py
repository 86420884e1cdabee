"""Images of a Glance: plain-dict views, listing by name prefix and rotation (``prune``).

``list_images`` returns the images (hidden ones too), newest first; ``prune``
keeps the newest ``keep`` unprotected images whose name starts with a prefix and
hides, deactivates or deletes the older ones. Protected images are never touched
and do not count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from imagekit.cloud import Cloud
from imagekit.errors import UsageError

log = logging.getLogger("imagekit.glance")

PruneAction = Literal["hide", "deactivate", "delete"]

IMAGE_FIELDS = ("id", "name", "status", "disk_format", "container_format", "size", "virtual_size", "min_disk",
                "min_ram", "visibility", "protected", "os_hidden", "checksum", "os_hash_algo", "os_hash_value",
                "created_at", "updated_at", "tags", "owner")


def image_dict(img: Any) -> dict[str, Any]:
    """A glanceclient image (warlock model) as a plain dict."""
    return {str(k): v for k, v in dict(img).items()}


def summary(img: Mapping[str, Any]) -> dict[str, Any]:
    base = {k: img.get(k) for k in IMAGE_FIELDS}
    base["properties"] = {k: v for k, v in img.items() if k not in IMAGE_FIELDS and k not in
                          ("file", "schema", "self", "locations", "direct_url", "stores")}
    return base


def list_images(c: Cloud, name_prefix: str | None = None, include_hidden: bool = True) -> list[dict[str, Any]]:
    """Images of the cloud (hidden ones too), newest first, optionally only names starting with a prefix."""
    def fetch() -> list[dict[str, Any]]:
        imgs = [image_dict(i) for i in c.glance.images.list()]
        if include_hidden:
            seen = {i["id"] for i in imgs}
            imgs += [image_dict(i) for i in c.glance.images.list(filters={"os_hidden": True})
                     if i["id"] not in seen]
        return imgs

    imgs = c.call("list images", fetch)
    if name_prefix:
        imgs = [i for i in imgs if str(i.get("name") or "").startswith(name_prefix)]
    imgs.sort(key=lambda i: (str(i.get("created_at") or ""), str(i.get("name") or "")), reverse=True)
    return [summary(i) for i in imgs]


def prune(c: Cloud, name_prefix: str, keep: int, action: PruneAction = "hide",
          dry_run: bool = False) -> dict[str, Any]:
    """Keep the ``keep`` newest unprotected images whose name starts with ``name_prefix``; act on the rest."""
    if not name_prefix:
        raise UsageError("prune needs a non-empty --name-prefix")
    if keep < 0:
        raise UsageError("--keep must be >= 0")
    if action not in ("hide", "deactivate", "delete"):
        raise UsageError(f"unknown prune action {action!r}")
    images = list_images(c, name_prefix)
    rows: list[dict[str, Any]] = []
    kept = 0
    for img in images:
        row = {"id": img["id"], "name": img["name"], "created_at": img["created_at"], "status": img["status"],
               "protected": bool(img.get("protected")), "os_hidden": bool(img.get("os_hidden"))}
        if row["protected"]:
            row.update(action="skip", reason="protected")
        elif img.get("status") not in ("active", "deactivated"):
            row.update(action="skip", reason=f"status {img.get('status')}")
        elif kept < keep:
            kept += 1
            row.update(action="keep", reason=f"one of the {keep} newest")
        elif action == "hide" and row["os_hidden"]:
            row.update(action="skip", reason="already hidden")
        elif action == "deactivate" and img.get("status") == "deactivated":
            row.update(action="skip", reason="already deactivated")
        else:
            row.update(action=action, reason=f"older than the {keep} newest")
        rows.append(row)
    done = 0
    if not dry_run:
        for row in rows:
            image_id = row["id"]
            if row["action"] == "hide":
                c.call(f"hide image {image_id}", lambda i=image_id: c.glance.images.update(i, os_hidden=True))
            elif row["action"] == "deactivate":
                c.call(f"deactivate image {image_id}", lambda i=image_id: c.glance.images.deactivate(i))
            elif row["action"] == "delete":
                c.call(f"delete image {image_id}", lambda i=image_id: c.glance.images.delete(i))
            else:
                continue
            done += 1
            log.info("%s image %s (%s)", row["action"], image_id, row["name"])
    return {"name_prefix": name_prefix, "keep": keep, "action": action, "dry_run": dry_run,
            "changed": done, "images": rows}
