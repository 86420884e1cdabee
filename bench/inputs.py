"""Inputs and timing helpers shared by the convert and streaming benchmarks (not a benchmark itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30
MiB = 1 << 20


def disk_like(path: Path, gib: int) -> Path:
    """A raw disk of ``gib`` GiB, half sparse: every other MiB holds data shaped like a system disk's
    (a quarter random as compressed files are, the rest text-like and compressible), the rest holes."""
    if path.exists() and path.stat().st_size == gib * GiB:
        return path
    rng = np.random.default_rng(16)
    words = [bytes(rng.integers(97, 123, int(n), dtype=np.uint8)) for n in rng.integers(2, 12, 512)]
    blocks = []
    for _ in range(16):
        text = b" ".join(words[int(i)] for i in rng.integers(0, len(words), 150_000))[:3 * MiB // 4]
        blocks.append(rng.integers(0, 256, MiB // 4, dtype=np.uint8).tobytes() + text.ljust(3 * MiB // 4, b"\n"))
    with open(path, "wb") as f:
        f.truncate(gib * GiB)
        for i in range(0, gib * 1024, 2):
            f.seek(i * MiB)
            f.write(blocks[(i // 2) % len(blocks)])
    return path


def drop_caches() -> None:
    """A cold page cache for each run (as a freshly downloaded input would be); needs root."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(argvs: list[list[str]], cold: bool = True, env: dict[str, str] | None = None) -> float:
    """Wall time of the commands run one after the other (after sync, and dropping caches when cold)."""
    if cold:
        drop_caches()
    else:
        subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def imagekit_cmd() -> list[str]:
    script = Path(sys.executable).parent / "imagekit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagekit"]


def compile_imagekit() -> None:
    """Byte-compile imagekit first, as an installed package is."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "imagekit")],
                   check=True)


def sizes() -> list[int]:
    return [int(x) for x in os.environ.get("BENCH_SIZES", "1,8").split(",") if x]
