"""Benchmark: `imagekit convert` against qemu-img in the same run, at 1 and 8 GiB (BENCH_SIZES).

Input: a raw disk, half sparse, its data shaped like a system disk's (``bench/inputs.py``). For each size,
alternating REPEAT times, each after `sync` and dropping the page cache (root only):

* plain: bare `qemu-img convert -O qcow2` vs `imagekit convert` with its default verification (check of
  the input, imagekit's one-pass writer hashing as it writes, deep check of the written metadata,
  `qemu-img check` and `qemu-img map` against the plan). Target: <= 1.10x.
* compressed: `qemu-img convert -c` vs `imagekit convert --compress zlib` (parallel compression
  workers). Targets: time <= 0.6x, output size <= 1.02x.

Medians are compared. The `seconds` of imagekit's JSON report show where its time goes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import GiB, compile_imagekit, disk_like, imagekit_cmd, sizes, timed  # noqa: E402

REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def report(label: str, ref: list[float], ours: list[float], target: float) -> float:
    r, o = statistics.median(ref), statistics.median(ours)
    ok = "ok" if o / r <= target else "MISSED"
    print(f"  {label}: reference median {r:.2f} s {[round(x, 2) for x in ref]}, imagekit median {o:.2f} s "
          f"{[round(x, 2) for x in ours]}  RATIO {o / r:.2f}x (target <= {target:.2f}x) {ok}")
    return o / r


def where_time_goes(src: Path, out: Path, extra: list[str]) -> None:
    res = subprocess.run([*imagekit_cmd(), "--json", "convert", str(src), "-o", str(out), "--force", *extra],
                         capture_output=True, text=True, check=True)
    print(f"    imagekit {' '.join(extra) or 'plain'} seconds: {json.loads(res.stdout)['seconds']}")


def bench_size(base: Path, gib: int) -> None:
    src = disk_like(base / f"disk-{gib}g.raw", gib)
    print(f"convert: {gib} GiB half-sparse raw -> qcow2 ({gib / 2:g} GiB of data), {REPEAT} cold runs each")
    plain_ref, plain_ik, comp_ref, comp_ik = [], [], [], []
    size_ref = size_ik = 0
    for i in range(REPEAT):
        for p in base.glob("out-*"):
            p.unlink()
        o = {k: str(base / f"out-{k}-{i}.qcow2") for k in ("q", "i", "qc", "ic")}
        plain_ref.append(timed([["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", str(src),
                                 o["q"]]]))
        plain_ik.append(timed([[*imagekit_cmd(), "convert", str(src), "-o", o["i"]]]))
        comp_ref.append(timed([["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                                str(src), o["qc"]]]))
        comp_ik.append(timed([[*imagekit_cmd(), "convert", str(src), "-o", o["ic"], "--compress", "zlib"]]))
        size_ref, size_ik = Path(o["qc"]).stat().st_size, Path(o["ic"]).stat().st_size
    report("plain      qemu-img convert    vs imagekit convert", plain_ref, plain_ik, 1.10)
    report("compressed qemu-img convert -c vs imagekit convert --compress zlib", comp_ref, comp_ik, 0.60)
    ok = "ok" if size_ik <= 1.02 * size_ref else "MISSED"
    print(f"  compressed size: qemu-img {size_ref / 2**20:.1f} MiB, imagekit {size_ik / 2**20:.1f} MiB  "
          f"RATIO {size_ik / size_ref:.3f} (target <= 1.02) {ok}")
    where_time_goes(src, base / "out-why.qcow2", [])
    where_time_goes(src, base / "out-why.qcow2", ["--compress", "zlib"])
    for p in base.glob("out-*"):
        p.unlink()


def main() -> int:
    base = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="imagekit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    compile_imagekit()
    for gib in sizes():
        bench_size(base, gib)
    if not os.environ.get("BENCH_DIR"):
        for p in base.iterdir():
            p.unlink()
        base.rmdir()
    return 0


if __name__ == "__main__":
    assert GiB
    sys.exit(main())
