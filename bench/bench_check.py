"""Benchmark ``imagekit check`` (the deep qcow2 verifier) against ``qemu-img check``.

Builds (under $BENCH_DIR, else a temporary directory) metadata-heavy qcow2
images: 4 KiB clusters with 2, 4 and 8 GiB of non-zero data written by qemu-io
(2 GiB: ~524k data clusters, ~1k L2 tables, ~256 refcount blocks; 8 GiB: four
times that, and three passes of imagekit's windowed walk). Then times, in the
same run and on the same warm page cache, alternating, ``qemu-img check -f
qcow2 IMG`` and the command a user types, ``imagekit check --format qcow2 IMG``
(the venv's console script: Python start-up, imports, format detection, deep
check, report). Each runs in its own process started by a small wrapper whose
only child it is, so ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that tool's
peak RSS. The library call alone (``qcow2.verify``, in-process time) is shown
too. imagekit's modules are byte-compiled first, as an installed package's are.

Usage: python bench/bench_check.py [--gib 2,4,8] [--rounds 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall": wall, "rss_kib": rss_kib, "rc": p.returncode, "out": p.stdout[-200000:],
                  "err": p.stderr[-2000:]}))
"""

VERIFY = r"""
import json, sys
from imagekit.formats import qcow2
r = qcow2.verify(sys.argv[1], time_limit=600)
print(json.dumps({"verdict": r.verdict, "codes": r.codes(), "stats": r.stats}))
"""


def measure(cmd: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True, env=env)
    return dict(json.loads(p.stdout))


def build(path: Path, gib: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path),
                    f"{gib * 2}G"], check=True)
    cmds: list[str] = []
    chunk = 256  # MiB per qemu-io write request
    for i in range(gib * 1024 // chunk):
        # every other 256 MiB region of a 2x larger disk, non-zero pattern
        cmds += ["-c", f"write -q -P {0x11 + i % 200} {2 * i * chunk}M {chunk}M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)


def imagekit_cmd() -> list[str]:
    script = Path(sys.executable).parent / "imagekit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagekit"]


def bench_one(img: Path, rounds: int) -> tuple[float, float]:
    qemu, ours, lib = [], [], []
    for _ in range(rounds):
        qemu.append(measure(["qemu-img", "check", "-f", "qcow2", str(img)]))
        ours.append(measure([*imagekit_cmd(), "check", "--format", "qcow2", "--json", str(img)]))
    lib.append(measure([sys.executable, "-c", VERIFY, str(img)]))
    qrc = {r["rc"] for r in qemu}
    orc = {r["rc"] for r in ours}
    verdict = json.loads(str(ours[-1]["out"]))
    res = json.loads(str(lib[-1]["out"]))
    qwall = statistics.median(float(str(r["wall"])) for r in qemu)
    owall = statistics.median(float(str(r["wall"])) for r in ours)
    orss = max(int(str(r["rss_kib"])) for r in ours) / 1024
    qrss = max(int(str(r["rss_kib"])) for r in qemu) / 1024
    st = res["stats"]
    print(f"image {img.name}: file {st['file_size'] / 2**30:.2f} GiB, {st['data_clusters']} data clusters, "
          f"{st['l2_tables']} L2 tables, {st['metadata_clusters']} metadata clusters, {st['passes']} pass(es)")
    print(f"  qemu-img check          : rc {sorted(qrc)}, median wall {qwall:.3f} s, peak RSS {qrss:.1f} MiB")
    print(f"  imagekit check --json   : rc {sorted(orc)}, verdict {verdict['verdict']}, median wall {owall:.3f} s, "
          f"peak RSS {orss:.1f} MiB")
    print(f"  (qcow2.verify in-process: {st['elapsed_ms']} ms, verdict {res['verdict']} {res['codes']})")
    print(f"  RATIO imagekit/qemu-img wall time: {owall / qwall:.2f}x (target <= 2x)   "
          f"PEAK imagekit RSS: {orss:.1f} MiB (target < 64 MiB)")
    return owall / qwall, orss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", default="2,4,8", help="GiB of data to allocate, comma-separated (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the images")
    a = ap.parse_args()
    base = os.environ.get("BENCH_DIR")
    d = Path(base) if base else Path(tempfile.mkdtemp(prefix="imagekit-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "imagekit")], check=True)
    try:
        for gib in (int(x) for x in a.gib.split(",")):
            img = d / f"bench-4k-{gib}g.qcow2"
            if not img.exists():
                t = time.perf_counter()
                build(img, gib)
                print(f"built {img} ({img.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
            bench_one(img, a.rounds)
            if not a.keep and not base:
                img.unlink()
    finally:
        if not a.keep and not base:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
