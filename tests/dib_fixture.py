"""Real diskimage-builder builds that reach the block-device stage in seconds.

The tests that signal, kill or fail a diskimage-builder build need DIB's real
block-device stage (a loop device on the image file, partitions through
imagekit's partloop, mkfs, mounts, a chroot), not a real distribution. The
test-only elements in ``tests/elements`` stand in for the distribution:

- ``imagekit-test-root`` (root.d): the root is the host's own bash, a few
  coreutils, find, grep, awk, sed and sleep with their libraries (about 10 MB)
  instead of a debootstrap and package installs; enough for DIB's in-chroot
  hooks. It provides ``operating-system``;
- ``imagekit-test-hold`` (finalise.d): holds the build inside the chroot with the
  image mounted until the test signals or kills it (and fails it after
  ``IMAGEKIT_TEST_HOLD_SECONDS``), so the signal lands at a known point;
- ``imagekit-test-fail`` (finalise.d): fails with the image mounted.

``tiny_dib_recipe()`` writes a recipe using them, without DIB's ``base`` element
(``SKIP_BASE=1``: it installs packages), with ``block-device-mbr``. Such a build
reaches finalise.d in about 6 s on an idle machine (a debian-minimal build
needs minutes to get there). Nothing is downloaded, so DIB's image cache plays
no part. Set ``IMAGEKIT_ELEMENTS_PATH`` to :data:`ELEMENTS` (the variable the
builder reads) for the build to find them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import ROOT

ELEMENTS = ROOT / "tests" / "elements"
BASE_ELEMENTS = ["block-device-mbr", "imagekit-test-root"]


def tiny_dib_recipe(path: Path, name: str, elements: list[str], env: dict[str, str] | None = None) -> Path:
    """Write a dib recipe built from the test root plus ``elements`` (e.g. ``imagekit-test-hold``)."""
    recipe = {
        "name": name,
        "description": f"test-only diskimage-builder build ({', '.join(elements) or 'tiny root'})",
        "os": {"type": "linux", "distro": "debian", "version": "12", "arch": "x86_64"},
        "disk_size": "1G",
        "build": {"method": "dib", "elements": BASE_ELEMENTS + elements, "env": {"SKIP_BASE": "1", **(env or {})}},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path
