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


# ---------------------------------------------------------------- convert: refusing a bad output
#
# The conversion tools do not write bad images on their own, so each test injects the fault: the
# written output is corrupted between the write and the verification (or, for qemu-img check, imagekit's
# own check is made to miss the corruption), and the conversion must fail and leave nothing behind.

import json  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from imagekit import convert as conv  # noqa: E402
from imagekit import convert_writer  # noqa: E402
from imagekit.errors import ImagekitError, UnsafeImageError  # noqa: E402
from tests import image_factory as fac  # noqa: E402

MiB = 1 << 20


def _l1_past_eof(path: Path) -> None:
    """The header's L1 table offset (bytes 40..47, big-endian) pointed 1 TiB past the end of the file."""
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(struct.pack(">Q", 1 << 40))


def _flip_data(path: Path) -> None:
    """One byte of the first data cluster changed: every table stays valid, the content does not."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)], capture_output=True,
                         text=True, check=True).stdout
    off = next(e["offset"] for e in json.loads(out) if e.get("data") and "offset" in e)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))


def _leftovers(d: Path, src: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p != src)


def _corrupt_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, damage: Callable[[Path], None],
                   arg: int) -> None:
    real = getattr(module, name)

    def wrapped(*a: object, **kw: object) -> object:
        if name == "_qemu_img_convert":
            res = real(*a, **kw)
            damage(a[arg])  # type: ignore[arg-type]
            return res
        damage(a[arg])  # type: ignore[arg-type]
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


def _damage_output(monkeypatch: pytest.MonkeyPatch, writer: str, damage: Callable[[Path], None]) -> None:
    """The written output damaged before it is verified: after qemu-img convert, or as the writer's
    verification starts."""
    if writer == "qemu-img":
        _corrupt_after(monkeypatch, conv, "_qemu_img_convert", damage, 2)
    else:
        _corrupt_after(monkeypatch, convert_writer, "verify_file", damage, 0)


@pytest.mark.parametrize("writer", ["qemu-img", "auto"])
def test_output_failing_imagekits_check_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   writer: str) -> None:
    src = fac.write_pattern(tmp_path / "in.raw", 4 * MiB)
    _damage_output(monkeypatch, writer, _l1_past_eof)
    with pytest.raises(UnsafeImageError) as info:
        conv.convert(src, tmp_path / "out.qcow2", conv.ConvertOptions(writer=writer))
    assert "failed imagekit's check" in info.value.message and "l1" in " ".join(info.value.verdict.codes())
    assert _leftovers(tmp_path, src) == []  # neither the output nor its temporary name


def test_output_failing_qemu_img_check_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: imagekit's own check of the output is replaced by one that passes, so only qemu-img check
    stands between the corrupted output and the final name."""
    src = fac.write_pattern(tmp_path / "in.raw", 4 * MiB)
    _corrupt_after(monkeypatch, conv, "_qemu_img_convert", _l1_past_eof, 2)
    real_check = conv.check
    monkeypatch.setattr(conv, "check", lambda path, **kw: real_check(src, **{**kw, "declared": "raw"}))
    with pytest.raises(ImagekitError) as info:
        conv.convert(src, tmp_path / "out.qcow2", conv.ConvertOptions(writer="qemu-img"))
    assert "qemu-img check found problems" in info.value.message
    assert _leftovers(tmp_path, src) == []


@pytest.mark.parametrize("writer", ["qemu-img", "auto"])
def test_output_differing_from_the_input_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    writer: str) -> None:
    src = fac.write_pattern(tmp_path / "in.raw", 4 * MiB)
    _damage_output(monkeypatch, writer, _flip_data)
    with pytest.raises(ImagekitError) as info:
        conv.convert(src, tmp_path / "out.qcow2", conv.ConvertOptions(writer=writer, verify="content"))
    assert "differs from the input" in info.value.message
    assert _leftovers(tmp_path, src) == []


# ---------------------------------------------------------------- customise: secrets in a failing step


class _FailingGuest:
    """A stand-in for the libguestfs session (no appliance needed): a Linux guest whose every file call
    fails with libguestfs' kind of error, and the error text quotes what was being written, secrets
    included, as real libguestfs errors quote their arguments."""

    os_type = "linux"

    def __init__(self, leak: str) -> None:
        self.leak = leak

    def is_file(self, path: str) -> bool:
        return True

    def read_text(self, path: str) -> str:
        return "root:x:1:0:99999:7:::\n"

    def write_text(self, path: str, text: str, *a: object, **kw: object) -> None:
        raise RuntimeError(f"write: {path}: No space left on device (content: {text})")

    def __getattr__(self, name: str) -> Callable[..., object]:
        def fail(*a: object, **kw: object) -> object:
            raise RuntimeError(f"{name}{a}: failed with {self.leak}")
        return fail


def test_failing_step_output_and_error_are_scrubbed() -> None:
    from pydantic import TypeAdapter  # noqa: PLC0415

    from imagekit.customise import CustomiseError, run_steps  # noqa: PLC0415
    from imagekit.steps import Step  # noqa: PLC0415
    from tests.test_steps import HASH  # noqa: PLC0415

    steps = TypeAdapter(list[Step]).validate_python([{"op": "root-password", "hash": HASH}])
    seen: list[object] = []
    with pytest.raises(CustomiseError) as info:
        run_steps(_FailingGuest(HASH), steps, network=False, log=seen.append)  # type: ignore[arg-type]
    err = info.value
    text = " ".join(str(x) for x in (err.message, err.hint, err.to_dict(), seen))
    assert "failed" in err.message and "****" in text
    assert HASH not in text and HASH[3:20] not in text


@pytest.mark.parametrize("where", ["output", "command", "hint", "message"])
def test_failing_command_is_scrubbed_everywhere(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Fault: the step's guest command fails and echoes the secret in one place (its output, its
    command line, the hint or the message), as `usermod -p HASH` would on a broken guest."""
    from pydantic import TypeAdapter  # noqa: PLC0415

    from imagekit.customise import CustomiseError, run_steps  # noqa: PLC0415
    from imagekit.steps import Step  # noqa: PLC0415
    from imagekit.steps.accounts import RootPasswordStep  # noqa: PLC0415
    from imagekit.steps.base import StepFailure  # noqa: PLC0415
    from tests.test_steps import HASH  # noqa: PLC0415

    parts = {"message": "usermod failed", "hint": "check the guest", "command": "usermod root",
             "output": "usermod: error"}
    parts[where] += f" {HASH}"

    def fail(self: object, ctx: object) -> object:
        raise StepFailure(parts["message"], parts["hint"], command=parts["command"], output=parts["output"])

    monkeypatch.setattr(RootPasswordStep, "linux", fail)
    steps = TypeAdapter(list[Step]).validate_python([{"op": "root-password", "hash": HASH}])
    seen: list[object] = []
    with pytest.raises(CustomiseError) as info:
        run_steps(_FailingGuest(HASH), steps, network=False, log=seen.append)  # type: ignore[arg-type]
    err = info.value
    text = " ".join(str(x) for x in (err.message, err.hint, err.to_dict(), seen))
    assert "****" in text and HASH not in text


def test_parallel_verification_reports_the_first_jobs_error_whatever_finishes_first() -> None:
    """The deep check, qemu-img check and the map run side by side; when several fail, the error
    reported (and so the exit code: 3 for an unsafe image) is the first job's, even if another job
    failed earlier in time. Here job 1 fails first; job 0 waits for that, then fails."""
    import threading

    second_failed = threading.Event()

    def first() -> None:
        assert second_failed.wait(30)
        raise UnsafeImageError("deep check", "hint")

    def second() -> None:
        second_failed.set()
        raise ImagekitError("qemu-img check", "hint")

    with pytest.raises(UnsafeImageError):
        convert_writer._in_parallel(first, second, lambda: 1)
    assert convert_writer._in_parallel(lambda: 1, lambda: 2) == [1, 2]


# ---------------------------------------------------------------- cloud errors: what the user reads

SECRET = "s3cret-pw"


def _cloud_cases() -> list[tuple[BaseException, str, str | None]]:
    from glanceclient import exc as gexc
    from keystoneauth1 import exceptions as ksa

    return [
        (ksa.Unauthorized(), "cloud 'c': authentication failed while trying to list images (HTTP 401)",
         "check the user name, password / application credential and project in clouds.yaml or the OS_* variables"),
        (gexc.HTTPForbidden(f"no {SECRET}\n  here"), "cloud 'c': not allowed to list images (HTTP 403): no **** here",
         "the user's roles in this project do not allow it"),
        (ksa.ConnectFailure("x"), "cloud 'c': cannot reach http://auth:5000 to list images",
         "check the endpoint / auth_url, that the service runs and the network path; "
         "for the local Glance: 'imagekit glance status'"),
        (gexc.CommunicationError("x"), "cloud 'c': cannot reach http://glance:9292 to list images",
         "check the endpoint / auth_url, that the service runs and the network path; "
         "for the local Glance: 'imagekit glance status'"),
        (ksa.EndpointNotFound(), "cloud 'c': no image (Glance) endpoint in the service catalog",
         "check region_name and interface in clouds.yaml"),
        (ksa.NoMatchingPlugin(f"password {SECRET}"),
         "cloud 'c': incomplete authentication settings: The plugin password **** could not be found",
         "complete the cloud's auth section in clouds.yaml or the OS_* variables"),
        (gexc.HTTPConflict(details=f"busy {SECRET}  now"),
         "cloud 'c': the image service refused to list images (HTTP 409): busy **** now",
         "the image is in a state that does not allow this (another upload or import running?)"),
        (gexc.HTTPBadRequest(details="bad"), "cloud 'c': the image service refused to list images (HTTP 400): bad",
         None),
        (ksa.HttpError(message=f"m {SECRET}", http_status=502),
         "cloud 'c': request failed while trying to list images (HTTP 502): m **** (HTTP 502)", None),
        (ksa.ClientException(f"boom {SECRET}"), "cloud 'c': list images failed: boom ****", None),
        (ValueError(f"odd {SECRET}"), "cloud 'c': list images failed: ValueError: odd ****",
         "run again with --debug for details"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_cloud_errors_say_what_failed_and_what_to_do(index: int) -> None:
    from imagekit import cloud

    exc, message, hint = _cloud_cases()[index]
    err = cloud.translate(exc, "c", "list images", endpoint="http://glance:9292", auth_url="http://auth:5000",
                          secrets=[SECRET])
    assert (err.message, err.hint) == (message, hint)


def test_cloud_error_without_endpoint_names_the_cloud() -> None:
    from glanceclient import exc as gexc

    from imagekit import cloud

    assert cloud.translate(gexc.CommunicationError("x"), "c", "upload").message == \
        "cloud 'c': cannot reach the cloud to upload"
    assert cloud.translate(ValueError("v"), "c", "upload", secrets=None).message == \
        "cloud 'c': upload failed: ValueError: v"


def test_cloud_error_detail_is_one_line_scrubbed_and_bounded() -> None:
    from glanceclient import exc as gexc

    from imagekit import cloud
    from imagekit.secrets import Secrets

    long = gexc.HTTPConflict(details="word\n\t " * 200 + SECRET)
    text = cloud._detail(long, Secrets([SECRET]))
    assert len(text) == 500 and text.startswith("word word ") and "\n" not in text
    assert cloud._detail(gexc.HTTPConflict(details=f"a  {SECRET}"), Secrets([SECRET])) == "a ****"
    assert cloud._detail(RuntimeError("plain  text"), Secrets([])) == "plain text"  # no .details: str(exc)


def test_cloud_http_error_without_a_message() -> None:
    from keystoneauth1 import exceptions as ksa

    from imagekit import cloud

    exc = ksa.HttpError(http_status=500)
    exc.message = None
    assert cloud.translate(exc, "c", "upload").message == "cloud 'c': request failed while trying to upload (HTTP 500): "
