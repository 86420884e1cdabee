"""Benchmark ``imagekit ci``: a two-image pipeline cold vs warm, and the shared cache's pull vs ``cp``.

1. Pipeline: two units (the tiny bootable image of the tests, two output settings) built by
   ``imagekit ci run`` against a real ``registry`` on 127.0.0.1:
   *cold* (empty registry, empty HOME), *warm, shared* (a new HOME: every stage pulled from the
   registry, the situation of a fresh CI runner) and *warm, local* (the same HOME again: this
   machine's cache). Prints the seconds and the ratios warm / cold.
2. Shared cache: an entry of ``--mib`` MiB (incompressible data) published to the registry, then
   pulled into an empty local cache by ``SharedCache`` (download, digest check, rename into
   place), against ``cp`` of the same bytes on this disk, in the same run; and the same through
   the directory store. Prints MiB/s and the ratios pull / cp (median of ``--rounds``).

Usage: python bench/bench_ci.py [--mib 512] [--rounds 3] [--skip-pipeline]
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
sys.path.insert(0, str(ROOT))

from imagekit import cache  # noqa: E402
from imagekit.cache_remote import DirectoryStore, SharedCache, index_of  # noqa: E402
from imagekit.ci.cache_oci import OciStore  # noqa: E402
from tests.ci_fixture import Project, Registry, free_port, sha256_of  # noqa: E402
from tests.http_fixture import FileServer  # noqa: E402

MiB = 1 << 20


def pipeline_bench(tmp: Path, reg: Registry) -> None:
    from tests import tiny_boot_image

    why = tiny_boot_image.missing()
    if why:
        print(f"pipeline: skipped ({why})")
        return
    www = tmp / "www"
    www.mkdir()
    shutil.copyfile(tiny_boot_image.tiny_boot_image(), www / "boot.qcow2")
    srv = FileServer(www).start()
    try:
        project = Project(tmp / "project", {"IMAGEKIT_ACCEL": os.environ.get("IMAGEKIT_ACCEL", "tcg"),
                                            "PYTHONPATH": str(ROOT)})
        sha = sha256_of(www / "boot.qcow2")
        project.write_recipe("bench-a", srv.url("boot.qcow2"), sha)
        project.write_recipe("bench-b", srv.url("boot.qcow2"), sha, output="{compat: '0.10', cluster_size: 64K}")
        project.write_pipeline({"name": "bench", "images": [{"recipe": "recipes/bench-a.yaml"},
                                                            {"recipe": "recipes/bench-b.yaml"}],
                                "cache": {"oci": {"url": f"{reg.host}/bench/pipeline", "insecure": True}}})

        def both(home: str) -> tuple[float, list[str]]:
            t = time.monotonic()
            sources = []
            for unit in ("bench-a", "bench-b"):
                res = project.ci("run", unit, home=home)
                if res.code != 0:
                    raise SystemExit(f"ci run {unit} failed:\n{res.err[-3000:]}")
                sources += [s["source"] for s in res.json()["stages"]]
            return time.monotonic() - t, sources

        cold, s_cold = both("cold")
        shared, s_shared = both("fresh-runner")
        local, s_local = both("cold")
        print(f"pipeline (2 units, ci run): cold {cold:.1f} s ({', '.join(sorted(set(s_cold)))}); "
              f"warm from the registry {shared:.1f} s ({', '.join(sorted(set(s_shared)))}); "
              f"warm local {local:.1f} s ({', '.join(sorted(set(s_local)))})")
        print(f"  warm/cold: shared {shared / cold:.2f}, local {local / cold:.2f}")
    finally:
        srv.stop()


def make_entry(folder: Path, mib: int) -> Path:
    entry = folder / "entry"
    entry.mkdir()
    block = os.urandom(4 * MiB)
    with (entry / "artifact").open("wb") as fh:
        for i in range(mib // 4):
            fh.write(block[i % 4096:] + block[: i % 4096])
    meta = cache.EntryMeta("base", "b" * 64, "bench", {}, {}, "now")
    (entry / "meta.json").write_bytes(cache._META.dump_json(meta))
    return entry


def timed_pull(sc: SharedCache, local: Path) -> float:
    os.environ["IMAGEKIT_CACHE_DIR"] = str(local)
    shutil.rmtree(local, ignore_errors=True)
    t = time.monotonic()
    with sc.slot("base", "b" * 64, dict) as slot:
        assert slot.found is not None, sc.warnings
    return time.monotonic() - t


def timed_cp(entry: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t = time.monotonic()
    subprocess.run(["cp", "-r", str(entry), str(dest)], check=True)
    return time.monotonic() - t


def cache_bench(tmp: Path, reg: Registry, mib: int, rounds: int) -> None:
    entry = make_entry(tmp, mib)
    idx = index_of(entry, "base", "b" * 64, "bench")
    stores = {"registry": OciStore(f"{reg.host}/bench/cache", insecure=True),
              "directory": DirectoryStore(tmp / "shared-dir")}
    for name, store in stores.items():
        t = time.monotonic()
        store.push(entry, idx)
        push = time.monotonic() - t
        sc = SharedCache(store)
        pulls, cps = [], []
        for _ in range(rounds):  # alternate, so both see the same page cache and load
            pulls.append(timed_pull(sc, tmp / "local"))
            cps.append(timed_cp(entry, tmp / "copy"))
        p, c = statistics.median(pulls), statistics.median(cps)
        print(f"shared cache, {name}: push {mib / push:.0f} MiB/s; pull of a {mib} MiB base {p:.2f} s "
              f"({mib / p:.0f} MiB/s) vs cp {c:.2f} s ({mib / c:.0f} MiB/s): pull/cp = {p / c:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    if shutil.which("docker-registry") is None:
        print("skipped: docker-registry is not installed (make setup)")
        return 0
    with tempfile.TemporaryDirectory(prefix="imagekit-bench-ci-", dir=os.environ.get("TMPDIR")) as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "reg").mkdir()
        reg = Registry(free_port(), tmp / "reg").start()
        try:
            if not args.skip_pipeline:
                pipeline_bench(tmp, reg)
            cache_bench(tmp, reg, args.mib, args.rounds)
        finally:
            reg.stop()
    print(json.dumps({"note": "ratios: lower is better; the registry's own CPU is the limit of pulls"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
