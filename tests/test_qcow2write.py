"""imagekit's qcow2 writer against QEMU: every input format, sizes from empty to multi-GiB sparse, clusters
4K-2M, uncompressed, zlib and zstd. Each output passes imagekit's check and ``qemu-img check``, ``qemu-img
compare`` says it is identical to the input, ``qemu-img map`` matches the plan, and two runs give the same
bytes. Hypothesis draws random allocation maps."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagekit import convert as conv
from imagekit.check import check
from imagekit.errors import ImageReadError
from imagekit.qcow2write import (
    Geometry,
    LayoutError,
    NbdError,
    NbdSource,
    WriteOptions,
    open_source,
    plan_compressed,
    plan_plain,
    prepare,
    verify_map,
    write_file,
)
from imagekit.qcow2write.layout import REFCOUNT_MAX, pack_compressed
from tests import image_factory as fac

MiB = 1 << 20
GiB = 1 << 30


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def sparse_raw(path: Path, size: int, extents: list[tuple[int, bytes]]) -> Path:
    """A sparse raw file of ``size`` bytes with ``data`` written at each offset."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)
    return path


def pattern(n: int, seed: int) -> bytes:
    """Half compressible, half random: both kinds of compressed clusters."""
    rnd = np.random.default_rng(seed).integers(0, 256, n // 2, dtype=np.uint8).tobytes()
    return (bytes([seed % 251 + 1]) * (n - n // 2)) + rnd


def write(src: Path, fmt: str, out: Path, opts: WriteOptions, nbd: bool = False) -> tuple[str, object]:
    """Write ``src`` with the writer; verify the map; return (sha256, layout)."""
    with open_source(src, fmt, nbd=nbd) as s:
        p = prepare(s, opts)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            digests = write_file(p, fd)
        finally:
            os.close(fd)
            p.close()
    assert out.stat().st_size == p.size
    verify_map(out, p.layout)
    return digests["sha256"], p.layout


def assert_valid(src: Path, fmt: str, out: Path) -> None:
    v = check(out, declared="qcow2")
    assert v.verdict == "accept", [(f.code, f.message) for f in v.findings]
    r = qemu("check", "-f", "qcow2", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    c = qemu("compare", "-f", fmt, "-F", "qcow2", str(src), str(out))
    assert c.returncode == 0, c.stdout + c.stderr


# ---------------------------------------------------------------- every input format


@pytest.fixture(scope="module")
def base_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wbase")
    return sparse_raw(d / "base.raw", 24 * MiB, [(0, pattern(3 * MiB, 1)), (9 * MiB + 4096, pattern(MiB, 2)),
                                                 (24 * MiB - 8192, pattern(8192, 3))])


INPUTS = [("raw", None, "raw"), ("qcow2", "compat=0.10", "qcow2"), ("qcow2", "compression_type=zstd", "qcow2"),
          ("vmdk", "subformat=streamOptimized", "vmdk"), ("vpc", "subformat=dynamic", "vpc"),
          ("vpc", "subformat=fixed", "vpc"), ("vhdx", None, "vhdx"), ("vdi", None, "vdi")]


@pytest.mark.parametrize(("fmt", "opts", "qfmt"), INPUTS, ids=[f"{a}-{b}" for a, b, _ in INPUTS])
@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_every_input_format(base_raw: Path, tmp_path: Path, fmt: str, opts: str | None, qfmt: str,
                            compression: str) -> None:
    if fmt == "raw":
        src = base_raw
    else:
        args = ["convert", "-q", "-f", "raw", "-O", fmt] + (["-o", opts] if opts else []) + (
            ["-c"] if opts and "compression" in opts else []) + [str(base_raw), str(tmp_path / f"in.{fmt}")]
        assert qemu(*args).returncode == 0
        src = tmp_path / f"in.{fmt}"
    out = tmp_path / "out.qcow2"
    write(src, qfmt, out, WriteOptions(compression=compression))
    assert_valid(src, qfmt, out)


# ---------------------------------------------------------------- sizes, clusters, compression


@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_cluster_sizes_and_compression(base_raw: Path, tmp_path: Path, cluster_size: int, compression: str) -> None:
    out = tmp_path / "o.qcow2"
    opts = WriteOptions(cluster_size=cluster_size, compression=compression)
    digest, layout = write(base_raw, "raw", out, opts)
    assert_valid(base_raw, "raw", out)
    info = check(out).format_report
    assert info is not None and info.format_info["info"]["cluster_size"] == cluster_size
    assert info.format_info["info"]["compression_type"] == ("zstd" if compression == "zstd" else "zlib")
    if compression != "none":
        assert info.stats["compressed_clusters"] > 0
        plain = tmp_path / "p.qcow2"
        write(base_raw, "raw", plain, WriteOptions(cluster_size=cluster_size))
        assert out.stat().st_size < plain.stat().st_size
    # same input, same options: the same bytes (also with one compression worker instead of several)
    again = tmp_path / "again.qcow2"
    d2, _ = write(base_raw, "raw", again, WriteOptions(cluster_size=cluster_size, compression=compression, workers=1))
    assert d2 == digest == hashlib.sha256(out.read_bytes()).hexdigest()


def test_compat_010_and_qemu_reads_zlib_like_its_own(base_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "v2.qcow2"
    write(base_raw, "raw", out, WriteOptions(compat="0.10", compression="zlib", cluster_size=4096))
    assert_valid(base_raw, "raw", out)
    assert qemu("info", "--output=json", "-f", "qcow2", str(out)).stdout.count('"compat": "0.10"') == 1
    ref = tmp_path / "qemu.qcow2"
    assert qemu("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compat=0.10", str(base_raw),
                str(ref)).returncode == 0
    # same deflate parameters as QEMU: the sizes agree closely
    assert abs(out.stat().st_size - ref.stat().st_size) <= 0.02 * ref.stat().st_size + 3 * 4096


def test_empty_and_odd_sizes(tmp_path: Path) -> None:
    zero = tmp_path / "zero.qcow2"
    assert qemu("create", "-q", "-f", "qcow2", str(zero), "0").returncode == 0
    out = tmp_path / "z.qcow2"
    write(zero, "qcow2", out, WriteOptions())
    assert_valid(zero, "qcow2", out)
    odd = sparse_raw(tmp_path / "odd.raw", 5 * MiB + 1000, [(5 * MiB, b"\x7f" * 1000)])  # not a multiple of 512
    out2 = tmp_path / "odd.qcow2"
    write(odd, "raw", out2, WriteOptions(compression="zlib"))
    assert check(out2).verdict == "accept"
    assert qemu("check", "-f", "qcow2", str(out2)).returncode == 0
    back = tmp_path / "back.raw"
    assert qemu("convert", "-f", "qcow2", "-O", "raw", str(out2), str(back)).returncode == 0
    assert back.read_bytes()[:odd.stat().st_size] == odd.read_bytes()  # padded to 512 with zeroes


def test_multi_gib_sparse(tmp_path: Path) -> None:
    src = sparse_raw(tmp_path / "big.raw", 6 * GiB, [(0, pattern(MiB, 4)), (3 * GiB - 4096, pattern(8192, 5)),
                                                     (6 * GiB - MiB, pattern(MiB, 6))])
    for compression in ("none", "zstd"):
        out = tmp_path / f"big-{compression}.qcow2"
        _, layout = write(src, "raw", out, WriteOptions(compression=compression))
        assert out.stat().st_size < 8 * MiB
        assert_valid(src, "raw", out)
        assert layout.geo.virtual_size == 6 * GiB  # type: ignore[attr-defined]


def test_nbd_and_direct_raw_give_the_same_bytes(base_raw: Path, tmp_path: Path) -> None:
    a, _ = write(base_raw, "raw", tmp_path / "a.qcow2", WriteOptions(compression="zlib"))
    b, _ = write(base_raw, "raw", tmp_path / "b.qcow2", WriteOptions(compression="zlib"), nbd=True)
    assert a == b


def test_zero_clusters_are_dropped_when_compressing(tmp_path: Path) -> None:
    src = tmp_path / "z.raw"
    src.write_bytes(bytes(4 * MiB) + b"\x01" * MiB)  # allocated zeroes, then data
    out = tmp_path / "z.qcow2"
    _, layout = write(src, "raw", out, WriteOptions(compression="zlib"))
    assert layout.guest.tolist() == list(range(64, 80))  # type: ignore[attr-defined]
    assert_valid(src, "raw", out)


# ---------------------------------------------------------------- random allocation maps


@st.composite
def allocation(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], int, str]:
    cb = draw(st.sampled_from([12, 14, 16, 21]))
    size = draw(st.integers(1, 96)) * draw(st.sampled_from([4096, 65536, 512 * 1024]))
    runs = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 300_000)), max_size=8))
    return size, [(o, min(n, size - o)) for o, n in runs], cb, draw(st.sampled_from(["none", "zlib", "zstd"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=allocation())
def test_random_allocation_maps(tmp_path: Path, case: tuple[int, list[tuple[int, int]], int, str]) -> None:
    size, runs, cb, compression = case
    src = sparse_raw(tmp_path / "r.raw", size, [(o, pattern(n, o % 97)) for o, n in runs])
    out = tmp_path / "r.qcow2"
    _, layout = write(src, "raw", out, WriteOptions(cluster_size=1 << cb, compression=compression))
    assert_valid(src, "raw", out)


# ---------------------------------------------------------------- the planner alone


def test_planner_rejects_what_qemu_cannot_address() -> None:
    with pytest.raises(LayoutError):
        Geometry(virtual_size=1 << 50, cluster_bits=9)  # L1 beyond 32 MiB
    with pytest.raises(LayoutError):
        Geometry(virtual_size=1000)  # not a multiple of 512
    with pytest.raises(LayoutError):
        plan_plain(Geometry(virtual_size=1 << 20), np.array([3, 2], dtype=np.int64))  # not ascending
    with pytest.raises(LayoutError):
        plan_plain(Geometry(virtual_size=1 << 20), np.array([16], dtype=np.int64))  # past the virtual size


def test_compressed_refcounts_never_overflow() -> None:
    geo = Geometry(virtual_size=1 << 40, cluster_bits=21, compression="zstd")
    sizes = [20] * 200_000  # far more than 65535 tiny runs fit in one 2 MiB cluster
    _off, _sec, refs, _end = pack_compressed(geo, sizes)
    assert int(refs.max()) < REFCOUNT_MAX and int(refs.sum()) >= 200_000
    layout = plan_compressed(geo, np.arange(200_000, dtype=np.int64), sizes)
    assert layout.data_refs.size == refs.size and layout.planned_map()[0][2] is None


def test_planned_map_merges_like_qemu() -> None:
    lay = plan_plain(Geometry(virtual_size=1 << 24), np.array([0, 1, 2, 5, 6], dtype=np.int64))
    m = lay.planned_map()
    assert [(s, n) for s, n, _ in m] == [(0, 3 * 65536), (5 * 65536, 2 * 65536)]
    assert m[1][2] == m[0][2] + 3 * 65536  # type: ignore[operator]


# ---------------------------------------------------------------- errors


def test_unreadable_and_unopenable_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError):
        open_source(tmp_path / "missing.raw", "raw")
    bogus = tmp_path / "bogus.vmdk"
    bogus.write_bytes(b"not a vmdk at all" * 100)
    with pytest.raises(NbdError) as info, NbdSource(bogus, "vmdk"):
        pass
    assert "could not open" in info.value.message
    assert not any("qemu-nbd" in p.read_text(errors="replace") and str(bogus) in p.read_text(errors="replace")
                   for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists())


def test_deep_work_folder_gets_a_short_socket(tmp_path: Path) -> None:
    """A CI runner's cache folder is deep (GitLab's builds/<group>/<project>/...): the NBD socket path
    would pass the 108 bytes a unix socket may have, so it goes to a private short folder instead,
    which is gone afterwards."""
    from imagekit.workdir import short_root  # noqa: PLC0415

    src = fac.write_pattern(tmp_path / "d.raw", 2 * MiB)
    qcow = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow)], check=True)
    deep = tmp_path / ("runner-cache-" * 8) / "work"
    before = set(short_root().iterdir())
    with NbdSource(qcow, "qcow2", work_base=deep) as s:
        assert s.size == 2 * MiB
        assert len(s._sock) <= 100 and s._sock.startswith(str(short_root()))
    assert set(short_root().iterdir()) == before
    assert oct(short_root().stat().st_mode & 0o777) == "0o700"


def test_convert_cli_verify_map_and_content(tmp_path: Path, imagekit) -> None:  # type: ignore[no-untyped-def]
    src = fac.write_pattern(tmp_path / "d.raw", 8 * MiB)
    r = imagekit("--json", "convert", str(src), "-o", str(tmp_path / "m.qcow2"), "--compress", "zstd")
    assert r.code == 0, r.err
    d = r.json()
    assert d["writer"] == "imagekit" and d["verification"] == "map" and d["compare"] == "map-as-planned"  # type: ignore[index]
    assert d["qemu_img_check"] == "consistent" and d["map_ranges"] >= 1  # type: ignore[index]
    r2 = imagekit("--json", "convert", str(src), "-o", str(tmp_path / "c.qcow2"), "--verify", "content")
    assert r2.code == 0 and r2.json()["compare"] == "identical"  # type: ignore[index]
    res = conv.convert(src, tmp_path / "lib.qcow2", conv.ConvertOptions(verify="map", compress="zlib"))
    assert res.writer == "imagekit" and res.output.sha256 == hashlib.sha256((tmp_path / "lib.qcow2").read_bytes()
                                                                            ).hexdigest()


def test_bad_cluster_sizes_are_usage_errors(tmp_path: Path, imagekit) -> None:  # type: ignore[no-untyped-def]
    src = sparse_raw(tmp_path / "s.raw", 8 * MiB, [(0, b"\x01" * 4096)])
    for size in ("3000", "4M", "256"):
        r = imagekit("convert", str(src), "-o", str(tmp_path / "o.qcow2"), "--cluster-size", size)
        assert r.code == 2 and "Traceback" not in r.err and "hint:" in r.err, (size, r.err)
        assert not (tmp_path / "o.qcow2").exists() and not list(tmp_path.glob("*.part"))


def test_compression_level(base_raw: Path, tmp_path: Path) -> None:
    fast, best = tmp_path / "l1.qcow2", tmp_path / "l9.qcow2"
    write(base_raw, "raw", fast, WriteOptions(compression="zlib", level=1))
    write(base_raw, "raw", best, WriteOptions(compression="zlib", level=9))
    assert_valid(base_raw, "raw", fast)
    assert_valid(base_raw, "raw", best)
    assert best.stat().st_size <= fast.stat().st_size
    with pytest.raises(conv.UsageError):
        conv.convert(base_raw, tmp_path / "x.qcow2", conv.ConvertOptions(compress="zlib", compress_level=12))
