"""Disk steps: grow-root, sysprep, sparsify.

``grow-root`` grows the root partition and filesystem to the end of the (already
resized) disk; ``sysprep`` removes what makes an image one machine's (machine-id,
SSH host keys, logs, histories, leases, caches), like virt-sysprep; ``sparsify``
discards free space so the output leaves it out. Put them last, in that order.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Literal

from pydantic import Field

from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome

log = logging.getLogger("imagekit.customise")


class GrowRootStep(StepBase):
    """grow-root: grow the root filesystem to the end of the disk like cloud-utils' growpart:
    move the GPT backup header to the end (GPT), extend the root's partition (it must be the
    last one), then resize2fs (ext2/3/4, after e2fsck -f), xfs_growfs or btrfs resize. A root on
    LVM grows its PV and LV first."""

    op: Literal["grow-root"]

    @staticmethod
    def _root_partition(ctx: StepContext) -> tuple[str, str, str | None]:
        """(root filesystem device, its partition, its LV or None)."""
        g = ctx.g
        root_dev = dict(ctx.session.mounts).get("/")
        if root_dev is None:
            raise StepFailure("the guest's root filesystem is not mounted")
        if not g.is_lv(root_dev):
            return root_dev, root_dev, None
        vgname = g.lvm_canonical_lv_name(root_dev).split("/")[2]
        uuids = set(g.vgpvuuids(vgname))
        pvs = [p for p in g.pvs_full() if p["pv_uuid"] in uuids]
        if len(pvs) != 1:
            raise StepFailure(f"the root LV's volume group {vgname} has {len(pvs)} PVs: growing it is not supported")
        return root_dev, g.canonical_device_name(pvs[0]["pv_name"]), root_dev

    @staticmethod
    def _grow_fs(ctx: StepContext, root_dev: str, vfs: str) -> None:
        g = ctx.g
        if vfs == "xfs":
            g.xfs_growfs("/")
        elif vfs == "btrfs":
            g.btrfs_filesystem_resize("/")
        elif not vfs.startswith("ext"):
            raise StepFailure(f"the partition was grown but the {vfs} filesystem cannot be resized here")

    def linux(self, ctx: StepContext) -> StepOutcome:
        g = ctx.g
        root_dev, part, lv = self._root_partition(ctx)
        try:
            dev = g.part_to_dev(part)
            num = g.part_to_partnum(part)
        except RuntimeError as exc:
            raise StepFailure(f"the root filesystem is on {part}, which is not a partition: cannot grow it") from exc
        ptype = g.part_get_parttype(dev)
        if ptype == "msdos" and num > 4:
            raise StepFailure("the root filesystem is on a logical partition: growing it is not supported")
        last = max(g.part_list(dev), key=lambda p: p["part_end"])
        if last["part_num"] != num:
            raise StepFailure(f"{part} is not the last partition on {dev}: it cannot be grown in place")
        ss = g.blockdev_getss(dev)
        total = g.blockdev_getsize64(dev) // ss
        reserve = 34 if ptype == "gpt" else 0
        align = max(1, (1 << 20) // ss)
        new_end = ((total - reserve) // align) * align - 1
        if new_end - last["part_end"] // ss < align:
            return StepOutcome(f"{part} already fills {dev}: nothing to grow")
        vfs = g.vfs_type(root_dev)
        ctx.session.unmount_all()
        try:
            if ptype == "gpt":
                g.part_expand_gpt(dev)
            g.part_resize(dev, num, new_end)
            if lv is not None:
                g.pvresize(part)
                g.lvresize_free(lv, 100)
            if vfs.startswith("ext"):
                g.e2fsck(root_dev, correct=True)
                g.resize2fs(root_dev)
        finally:
            ctx.session.remount()
        self._grow_fs(ctx, root_dev, vfs)
        new_size = (new_end + 1) * ss - last["part_start"]
        return StepOutcome(f"grew {part} from {last['part_size'] >> 20} MiB to {new_size >> 20} MiB "
                           f"and resized its {vfs} filesystem")


SYSPREP_OPERATIONS = (
    "machine-id", "ssh-hostkeys", "logs", "bash-history", "cloud-init-state",
    "net-persistent-rules", "package-cache", "tmp-files", "dhcp-leases",
)

_SYSPREP_GLOBS: dict[str, tuple[str, ...]] = {
    "ssh-hostkeys": ("/etc/ssh/ssh_host_*",),
    "bash-history": ("/root/.bash_history", "/home/*/.bash_history"),
    "cloud-init-state": ("/var/lib/cloud/*", "/var/log/cloud-init.log", "/var/log/cloud-init-output.log",
                         "/run/cloud-init/*"),
    "net-persistent-rules": ("/etc/udev/rules.d/70-persistent-net.rules",
                             "/etc/udev/rules.d/75-persistent-net-generator.rules"),
    "package-cache": ("/var/cache/apt/archives/*.deb", "/var/cache/apt/archives/partial/*", "/var/cache/apt/*.bin",
                      "/var/cache/dnf/*", "/var/cache/yum/*", "/var/cache/zypp/packages/*", "/var/cache/apk/*"),
    "tmp-files": ("/tmp/*", "/tmp/.[!.]*", "/var/tmp/*", "/var/tmp/.[!.]*"),
    "dhcp-leases": ("/var/lib/dhcp/*", "/var/lib/dhclient/*", "/var/lib/dhcpcd/*", "/var/lib/NetworkManager/*.lease",
                    "/var/lib/NetworkManager/dhclient-*", "/var/lib/systemd/network/*.lease"),
}


def _sysprep_machine_id(ctx: StepContext) -> list[str]:
    s, g = ctx.session, ctx.g
    done = []
    if s.is_file("/etc/machine-id"):
        g.truncate("/etc/machine-id")
        done.append("/etc/machine-id")
    if s.is_file("/var/lib/dbus/machine-id") and not g.is_symlink("/var/lib/dbus/machine-id"):
        g.rm("/var/lib/dbus/machine-id")
        done.append("/var/lib/dbus/machine-id")
    return done


def _sysprep_logs(ctx: StepContext) -> list[str]:
    """Rotated logs and journals are deleted, live logs truncated (their owners and modes stay)."""
    g = ctx.g
    done: list[str] = []
    if not ctx.session.is_dir("/var/log"):
        return done
    for path in g.find("/var/log"):
        full = f"/var/log/{path}"
        if not g.is_file(full, followsymlinks=False):
            continue
        name = os.path.basename(full)
        if full.startswith("/var/log/journal/") or re.search(r"(\.\d+|\.gz|\.xz|\.bz2|\.old|-\d{8})$", name):
            g.rm(full)
            done.append(full)
        elif g.filesize(full) > 0:
            g.truncate(full)
            done.append(full)
    return done


def _sysprep_globs(ctx: StepContext, op: str) -> list[str]:
    g = ctx.g
    done = []
    for pattern in _SYSPREP_GLOBS[op]:
        for p in g.glob_expand(pattern):
            p = p.rstrip("/")
            if p.endswith("/.") or p.endswith("/.."):
                continue
            g.rm_rf(p)
            done.append(p)
    return done


class SysprepStep(StepBase):
    """sysprep: make the image generic, like virt-sysprep: machine-id (emptied, so systemd makes a new
    one), SSH host keys (regenerated at boot by cloud-init or sshd-keygen), logs, bash history,
    cloud-init state, persistent net rules, package cache, temporary files and DHCP leases."""

    op: Literal["sysprep"]
    operations: list[Literal[SYSPREP_OPERATIONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SYSPREP_OPERATIONS))

    def linux(self, ctx: StepContext) -> StepOutcome:
        report = []
        for op in self.operations:
            if op == "machine-id":
                touched = _sysprep_machine_id(ctx)
            elif op == "logs":
                touched = _sysprep_logs(ctx)
            else:
                touched = _sysprep_globs(ctx, op)
            report.append(f"{op}: {len(touched)}")
            if touched:
                log.debug("sysprep %s: %s", op, ", ".join(touched))
        return StepOutcome("sysprep " + ", ".join(report))


class SparsifyStep(StepBase):
    """sparsify: fstrim every mounted filesystem, so the free space is discarded in the overlay
    and left out when the image is converted to its output."""

    op: Literal["sparsify"]

    def linux(self, ctx: StepContext) -> StepOutcome:
        done = []
        for mp, _dev in ctx.session.mounts:
            try:
                ctx.g.fstrim(mp)
                done.append(mp)
            except RuntimeError as exc:
                log.info("fstrim %s: %s", mp, exc)
        return StepOutcome(f"trimmed free space on {', '.join(done) or 'no filesystem'}")


STEPS: tuple[type[StepBase], ...] = (GrowRootStep, SysprepStep, SparsifyStep)
