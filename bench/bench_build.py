"""Benchmark: `imagekit build debian-12` cold vs cached rebuild, and imagekit's cold
build against bare `disk-image-create` with the same elements, in one run.

Targets: cached rebuild <= 5% of the cold build; cold build <= 1.10x bare DIB; imagekit's output
(zlib-compressed qcow2 by default) no larger than bare DIB's default qcow2 (``qemu-img convert -c``).
Bare DIB cannot map partitions on a kernel without device-mapper, so on such a
host it gets imagekit's partition stand-ins on PATH (the minimum it needs to run
at all); both use the same debootstrap cache, warmed by a first build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagekit import host, recipe, workdir  # noqa: E402
from imagekit.builders import dib  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="imagekit-bench-build-"))
    env = dict(os.environ, IMAGEKIT_CACHE_DIR=str(work / "cache"))
    ik = [sys.executable, "-m", "imagekit", "build", "debian-12", "--output-dir", str(work / "out")]
    cold = timed(ik, env)
    cached = timed(ik, env)
    r = recipe.load("debian-12")
    spec = r.build
    assert isinstance(spec, dib.DibBuild)
    denv = dict(os.environ, **spec.env, ELEMENTS_PATH=str(ROOT / "elements"), TMP_DIR=str(work / "dibtmp"),
                IMAGEKIT_RECIPE="debian-12")
    (work / "dibtmp").mkdir()
    path = [str(Path(sys.executable).parent)]
    if not host.has_device_mapper():
        path.insert(0, str(dib._shim_dir(work / "dibtmp")))
        denv["IMAGEKIT_PARTLOOP_STATE"] = str(work / "dibtmp" / "partloop")
    denv["PATH"] = os.pathsep.join(path + [os.environ["PATH"]])
    argv = [dib.disk_image_create(), "-a", "amd64", "-t", "qcow2", "-o", str(work / "bare"), "--image-size",
            str(r.disk_bytes >> 30), "-p", ",".join(spec.packages), *spec.elements]
    try:
        bare = timed(argv, denv)
    finally:
        workdir.clean_folder(work / "dibtmp")  # mounts and loop devices the bare build may have left
    print("build: debian-12 (diskimage-builder, TCG for libguestfs)")
    print(f"  imagekit cold build      {cold:7.1f} s  (build + customise + inventory + convert + check)")
    print(f"  imagekit cached rebuild  {cached:7.1f} s  = {100 * cached / cold:.1f}% of cold (target <= 5%)")
    print(f"  bare disk-image-create   {bare:7.1f} s  (same elements, qcow2 output)")
    print(f"  ratio imagekit/bare DIB  {cold / bare:.2f}x  (target <= 1.10x)")
    ours = (work / "out" / "debian-12.qcow2").stat().st_size
    theirs = next((work).glob("bare*.qcow2")).stat().st_size
    print(f"  output size: imagekit {ours / 2**20:.1f} MiB, bare DIB {theirs / 2**20:.1f} MiB  RATIO "
          f"{ours / theirs:.3f} (target <= 1.00) {'ok' if ours <= theirs else 'MISSED'}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
