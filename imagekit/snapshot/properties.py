"""What a Nova snapshot inherits and should not keep, and why.

Nova's createImage makes the snapshot's Glance record from the server and from the image
the server booted from: every property of the base image is copied, and Nova and the
hypervisor driver add their own. Published as they are, they are wrong or leak:

========================================  =================================================================
``instance_uuid``                         the server it was taken from (deleted afterwards): leaks an ID,
                                          and Horizon shows the image as an instance snapshot
``base_image_ref``                        the image that server booted from: the new image is not a child
                                          that needs it, and the reference dangles once the base is gone
``image_type`` (= ``snapshot``)           marks it as an instance snapshot, not a published image
``image_location``, ``image_state``       EC2-era bookkeeping the libvirt driver still writes
``owner_id``, ``owner_project_name``,     who took the snapshot: the project and user (names too when
``owner_user_name``, ``user_id``          Keystone is there); the image's ``owner`` says what matters
``boot_roles``                            the roles of the user who took the snapshot
``owner_specified.openstack.*``           openstacksdk's digests and object name of the *base* image's
                                          upload; inherited they describe other data (sdk then compares
                                          the snapshot's content with the wrong file)
``kernel_id``, ``ramdisk_id`` (empty)     written even when the server had none
``imagekit_*``                            the base image's recipe, digest and imagekit version: replaced by
                                          the snapshot's own when a recipe is given
========================================  =================================================================

Never removed: ``block_device_mapping`` and ``bdm_v2`` (a volume-backed snapshot's data:
imagekit refuses those anyway), ``os_*`` / ``hw_*`` (the guest's OS and hardware, still
true of the snapshot; a recipe's own values replace them), and every property not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# name -> why it is removed (README and --json say it)
INHERITED: dict[str, str] = {
    "instance_uuid": "the server the snapshot was taken from",
    "base_image_ref": "the image that server booted from",
    "image_type": "marks an instance snapshot, not a published image",
    "image_location": "EC2-era bookkeeping of the hypervisor driver",
    "image_state": "EC2-era bookkeeping of the hypervisor driver",
    "owner_id": "the project that took the snapshot",
    "owner_project_name": "the project that took the snapshot",
    "owner_user_name": "the user who took the snapshot",
    "user_id": "the user who took the snapshot",
    "boot_roles": "the roles of the user who took the snapshot",
    "imagekit_snapshot": "imagekit's mark of a snapshot not yet cleaned",
}
PREFIXES: dict[str, str] = {
    "owner_specified.openstack.": "openstacksdk's digests of the base image's upload, wrong for the snapshot",
    "imagekit_": "the base image's recipe and digest",
}
EMPTY_IF_UNSET = ("kernel_id", "ramdisk_id")
KEEP = ("block_device_mapping", "bdm_v2")

# Glance's own fields: never properties, never touched
GLANCE_FIELDS = frozenset({
    "id", "name", "status", "visibility", "protected", "os_hidden", "checksum", "os_hash_algo", "os_hash_value",
    "owner", "size", "virtual_size", "min_ram", "min_disk", "disk_format", "container_format", "created_at",
    "updated_at", "tags", "self", "file", "schema", "direct_url", "locations", "stores",
})


@dataclass(frozen=True)
class Cleaning:
    """What to remove (with why) and what to set on a snapshot."""

    remove: dict[str, str] = field(default_factory=dict)
    set: dict[str, str] = field(default_factory=dict)


def why_removed(name: str, value: Any) -> str | None:
    """Why ``name`` (with ``value``) is removed from a snapshot, or None when it stays."""
    if name in KEEP or name in GLANCE_FIELDS:
        return None
    if name in INHERITED:
        return INHERITED[name]
    if name in EMPTY_IF_UNSET and value in (None, "", "None"):
        return "written empty: the server had none"
    for prefix, why in PREFIXES.items():
        if name.startswith(prefix):
            return why
    return None


def plan(image: Mapping[str, Any], wanted: Mapping[str, str]) -> Cleaning:
    """The cleaning of a snapshot record ``image`` (Glance's JSON), then ``wanted`` set.

    A property in ``wanted`` is set even when it would be removed (a recipe's ``imagekit_recipe``);
    ``wanted`` values that are already there are not sent again."""
    remove = {k: why for k, v in image.items() if (why := why_removed(k, v)) is not None and k not in wanted}
    to_set = {k: v for k, v in wanted.items() if k not in GLANCE_FIELDS and image.get(k) != v}
    return Cleaning(remove, to_set)
