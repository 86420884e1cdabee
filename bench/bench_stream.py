"""Benchmark: convert-and-upload in one pass against convert followed by upload, same run, 1 and 8 GiB.

Starts a local Glance (``imagekit.glance_server``, its own temporary directory), then alternates
REPEAT times, each after `sync` and dropping the page cache (root only):

* reference: `imagekit convert IN -o OUT.qcow2` then `imagekit upload OUT.qcow2` (the upload checks the
  file, reads it again and hashes it while sending);
* imagekit: `imagekit upload IN --convert` (the qcow2 goes to Glance as it is written, hashed as sent,
  no local copy).

Both verify Glance's size and hash. Each image is deleted after its round. Target: <= 0.6x.
Usage: BENCH_SIZES=1,8 BENCH_REPEAT=2 python bench/bench_stream.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inputs import compile_imagekit, disk_like, imagekit_cmd, sizes, timed  # noqa: E402

from imagekit import glance, glance_server  # noqa: E402
from imagekit.cloud import connect  # noqa: E402

REPEAT = int(os.environ.get("BENCH_REPEAT", "2"))


def main() -> int:
    base = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="imagekit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="imagekit-bench-glance-"))
    compile_imagekit()
    info = glance_server.serve(home=home / "server", clouds_yaml=home / "clouds.yaml", timeout=120)
    env = dict(os.environ, OS_CLIENT_CONFIG_FILE=str(home / "clouds.yaml"))
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(home / "clouds.yaml")
    cloud = glance_server.CLOUD_NAME
    try:
        c = connect(cloud)
        for gib in sizes():
            src = disk_like(base / f"disk-{gib}g.raw", gib)
            ref, ours = [], []
            for i in range(REPEAT):
                out = base / f"out-ref-{i}.qcow2"
                ref.append(timed([[*imagekit_cmd(), "convert", str(src), "-o", str(out), "--force"],
                                  [*imagekit_cmd(), "upload", str(out), "--cloud", cloud, "--name", f"ref-{gib}-{i}",
                                   "--force-upload"]], env=env))
                out.unlink()
                ours.append(timed([[*imagekit_cmd(), "upload", str(src), "--convert", "--cloud", cloud, "--name",
                                    f"stream-{gib}-{i}"]], env=env))
                for img in glance.list_images(c):
                    c.glance.images.delete(img["id"])
            r, o = statistics.median(ref), statistics.median(ours)
            print(f"stream: {gib} GiB half-sparse raw ({gib / 2:g} GiB of data) to Glance {info.endpoint}")
            print(f"  convert, then upload  median {r:.2f} s {[round(x, 2) for x in ref]}")
            print(f"  upload --convert      median {o:.2f} s {[round(x, 2) for x in ours]}")
            print(f"  RATIO {o / r:.2f}x (target <= 0.60x) {'ok' if o / r <= 0.6 else 'MISSED'}")
    finally:
        glance_server.stop(home / "server")
        shutil.rmtree(home, ignore_errors=True)
        if not os.environ.get("BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
