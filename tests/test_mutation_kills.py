"""Tests that kill the mutants ``make mutate`` found alive in the safety-critical code (docs/testing.md).

Each test is written against behaviour: what a caller of the defence sees when the defence holds,
and what would slip through when it is loosened. Where the real path cannot fail on its own, a fault
is injected and the test's docstring says which.
"""

from __future__ import annotations

from imagekit import glance

SHA = "a" * 128
MD5 = "b" * 32


# ---------------------------------------------------------------- Glance: what the record must match


def _record(**over: object) -> dict[str, object]:
    rec: dict[str, object] = {"status": "active", "size": 100, "os_hash_algo": "sha512", "os_hash_value": SHA,
                              "checksum": MD5}
    rec.update(over)
    return rec


def test_glance_record_matching_what_was_sent_passes() -> None:
    assert glance._verify(_record(), 100, {"sha512": SHA, "md5": MD5}) == []
    assert glance._verify(_record(checksum=None), 100, {"sha512": SHA, "md5": MD5}) == []
    assert glance._verify(_record(), None, {"sha512": SHA}) == []
