"""Differential fuzz test: ``imagekit check`` against ``qemu-img check`` on randomly corrupted real images.

The base images (v3, snapshots, extended L2, compressed, v2 with 512-byte clusters) and the
mutations (hostile header fields, table entries, single bytes, truncation) are those of
``tests/test_qcow2_fuzz.py``. For every mutated image, QEMU is the oracle:

* whatever ``qemu-img check`` counts as corruption (exit 2) or cannot even open (exit 1: QEMU
  refuses the image) imagekit must reject: imagekit is never less strict than QEMU;
* whatever imagekit rejects that ``qemu-img check`` accepts (exit 0, or 3: leaks only) must carry
  only reject codes listed in :data:`imagekit.formats.qcow2.STRICTER_THAN_QEMU`, each documented
  with the reason imagekit is stricter there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagekit.check import check
from imagekit.formats.qcow2 import STRICTER_THAN_QEMU
from tests import qcow2_factory as qf
from tests.test_qcow2_fuzz import Base, bases, mutation  # noqa: F401 - the shared module fixture

pytestmark = pytest.mark.skipif(not Path(qf.QEMU_IMG).exists(), reason="qemu-img not installed")


def qemu_check(path: Path) -> int | None:
    """``qemu-img check`` exit code (None: it did not finish in time; no verdict)."""
    try:
        return subprocess.run([qf.QEMU_IMG, "check", "-f", "qcow2", str(path)], capture_output=True,
                              timeout=20).returncode
    except subprocess.TimeoutExpired:
        return None


def mutate(base: Base, muts: list[tuple[int, bytes, bool]]) -> bytes:
    buf = bytearray(base.data)
    for off, b, trunc in muts:
        if trunc:
            del buf[off:]
        elif off < len(buf):
            buf[off:off + len(b)] = b
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_never_less_strict_than_qemu(bases: list[Base], tmp_path: Path, data: st.DataObject) -> None:  # noqa: F811
    base = data.draw(st.sampled_from(bases))
    muts = data.draw(st.lists(mutation(base), min_size=1, max_size=3))
    p = tmp_path / "fuzz.qcow2"
    p.write_bytes(mutate(base, muts))
    rc = qemu_check(p)
    v = check(p, declared="qcow2")
    rejects = sorted({f.code for f in v.findings if f.severity == "reject"})
    if rc in (1, 2):
        assert v.verdict == "reject", f"qemu-img check exit {rc} but imagekit says {v.verdict}: {v.codes()}"
    elif rc in (0, 3) and rejects:
        undocumented = [c for c in rejects if c not in STRICTER_THAN_QEMU]
        assert not undocumented, (f"imagekit rejects what qemu-img check accepts (exit {rc}) with undocumented "
                                  f"codes {undocumented}: {[f.message for f in v.findings]}")


def test_documented_codes_have_reasons() -> None:
    for code, why in STRICTER_THAN_QEMU.items():
        assert code == code.lower() and " " not in code and len(why) > 20, code


def test_verified_features_are_not_rejected_on_oslos_word(tmp_path: Path) -> None:
    """Extended L2 entries (which oslo's inspector calls unknown), zstd clusters and bitmaps: valid, fully
    verified by imagekit, so never a reject; extended L2 is a warning that Glance's inspector refuses it."""
    xl2 = qf.with_data(tmp_path / "xl2.qcow2", opts="extended_l2=on,cluster_size=65536",
                       writes=("write -P 1 0 256k", "write -z 1M 64k", "write -P 2 2M 4k"))
    v = check(xl2)
    assert v.verdict == "warn" and {f.code: f.severity for f in v.findings} == {"glance-inspector-refuses": "warn"}
    assert v.oslo_safety is not None and v.oslo_safety.failures  # oslo did refuse it
    assert check(xl2, deep=False).verdict == "reject"  # only a full deep check earns the warning
    zstd = qf.compressed(tmp_path, "z", ctype="zstd")
    bm = qf.create(tmp_path / "bm.qcow2")
    qf.qemu_img("bitmap", "--add", str(bm), "b0")
    qf.qemu_io(bm, "write -P 1 0 1M")
    for p in (zstd, bm):
        assert check(p).verdict == "accept", (p, check(p).codes())
        assert qemu_check(p) == 0
    # a corrupted extended-L2 image is still a reject, whatever oslo says
    q = qf.Q2(xl2)
    q.set_u64(q.l2_table() + 16 * 100 + 8, 1)  # subcluster allocated without a host cluster
    assert check(xl2).verdict == "reject" and qemu_check(xl2) == 2
