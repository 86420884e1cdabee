"""The cloud snapshot workflow with Nova's libvirt driver under QEMU TCG: NOT run here, and why.

Measured on this machine kind (Debian 12, no systemd, 2 shared cores): libvirt 9.0's
``libvirtd`` does not start from Debian's ``libvirt-daemon`` packages alone. Its QEMU driver
looks up the ``libvirt-qemu`` user before it reads ``qemu.conf`` (only
``libvirt-daemon-system``'s maintainer scripts create it), it needs ``/etc/libvirt/qemu.conf``
changed for root without cgroups or virtlogd, and it finds no D-Bus, no ``dmidecode`` access
to ``/dev/mem`` and no ``dnsmasq``. With those system changes made, the test itself would boot
the 1 GiB Debian image twice under TCG (the customised server and the verification boot,
about 1-2 minutes each here) and upload a full-size snapshot through Glance: several times the
snapshot tests' whole time budget. So the libvirt path (config drive user-data, ACPI stop,
the libvirt driver's cold snapshot) is left to a machine with KVM and a system libvirtd; the
same flow runs here against Nova with its fake driver (``tests/test_snapshot_cloud.py``).
"""

from __future__ import annotations

import pytest

REASON = ("Nova's libvirt driver is not tested here: libvirtd 9.0 needs system changes on this machine kind "
          "(the libvirt-qemu user, /etc/libvirt/qemu.conf for root without cgroups; no D-Bus, /dev/mem or dnsmasq) "
          "and two TCG boots of the 1 GiB Debian image exceed the snapshot tests' time budget")


@pytest.mark.skip(reason=REASON)
def test_cloud_snapshot_with_the_libvirt_driver() -> None:
    """Placeholder for the libvirt run (see the module documentation)."""
