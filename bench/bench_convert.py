"""Benchmark: `imagekit convert` (check + convert + verify + hash) against bare
`qemu-img convert` on the same 2 GiB half-sparse raw input, measured in one run.

Prints the wall-time ratio (target: within 1.10x of bare qemu-img). Runs each
side REPEAT times alternately, each from a cold page cache (sync + drop_caches
when root), and compares medians.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def make_input(path: Path) -> None:
    """2 GiB raw: the first GiB written with non-zero data in 1 MiB runs, the second a hole."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(1024):
            f.write(block)
        f.truncate(2 * GiB)


def drop_caches() -> None:
    """Start each run with a cold page cache (as a freshly downloaded input would be); needs root."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(argv: list[str]) -> float:
    drop_caches()
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    base = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="imagekit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    src = base / "half-sparse.raw"
    if not src.exists() or src.stat().st_size != 2 * GiB:
        make_input(src)
    imagekit = [sys.executable, "-m", "imagekit"]
    bare, ours = [], []
    for i in range(REPEAT):
        for p in base.glob("out-*"):
            p.unlink()
        bare.append(timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                           str(src), str(base / f"out-bare-{i}.qcow2")]))
        ours.append(timed([*imagekit, "convert", str(src), "-o", str(base / f"out-imagekit-{i}.qcow2")]))
    b, o = statistics.median(bare), statistics.median(ours)
    print("convert: 2 GiB half-sparse raw -> qcow2")
    print(f"  bare qemu-img convert   median {b:.2f} s  runs {[round(x, 2) for x in bare]}")
    print(f"  imagekit convert        median {o:.2f} s  runs {[round(x, 2) for x in ours]}"
          "  (check + convert + qemu-img check + compare + sha256)")
    print(f"  ratio imagekit/qemu-img {o / b:.2f}x  (target <= 1.10x)")
    for p in base.glob("out-*"):
        p.unlink()
    if not os.environ.get("BENCH_DIR"):
        src.unlink()
        base.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
