"""diskimage-builder without device-mapper: the partition stand-ins on real loop
devices, and a real DIB build that fails with its image mounted, leaving no
mounts, loop devices or output behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from imagekit import partloop
from imagekit import recipe as rec
from imagekit.builders import dib
from tests.dib_fixture import ELEMENTS, tiny_dib_recipe
from tests.guest_image import build_lock

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")


def loops() -> set[tuple[str, str]]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True, check=True).stdout
    return {(d["name"], d.get("back-file") or "") for d in (json.loads(out)["loopdevices"] if out.strip() else [])}


def mounts() -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}


@needs_root
def test_partloop_maps_partitions_at_their_offsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,24M\n,\n", text=True, check=True)
    monkeypatch.setenv(partloop.STATE_ENV, str(tmp_path / "state"))
    mapper = tmp_path / "mapper"
    monkeypatch.setattr(partloop, "MAPPER", mapper)
    dev = subprocess.run(["losetup", "--show", "-f", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        assert partloop.main(["kpartx", "-uvs", dev]) == 0
        base = Path(dev).name
        p1, p2 = mapper / f"{base}p1", mapper / f"{base}p2"
        assert p1.is_symlink() and p2.is_symlink()
        by_name = {name: back for name, back in loops()}
        assert by_name[os.readlink(p1)] == str(img)  # backed by the image file, not by the loop device
        parts = partloop.partitions(dev)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(p2)], check=True, capture_output=True)
        subprocess.run(["sync"], check=True)
        off = parts[1][1]
        with open(img, "rb") as f:
            f.seek(off + 1024 + 56)
            assert struct.unpack("<H", f.read(2))[0] == 0xEF53  # ext4 superblock where partition 2 starts
        subprocess.run(["fstrim", "-n", "-v", str(p2)], capture_output=True)  # must not error on a plain loop
        assert partloop.main(["dmsetup", "remove", f"{base}p1"]) == 0
        assert not p1.exists()
        assert partloop.main(["kpartx", "-d", dev]) == 0
        assert not p2.exists()
        assert not any(back == str(img) for name, back in loops() if name != dev)
    finally:
        partloop.remove_all(str(tmp_path))
        subprocess.run(["losetup", "-d", dev], check=False)


@needs_root
@pytest.mark.slow
def test_failed_dib_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real DIB build (tests/dib_fixture.py: the test root, not a distribution) that fails in finalise.d,
    with the image's partition mounted from a partloop loop device and /proc, /dev, /sys mounted in it."""
    monkeypatch.setenv("IMAGEKIT_ELEMENTS_PATH", str(ELEMENTS))
    r = rec.load(tiny_dib_recipe(tmp_path / "failing.yaml", "failing", ["imagekit-test-fail"]))
    out = tmp_path / "out.raw"
    work = tmp_path / "work"
    with build_lock():
        before_loops, before_mounts = loops(), mounts()
        with pytest.raises(dib.DibError) as info:
            dib.build(r, out, workdir=work)
        after_loops, after_mounts = loops(), mounts()
    log = (tmp_path / "out.dib.log").read_text()
    assert "Calling [sudo mount /dev/mapper/loop" in log, "the build did not get as far as mounting its image"
    assert "diskimage-builder failed" in info.value.message
    assert "imagekit-test-fail: failing on purpose" in info.value.message
    assert info.value.hint and "log" in info.value.hint
    assert after_loops == before_loops, "loop devices left behind"
    assert after_mounts == before_mounts, "mounts left behind"
    assert not out.exists() and not any(p.name.endswith(".part") for p in tmp_path.iterdir())
    assert not any(work.iterdir())  # the build's temporary directory is gone
