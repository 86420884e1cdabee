"""Snapshot workflows: customise a running guest, capture its disk, publish it.

Two workflows share this package:

- **local** (``build.method: snapshot``, ``imagekit.builders.snapshot``): boot the base
  image under QEMU on a copy-on-write overlay with a NoCloud seed, follow the serial
  console, generalise inside the guest, shut it down cleanly, flatten the overlay
  (``local.py``, ``monitor.py`` for QMP and the guest agent);
- **cloud** (``imagekit snapshot --cloud C``): a server in an OpenStack cloud, through
  openstacksdk's compute API and imagekit's Glance code (``cloud.py``, ``cloud_wait.py``).

Both give the guest the same user-data (``userdata.py``): the recipe's or the user's
parts plus imagekit's *reporter*, a boot hook that waits for cloud-init, reports its
outcome on the serial console and then generalises the guest (``cloud-init clean``,
machine-id, SSH host keys, logs). ``console.py`` reads those reports back from a QEMU
serial log or a Nova console log. ``properties.py`` removes what a Nova snapshot
inherits and should not keep.
"""
