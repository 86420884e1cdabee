"""Benchmark imagekit's qcow2 deep verifier against ``qemu-img check``.

Builds (under $BENCH_DIR, else a temporary directory) a metadata-heavy qcow2:
4 KiB clusters, ~2 GiB of non-zero data written by qemu-io (so ~524k data
clusters, ~1k L2 tables, ~256 refcount blocks), then times, in the same run
and on the same warm page cache, ``qemu-img check -f qcow2`` and
``imagekit.formats.qcow2.verify`` (each in its own process, started by a small
wrapper process whose only child it is, so that
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that tool's peak RSS).

Usage: python bench/bench_check.py [--gib 2] [--rounds 3] [--keep]
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
print(json.dumps({"wall": wall, "rss_kib": rss_kib, "rc": p.returncode, "out": p.stdout[-2000:],
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=2, help="GiB of data to allocate (default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the image")
    a = ap.parse_args()
    base = os.environ.get("BENCH_DIR")
    d = Path(base) if base else Path(tempfile.mkdtemp(prefix="imagekit-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    img = d / f"bench-4k-{a.gib}g.qcow2"
    try:
        if not img.exists():
            t = time.perf_counter()
            build(img, a.gib)
            print(f"built {img} ({img.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
        qemu, ours = [], []
        for _ in range(a.rounds):
            qemu.append(measure(["qemu-img", "check", "-f", "qcow2", str(img)]))
            ours.append(measure([sys.executable, "-c", VERIFY, str(img)]))
        qrc = {r["rc"] for r in qemu}
        res = json.loads(str(ours[-1]["out"]))
        qwall = statistics.median(float(str(r["wall"])) for r in qemu)
        owall = statistics.median(float(str(r["wall"])) for r in ours)
        orss = max(int(str(r["rss_kib"])) for r in ours) / 1024
        qrss = max(int(str(r["rss_kib"])) for r in qemu) / 1024
        print(f"qemu-img check: rc {sorted(qrc)}, median wall {qwall:.3f} s, peak RSS {qrss:.1f} MiB")
        print(f"imagekit verify: verdict {res['verdict']} {res['codes']}, median wall {owall:.3f} s "
              f"(in-process {res['stats']['elapsed_ms']} ms), peak RSS {orss:.1f} MiB")
        st = res["stats"]
        print(f"image: {st['data_clusters']} data clusters, {st['l2_tables']} L2 tables, "
              f"{st['metadata_clusters']} metadata clusters, file {st['file_size'] / 2**30:.2f} GiB")
        print(f"RATIO imagekit/qemu-img wall time: {owall / qwall:.2f}x   PEAK imagekit RSS: {orss:.1f} MiB")
    finally:
        if not a.keep and not base:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
