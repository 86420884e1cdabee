"""Benchmark: `imagekit convert` (check + convert + verify + hash) against bare
`qemu-img convert` on the same 2 GiB half-sparse raw input, measured in one run.

Prints the wall-time ratio (target: within 1.10x of bare qemu-img), and, to show
where the time goes, the same job done by hand with the reference tools:
`qemu-img convert`, then `qemu-img compare` and `openssl dgst -sha256` of the
output (what imagekit's report states besides its own checks; coreutils'
sha256sum is 6x slower here, OpenSSL uses the CPU's SHA extensions as Python's
hashlib does). Each command runs REPEAT
times, alternating, after `sync` and dropping the page cache (root only): on
these VMs page-cache pages the guest has never touched are slow to fault in,
which makes "warm" runs depend on what ran before rather than on the tool.
Medians are compared. imagekit's modules are
byte-compiled first, as an installed package's are.
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


def timed(argvs: list[list[str]], cold: bool) -> float:
    """Wall time of the commands run one after the other (after sync, and dropping caches when cold)."""
    if cold:
        drop_caches()
    else:
        subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def imagekit_cmd() -> list[str]:
    script = Path(sys.executable).parent / "imagekit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagekit"]


def main() -> int:
    base = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="imagekit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    src = base / "half-sparse.raw"
    if not src.exists() or src.stat().st_size != 2 * GiB:
        make_input(src)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "imagekit")],
                   check=True)
    print("convert: 2 GiB half-sparse raw -> qcow2 (1 GiB of data)")
    for cold in (True,):
        bare, manual, ours = [], [], []
        for i in range(REPEAT):
            for p in base.glob("out-*"):
                p.unlink()
            out_b, out_m, out_i = (str(base / f"out-{k}-{i}.qcow2") for k in ("bare", "manual", "imagekit"))
            bare.append(timed([["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                                str(src), out_b]], cold))
            manual.append(timed([["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                                  str(src), out_m],
                                 ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), out_m],
                                 ["openssl", "dgst", "-sha256", out_m]], cold))
            ours.append(timed([[*imagekit_cmd(), "convert", str(src), "-o", out_i]], cold))
        b, m, o = statistics.median(bare), statistics.median(manual), statistics.median(ours)
        label = "cold page cache" if cold else "warm page cache"
        print(f" {label}:")
        print(f"  bare qemu-img convert            median {b:.2f} s  runs {[round(x, 2) for x in bare]}")
        print(f"  convert + compare + openssl sha256 median {m:.2f} s  runs {[round(x, 2) for x in manual]}")
        print(f"  imagekit convert                 median {o:.2f} s  runs {[round(x, 2) for x in ours]}"
              "  (check + convert + imagekit check + qemu-img check + compare + sha256)")
        print(f"  RATIO imagekit/bare qemu-img convert: {o / b:.2f}x (target <= 1.10x); "
              f"imagekit/(convert+compare+sha256 by hand): {o / m:.2f}x")
    for p in base.glob("out-*"):
        p.unlink()
    if not os.environ.get("BENCH_DIR"):
        src.unlink()
        base.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
