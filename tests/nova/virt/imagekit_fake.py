"""The test hypervisor: Nova's own fake driver plus real disk data and a scripted console.

Loaded as ``compute_driver = imagekit_fake.ImagekitFakeDriver``: Nova imports
``nova.virt.<compute_driver>`` and ``tests.nova.launch`` puts this folder on
``nova.virt.__path__``. What it does for real, what it makes up:

- **spawn** (real data): downloads the server's root disk from Glance to
  ``<instances_path>/<uuid>/disk`` through Nova's own Glance client (boot from image only;
  a volume-backed server has no image), then Nova's fake spawn;
- **snapshot** (real data): goes through the task states a real driver does
  (``image_pending_upload``, then ``image_uploading``), then uploads that file, with the
  metadata the libvirt driver sets, to the image Nova created;
- **console** (made up): there is no guest. The console shows what a guest running
  imagekit's reporter (``imagekit.snapshot.userdata``) would print: the markers of the nonce
  found in the server's user-data (``IMAGEKIT-STARTED``, ``IMAGEKIT-RESULT ... status=done``
  and, in provision mode, ``IMAGEKIT-GENERALISED ... rc=0``), plus the disk's size and sha256
  so that a test can see which bytes a server booted from;
- **knobs** (server metadata, for the tests): ``imagekit_fake_spawn_delay`` and
  ``imagekit_fake_stop_delay`` (seconds), ``imagekit_fake_console`` /
  ``imagekit_fake_console_verify`` (``done``, ``error``: cloud-init failed, ``never``: the
  guest never finishes) for provision- and verify-mode servers, ``imagekit_fake_snapshot``
  (``fail``: raise after ``image_uploading``, before any data is sent, as a dead hypervisor
  would; ``slow``: wait ``imagekit_fake_snapshot_delay`` seconds before uploading).

One node with a stable node UUID (``FakeDriverWithoutFakeNodes`` keeps ``state_path/compute_id``).
"""

import base64
import binascii
import email
import hashlib
import os
import re
import shutil
import time

import nova.conf
from nova import exception
from nova.compute import task_states
from nova.image import glance
from nova.virt import fake
from oslo_log import log as logging

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)
PREFIX = "imagekit_fake_"
_NONCE = re.compile(r"^N=([0-9a-f]{8,64})$", re.MULTILINE)
_MODE = re.compile(r"^MODE=(provision|verify)$", re.MULTILINE)


class SnapshotInjectedFailure(exception.NovaException):
    msg_fmt = "imagekit_fake: snapshot failure injected for %(uuid)s"


def _knob(instance, name, default=""):
    return str((instance.metadata or {}).get(PREFIX + name, default))


def _reporter(user_data):
    """(nonce, mode) of imagekit's reporter in base64 user-data, or (None, None)."""
    try:
        text = base64.b64decode(user_data or "").decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    parts = [text]
    msg = email.message_from_string(text)
    if msg.is_multipart():
        parts = [p.get_payload(decode=True).decode(errors="replace") for p in msg.walk()
                 if not p.is_multipart() and p.get_payload(decode=True)]
    for part in parts:
        n, m = _NONCE.search(part), _MODE.search(part)
        if n and m:
            return n.group(1), m.group(1)
    return None, None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImagekitFakeDriver(fake.FakeDriverWithoutFakeNodes):
    capabilities = dict(fake.FakeDriver.capabilities, supports_image_type_qcow2=True,
                        supports_image_type_raw=True)

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self._image_api = glance.API()
        self._disks = {}  # uuid -> (path, disk_format, container_format)
        self._spawned = {}  # uuid -> time.monotonic() of spawn

    def _disk_path(self, instance):
        return os.path.join(CONF.instances_path, instance.uuid, "disk")

    def spawn(self, context, instance, image_meta, injected_files, admin_password, allocations,
              network_info=None, block_device_info=None, power_on=True, accel_info=None):
        delay = float(_knob(instance, "spawn_delay", "0") or 0)
        if delay:
            time.sleep(delay)
        if instance.image_ref:  # '' for a volume-backed server
            path = self._disk_path(instance)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._image_api.download(context, instance.image_ref, dest_path=path)
            fmt = image_meta.disk_format if image_meta.obj_attr_is_set("disk_format") else "raw"
            cfmt = image_meta.container_format if image_meta.obj_attr_is_set("container_format") else "bare"
            self._disks[instance.uuid] = (path, fmt, cfmt)
        super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                      network_info=network_info, block_device_info=block_device_info,
                      power_on=power_on, accel_info=accel_info)
        self._spawned[instance.uuid] = time.monotonic()

    def power_off(self, instance, timeout=0, retry_interval=0):
        delay = float(_knob(instance, "stop_delay", "0") or 0)
        if delay:
            time.sleep(delay)
        super().power_off(instance, timeout, retry_interval)

    def snapshot(self, context, instance, image_id, update_task_state):
        if instance.uuid not in self.instances:
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        disk = self._disks.get(instance.uuid)
        if disk is None or not os.path.exists(disk[0]):
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        path, fmt, cfmt = disk
        snapshot = self._image_api.get(context, image_id)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        metadata = {"status": "active", "name": snapshot["name"], "disk_format": fmt, "container_format": cfmt,
                    "properties": {"kernel_id": instance.kernel_id, "ramdisk_id": instance.ramdisk_id,
                                   "image_location": "snapshot", "image_state": "available",
                                   "owner_id": instance.project_id}}
        if instance.os_type:
            metadata["properties"]["os_type"] = instance.os_type
        update_task_state(task_state=task_states.IMAGE_UPLOADING, expected_state=task_states.IMAGE_PENDING_UPLOAD)
        mode = _knob(instance, "snapshot")
        if mode == "fail":
            raise SnapshotInjectedFailure(uuid=instance.uuid)
        if mode == "slow":
            time.sleep(float(_knob(instance, "snapshot_delay", "30") or 30))
        with open(path, "rb") as data:
            self._image_api.update(context, image_id, metadata, data, purge_props=False)
        LOG.info("imagekit_fake: snapshot %s uploaded from %s", image_id, path, instance=instance)

    def destroy(self, context, instance, network_info, block_device_info=None, destroy_disks=True,
                destroy_secrets=True):
        super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)
        self._disks.pop(instance.uuid, None)
        self._spawned.pop(instance.uuid, None)
        if destroy_disks:
            shutil.rmtree(os.path.join(CONF.instances_path, instance.uuid), ignore_errors=True)

    def _markers(self, instance):
        nonce, mode = _reporter(instance.user_data)
        if nonce is None:
            return []
        lines = [f"IMAGEKIT-STARTED {nonce}"]
        outcome = _knob(instance, "console_verify" if mode == "verify" else "console", "done")
        if outcome == "done":
            result = base64.b64encode(b'{"v1": {"datasource": "imagekit_fake", "errors": []}}').decode()
            lines.append(f"IMAGEKIT-RESULT {nonce} status=done result={result}")
            if mode == "provision":
                lines += [f"IMAGEKIT-GENERALISING {nonce}", f"IMAGEKIT-GENERALISED {nonce} rc=0"]
        elif outcome == "error":
            result = base64.b64encode(b'{"v1": {"errors": ["(\'scripts-user\', RuntimeError(\'Runparts: '
                                      b'1 failures (part-002) in 1 attempted commands\'))"]}}').decode()
            lines += ["cloud-init[460]: + false", f"IMAGEKIT-RESULT {nonce} status=error result={result}"]
        return lines

    def get_console_output(self, context, instance):
        lines = [f"imagekit_fake console of {instance.uuid}", f"image_ref={instance.image_ref}"]
        disk = self._disks.get(instance.uuid)
        if disk and os.path.exists(disk[0]):
            lines += [f"disk_format={disk[1]}", f"size={os.path.getsize(disk[0])}", f"sha256={_sha256(disk[0])}"]
        else:
            lines.append("root_disk=none (volume-backed or not spawned here)")
        return "\n".join(lines + self._markers(instance)) + "\n"
