"""The errors of both snapshot workflows (each with its stable ``code``)."""

from __future__ import annotations

from imagekit.builders.base import BuildError


class SnapshotError(BuildError):
    """A snapshot could not be made (the guest, the cloud or the capture failed)."""

    code = "snapshot-failed"


class ProvisionFailed(SnapshotError):
    """cloud-init reported errors, or generalising the guest failed."""

    code = "snapshot-provision-failed"


class ProvisionTimeout(SnapshotError):
    """The guest did not start, finish provisioning or generalise in time."""

    code = "snapshot-timeout"


class ShutdownFailed(SnapshotError):
    """The guest did not shut down cleanly (its disk would only be crash-consistent)."""

    code = "snapshot-shutdown-failed"


class ServerFailed(SnapshotError):
    """A server went to ERROR, vanished, or is in a state a snapshot cannot start from."""

    code = "snapshot-server-failed"


class VolumeBacked(SnapshotError):
    """The server boots from a volume: its snapshot would be a 0-byte image pointing at a Cinder snapshot."""

    code = "snapshot-volume-backed"


class ImageFailed(SnapshotError):
    """The snapshot image vanished (Nova deletes it when the upload fails) or went to a failed state."""

    code = "snapshot-image-failed"
