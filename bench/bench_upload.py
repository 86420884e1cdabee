"""Benchmark ``imagekit upload`` against ``curl -T`` to the same local Glance, in the same run.

Starts a local Glance (``imagekit.glance_server``) in a temporary directory,
writes a 1 GiB raw image (non-zero data), then alternates rounds of

* curl: create the image record, ``curl -T FILE`` PUT to ``/v2/images/ID/file``
  (timed: the curl process), and
* imagekit: ``glance.upload()`` (timed: the whole call after ``check()``: the
  idempotency lookup, create, streaming PUT with sha512 in the same read
  pass, read-back and verification, final update),

each image deleted after its round. Prints MiB/s for both, the throughput ratio
imagekit / curl (target >= 0.95), that the hash was verified and that imagekit
read the file exactly once (bytes read == file size), and the server start time.

Usage: python bench/bench_upload.py [--gib 1] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
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

from imagekit import glance, glance_server  # noqa: E402
from imagekit.cloud import connect  # noqa: E402

MiB = 1 << 20


def make_image(path: Path, gib: float) -> str:
    """A raw image of non-zero data; returns its sha512 (computed here, outside the timings)."""
    block = os.urandom(4 * MiB)
    h = hashlib.sha512()
    total = int(gib * 1024) // 4
    with open(path, "wb") as f:
        for i in range(total):
            chunk = block[i % 4096:] + block[: i % 4096]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def curl_round(c: object, endpoint: str, path: Path) -> float:
    from imagekit.glance_server import AUTH_HEADERS

    cl = c.glance  # type: ignore[attr-defined]
    img = cl.images.create(name=f"bench-curl-{time.time_ns()}", disk_format="raw", container_format="bare")
    argv = ["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(path), "-H", "Content-Type: application/octet-stream"]
    for k, v in AUTH_HEADERS.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"{endpoint}/v2/images/{img['id']}/file")
    t = time.perf_counter()
    subprocess.run(argv, check=True)
    wall = time.perf_counter() - t
    got = cl.images.get(img["id"])
    assert got["status"] == "active" and got["size"] == path.stat().st_size, dict(got)
    cl.images.delete(img["id"])
    return wall


def imagekit_round(c: object, path: Path, plan: glance.Plan, sha512: str) -> tuple[float, glance.UploadResult]:
    opts = glance.UploadOptions(name=f"bench-imagekit-{time.time_ns()}", force_upload=True)
    plan.name = opts.name or plan.name
    t = time.perf_counter()
    res = glance.upload(c, path, opts, plan_=plan)  # type: ignore[arg-type]
    wall = time.perf_counter() - t
    assert res.verified and res.sha512 == sha512 == res.image["os_hash_value"], "hash not verified"
    assert res.bytes_read == path.stat().st_size, "file not read exactly once"
    c.glance.images.delete(res.image["id"])  # type: ignore[attr-defined]
    return wall, res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        print("curl not installed", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="imagekit-bench-upload-", dir=os.environ.get("BENCH_DIR")))
    info = None
    try:
        t = time.perf_counter()
        info = glance_server.serve(home=base / "glance", clouds_yaml=base / "clouds.yaml", timeout=120)
        start = time.perf_counter() - t
        os.environ["OS_CLIENT_CONFIG_FILE"] = str(base / "clouds.yaml")
        c = connect(info.cloud)
        image = base / "bench.raw"
        sha512 = make_image(image, args.gib)
        size = image.stat().st_size
        plan = glance.plan(image, glance.UploadOptions(name="bench"))  # check() once, outside the timings
        # warm-up (page cache, server imports) with one of each
        curl_round(c, info.endpoint, image)
        imagekit_round(c, image, plan, sha512)
        curl_t: list[float] = []
        ik_t: list[float] = []
        res = None
        for _ in range(args.rounds):
            curl_t.append(curl_round(c, info.endpoint, image))
            w, res = imagekit_round(c, image, plan, sha512)
            ik_t.append(w)
        mib = size / MiB
        curl_med, ik_med = statistics.median(curl_t), statistics.median(ik_t)
        ratio = curl_med / ik_med
        print(f"local Glance started in {start:.2f} s (pid {info.pid}, {info.endpoint})")
        print(f"image: {mib:.0f} MiB raw, {args.rounds} rounds each (after one warm-up of each)")
        print(f"curl -T   : median {curl_med:.2f} s = {mib / curl_med:.1f} MiB/s  (runs: "
              + ", ".join(f"{x:.2f}" for x in curl_t) + ")")
        print(f"imagekit  : median {ik_med:.2f} s = {mib / ik_med:.1f} MiB/s  (runs: "
              + ", ".join(f"{x:.2f}" for x in ik_t) + ")")
        assert res is not None
        print(f"imagekit data phase (PUT only): {res.throughput_mib_s} MiB/s last round")
        print(f"hash verified: sha512 {res.sha512[:16]}... == Glance os_hash_value; "
              f"bytes read {res.bytes_read} == file size {size} (read once)")
        print(f"throughput ratio imagekit/curl: {ratio:.3f} (target >= 0.95) -> {'OK' if ratio >= 0.95 else 'BELOW'}")
        return 0
    finally:
        if info is not None:
            glance_server.stop(base / "glance")
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
