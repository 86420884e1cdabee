"""Tests that kill the mutations that survived a review of imagekit's after-the-fact defences.

Each test fails when its defence is removed or loosened (written against behaviour; where the
real path cannot fail on its own, a fault is injected and the test says so):

- cloud errors carry the credentials masked, whatever the error's own text contains;
- a sparse VMDK whose embedded descriptor lists a second extent is refused;
- ``os_secure_boot=optional`` needs UEFI like ``required``;
- an upload whose size Glance reports differently (with the same hash) is not kept;
- an L2 table that ends exactly at the end of the file is inside it, one byte short is not
  (the boundary is asserted, not reached through a crash), cross-checked with qemu-img.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from imagekit import cloud, glance, properties
from imagekit.formats import qcow2, vmdk
from imagekit.secrets import MASK, Secrets
from tests import image_factory as fac
from tests import qcow2_factory as qf
from tests.qcow2_factory import COPIED, Q2

SECRET = "s3cr3t-Pa55w0rd-for-test"


# ---------------------------------------------------------------- secrets in cloud errors


def _errors_carrying(secret: str) -> list[BaseException]:
    from glanceclient import exc as gexc
    from keystoneauth1 import exceptions as ksa

    forbidden = gexc.HTTPForbidden(f"policy refused user with password {secret}")
    http = ksa.HttpError(message=f"bad request: password {secret} rejected", http_status=400)
    return [forbidden, http, ksa.ClientException(f"token {secret} expired"),
            ksa.MissingRequiredOptions([]), RuntimeError(f"socket said {secret}"),
            gexc.HTTPInternalServerError(f"trace: password={secret}")]


@pytest.mark.parametrize("index", range(6))
def test_cloud_errors_are_scrubbed_of_credentials(index: int) -> None:
    exc = _errors_carrying(SECRET)[index]
    if index == 3:  # options missing: the message names what is missing; put the secret in it
        exc.args = (f"missing user_domain_name for password {SECRET}",)
    err = cloud.translate(exc, "prod", "list images", endpoint="https://glance.example",
                          secrets=Secrets().add_mapping({"password": SECRET}))
    assert SECRET not in err.message and SECRET not in (err.hint or "")
    if index != 3:
        assert MASK in err.message or "401" in err.message or "403" in err.message


def test_secrets_mask_longest_first_and_ignore_tiny_values() -> None:
    s = Secrets(["abc", "abcdef", "x"])
    assert s.scrub("xx abcdef abc") == f"xx {MASK} {MASK}"
    assert s.scrub_argv(["tool", "--password", "abcdef"]) == f"tool --password '{MASK}'" or \
        s.scrub_argv(["tool", "--password", "abcdef"]) == f"tool --password {MASK}"


# ---------------------------------------------------------------- VMDK: a second extent in an embedded descriptor


def test_sparse_vmdk_with_a_second_extent_is_refused(tmp_path: Path) -> None:
    p = fac.create(tmp_path / "two.vmdk", "vmdk", "1M")
    data = bytearray(p.read_bytes())
    start = data.index(b"# Disk DescriptorFile")
    end = data.index(b"\0", start)
    text = bytes(data[start:end])
    line = next(ln for ln in text.split(b"\n") if b" SPARSE " in ln)
    second = line.replace(b'"two.vmdk"', b'"other.vmdk"')
    new = text.replace(line, line + b"\n" + second)
    assert len(new) - len(text) < data.index(b"\0" * 64, start) - start  # fits in the descriptor's padding
    fac.patch(p, start, new)
    rep = vmdk.verify(p)
    external = [f for f in rep.findings if f.code == "vmdk-external-extent"]
    assert external and external[0].severity == "reject" and "2 extents" in external[0].message
    # only the extent-count rule catches it: no flat extent, no path in the names
    assert not {"vmdk-flat-extent", "vmdk-descriptor-file"} & {f.code for f in rep.findings}


# ---------------------------------------------------------------- property linter


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_secure_boot_needs_uefi_and_q35_in_every_mode(mode: str) -> None:
    bad = properties.lint({"os_secure_boot": mode, "hw_firmware_type": "bios", "hw_machine_type": "pc"})
    assert {f.code for f in bad if f.severity == "error"} >= {"P001", "P002"}
    good = properties.lint({"os_secure_boot": mode, "hw_firmware_type": "uefi", "hw_machine_type": "q35"})
    assert not {f.code for f in good} & {"P001", "P002"}
    assert not {f.code for f in properties.lint({"os_secure_boot": "disabled", "hw_firmware_type": "bios"})} \
        & {"P001", "P002"}


# ---------------------------------------------------------------- Glance: the size is verified on its own


def test_upload_refused_when_glance_reports_another_size(glance_cloud: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injected: Glance's record reads back one byte larger than what was sent, with the right
    hash (a store that pads or truncates silently); only the size comparison catches it."""
    img = tmp_path / "s.raw"
    img.write_bytes(b"\1" * 65536)
    name = f"size-check-{tmp_path.name}"
    real = glance.image_dict

    def padded(record: Any) -> dict[str, Any]:
        d = real(record)
        if d.get("name") == name and d.get("status") == "active":
            d["size"] = int(d["size"]) + 1
        return d

    monkeypatch.setattr(glance, "image_dict", padded)
    with pytest.raises(glance.VerifyError) as ei:
        glance.upload(glance_cloud, img, glance.UploadOptions(name=name))
    assert "size 65537 != local 65536" in ei.value.message and "sha512" not in ei.value.message
    monkeypatch.setattr(glance, "image_dict", real)
    assert [i for i in glance.list_images(glance_cloud) if i["name"] == name] == []


# ---------------------------------------------------------------- qcow2: the L2 table at the end of the file


def _l2_moved_to_the_end(tmp_path: Path) -> Q2:
    """A consistent image whose first L2 table is the file's last cluster (refcounts fixed up)."""
    src = qf.with_data(tmp_path / "src.qcow2")
    q = Q2(shutil.copy(src, tmp_path / "end.qcow2"))
    old = q.l2_table()
    table = q.read(old, q.cs)
    new_index = q.append_cluster()
    q.write(new_index * q.cs, table)
    q.set_l1(0, COPIED | (new_index * q.cs))
    q.set_refcount(new_index, 1)
    q.set_refcount(old // q.cs, 0)
    assert q.size == (new_index + 1) * q.cs
    return q


def test_l2_table_ending_at_end_of_file_is_inside(tmp_path: Path) -> None:
    q = _l2_moved_to_the_end(tmp_path)
    assert qf.check_rc(q.path) in (0, 3)  # qemu-img: consistent (the old table's cluster may count as a leak)
    rep = qcow2.verify(q.path)
    assert rep.verdict != "reject", [(f.code, f.message) for f in rep.findings]
    assert "l2-outside-file" not in {f.code for f in rep.findings}


def test_l2_table_one_byte_past_end_of_file_is_outside(tmp_path: Path) -> None:
    q = _l2_moved_to_the_end(tmp_path)
    q.truncate(q.size - 1)
    rep = qcow2.verify(q.path)
    found = {f.code: f.severity for f in rep.findings}
    assert found.get("l2-outside-file") == "reject"
    # qemu-img reads the missing byte as zero and calls the image consistent: imagekit is the stricter
    # here, with a documented finding code (docs/finding-codes.md)
    assert qf.check_rc(q.path) == 0


def test_l2_struct_layout_matches_the_spec(tmp_path: Path) -> None:
    q = _l2_moved_to_the_end(tmp_path)
    entry = struct.unpack(">Q", q.read(q.l2_table(), 8))[0]
    assert entry & COPIED and (entry & 0x00FFFFFFFFFFFE00) % q.cs == 0
