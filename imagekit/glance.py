"""Publish images to Glance: check, upload (streaming, hashed in the same pass), verify, reuse, rotate.

``upload(cloud, path, options, progress)``:

1. ``check()`` the file; a rejected image raises UnsafeImageError before
   anything is created in Glance. ``disk_format`` comes from the DETECTED format
   (never the extension), ``container_format`` is ``bare``, ``min_disk`` is the
   virtual size in GiB rounded up.
2. Properties: the recipe's profile + ``glance.properties`` + ``--property``
   (``UploadOptions.recipe`` is a loaded ``Recipe``: it is never re-read here), linted (``imagekit.properties``); an inconsistent set raises before upload.
3. Idempotency: an active image with the same name, the same size and the same
   sha512 (``os_hash_value``) is reused (``force_upload`` overrides). The local
   digest is only computed ahead when such a candidate exists (one extra pass);
   otherwise the file is read exactly once, by the upload.
4. The image record is created with ``imagekit_incomplete=true``; the data is
   streamed through ``HashingReader`` (sha512 of exactly the bytes sent)
   by one of the import methods ``direct`` (PUT), ``glance-direct`` (stage +
   import) or ``web-download`` (the server fetches ``url``).
5. Glance's ``size`` and ``os_hash_algo``/``os_hash_value`` must equal the
   local ones (the legacy md5 ``checksum`` is reported, not recomputed: on two
   cores an md5 pass beside sha512 slows the upload by a tenth and adds no
   assurance; a Glance configured with another ``hashing_algorithm`` costs one
   more local pass with that algorithm); then ``imagekit_incomplete`` is removed and
   ``protected`` set. Any failure (mismatch, server error, server gone,
   Ctrl-C, SIGTERM or SIGHUP) deletes the record; when even that is impossible the error says so
   and the record keeps ``imagekit_incomplete=true`` (and is not active).

``list_images`` / ``prune`` (``imagekit.glance_images``, re-exported here) implement
rotation by name prefix; ``HashingReader`` lives in ``imagekit.glance_stream``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imagekit import properties as props_mod
from imagekit.cloud import Cloud, CloudError, translate
from imagekit.errors import ImagekitError, UnsafeImageError, UsageError
from imagekit.formats import registry
from imagekit.glance_images import IMAGE_FIELDS, PruneAction, image_dict, list_images, prune, summary
from imagekit.glance_stream import CHUNK, SEND_CHUNK, HashingReader, Progress, StreamSource

if TYPE_CHECKING:
    from imagekit.recipe import Recipe

log = logging.getLogger("imagekit.glance")

ImportMethod = Literal["direct", "glance-direct", "web-download"]

GiB = 1 << 30
INCOMPLETE = "imagekit_incomplete"
# imagekit format name (check()/detect()) -> Glance disk_format
IMPORT_TIMEOUT = 1800.0


class GlanceError(ImagekitError):
    """An upload, import or verification against Glance failed."""


class VerifyError(GlanceError):
    """Glance stored something else than what was sent (size or digest differ)."""


class ImportStalled(GlanceError):
    """An import (glance-direct, web-download) did not finish within its timeout."""

    code = "import-stalled"


# ---------------------------------------------------------------- planning


@dataclass
class UploadOptions:
    name: str | None = None
    recipe: Recipe | None = None  # a loaded recipe (never re-loaded here: its {date} stays as loaded)
    properties: dict[str, str] = field(default_factory=dict)
    visibility: str | None = None
    tags: list[str] = field(default_factory=list)
    protected: bool | None = None
    min_ram: int | None = None
    import_method: ImportMethod = "direct"
    url: str | None = None
    disk_format: str | None = None  # only for web-download without a local file
    force_upload: bool = False
    prune_keep: int | None = None
    prune_action: PruneAction = "hide"
    prune_prefix: str | None = None
    max_virtual_size: int | None = None
    import_timeout: float = IMPORT_TIMEOUT


@dataclass
class Plan:
    """What will be sent: everything decided before talking to the cloud."""

    path: str | None
    name: str
    disk_format: str
    container_format: str
    size: int | None
    virtual_size: int | None
    min_disk: int
    min_ram: int
    visibility: str
    protected: bool
    tags: list[str]
    properties: dict[str, str]
    lint: list[props_mod.Finding]
    verdict: str | None
    recipe: str | None
    import_method: str
    url: str | None
    prune_prefix: str | None
    source: str | None = None  # a streamed upload: what is converted on the way (path is None: no file)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lint"] = [f.to_dict() for f in self.lint]
        return d


def min_disk_gib(virtual_size: int | None) -> int:
    return 0 if not virtual_size else max(1, math.ceil(virtual_size / GiB))


def plan(path: str | os.PathLike[str] | None, options: UploadOptions, *, lint_only: bool = False) -> Plan:
    """Check the file and the properties; raise on an unsafe image or an inconsistent property set.

    ``lint_only``: properties only (the file is not checked, may be absent).
    """
    from imagekit.check import check

    if options.import_method not in ("direct", "glance-direct", "web-download"):
        raise UsageError(f"unknown import method {options.import_method!r}",
                         "use direct, glance-direct or web-download")
    if options.import_method == "web-download":
        if not options.url:
            raise UsageError("--import-method web-download needs --url URL", "the URL Glance downloads from")
    elif options.url:
        raise UsageError("--url is only used with --import-method web-download")
    if path is None and options.import_method != "web-download" and not lint_only:
        raise UsageError("no image file given", "imagekit upload IMAGE --cloud NAME")
    recipe = options.recipe
    properties = props_mod.build(recipe, options.properties)
    findings = props_mod.check_lint(properties, recipe)

    spath = os.fspath(path) if path is not None else None
    disk_format: str | None = None
    size: int | None = None
    vsize: int | None = None
    verdict_name: str | None = None
    if spath is not None and not lint_only:
        v = check(spath, max_virtual_size=options.max_virtual_size)
        verdict_name = v.verdict
        if not v.ok:
            raise UnsafeImageError(
                f"{spath} is unsafe, not uploaded: {', '.join(c for c in v.codes() if c)}",
                "nothing was sent to Glance; 'imagekit check --json' lists every finding", v)
        disk_format = registry.glance_disk_format(str(v.format))
        if disk_format is None:
            raise UsageError(f"{spath}: detected format {v.format!r} cannot be uploaded to Glance")
        if options.disk_format and (registry.glance_disk_format(options.disk_format) or options.disk_format) != disk_format:
            raise UsageError(f"--disk-format {options.disk_format} but {spath} is {disk_format} (detected)",
                             "the detected format is used; drop --disk-format")
        size = Path(spath).stat().st_size
        vsize = v.virtual_size
    elif options.disk_format:
        disk_format = registry.glance_disk_format(options.disk_format)
        if disk_format is None:
            raise UsageError(f"unknown --disk-format {options.disk_format!r}",
                             f"one of: {', '.join(registry.glance_names())}")
    elif not lint_only:
        raise UsageError("web-download without a local file needs --disk-format",
                         "or give the local copy of the image: it is checked first and its hash verified")

    name = options.name or (recipe.glance.name if recipe is not None else None)
    if name is None:
        name = Path(spath).name if spath else (options.url or "image").rstrip("/").rsplit("/", 1)[-1]
    glance_conf = recipe.glance if recipe is not None else None
    tags = list(dict.fromkeys([*(glance_conf.tags if glance_conf else []), *options.tags]))
    min_ram = options.min_ram if options.min_ram is not None else (
        glance_conf.min_ram if glance_conf and glance_conf.min_ram is not None else 0)
    visibility = options.visibility or (glance_conf.visibility if glance_conf else "private")
    protected = options.protected if options.protected is not None else bool(glance_conf and glance_conf.protected)
    prune_prefix = options.prune_prefix or (recipe.name if recipe is not None else name)
    return Plan(path=spath, name=name, disk_format=disk_format or "raw", container_format="bare", size=size,
                virtual_size=vsize, min_disk=min_disk_gib(vsize), min_ram=min_ram, visibility=visibility,
                protected=protected, tags=tags, properties=properties, lint=findings, verdict=verdict_name,
                recipe=recipe.name if recipe is not None else None, import_method=options.import_method,
                url=options.url, prune_prefix=prune_prefix)


# ---------------------------------------------------------------- upload


@dataclass
class UploadResult:
    image: dict[str, Any]
    reused: bool
    method: str
    disk_format: str
    size: int | None
    sha512: str | None
    md5: str | None
    bytes_read: int
    seconds: float
    throughput_mib_s: float | None
    verified: bool
    cloud: dict[str, Any]
    lint: list[dict[str, str]]
    pruned: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _find_reusable(c: Cloud, plan_: Plan, progress: Progress | None) -> tuple[dict[str, Any] | None,
                                                                              dict[str, str] | None]:
    """(image, local digests) when an active image with this name, size and sha512 exists."""
    if plan_.path is None or plan_.size is None:
        return None, None
    found = c.call("list images", lambda: [image_dict(i) for i in
                                           c.glance.images.list(filters={"name": plan_.name, "status": "active"})])
    same_size = [i for i in found if i.get("size") == plan_.size and i.get("os_hash_algo") == "sha512"
                 and not i.get(INCOMPLETE)]
    if not same_size:
        return None, None
    from imagekit.artifact import hash_file

    log.info("an active image named %s with the same size exists: hashing the file to compare", plan_.name)
    digests = hash_file(plan_.path, ("sha512",),
                        progress=(lambda d, t: progress("hash", d / t if t else 1.0)) if progress else None)
    for img in sorted(same_size, key=lambda i: str(i.get("created_at")), reverse=True):
        if img.get("os_hash_value") == digests["sha512"]:
            return img, digests
    return None, digests


def _wait_import(c: Cloud, image_id: str, timeout: float, progress: Progress | None) -> dict[str, Any]:
    """Poll until the image is active; raise GlanceError when the import failed or timed out."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        img = c.call("follow the import", lambda: image_dict(c.glance.images.get(image_id)))
        status = img.get("status")
        failed = img.get("os_glance_failed_import")
        if status == "active":
            if progress:
                progress("import", 1.0)
            return img
        if failed or status in ("killed", "deleted", "deactivated"):
            raise GlanceError(f"Glance failed to import the image (status {status}"
                              + (f", failed stores: {failed}" if failed else "") + ")",
                              "Glance only reports 'Internal Error' for failed imports: the reason is in the "
                              "server log (inspection failure, unreachable URL, filtering)")
        if status == "queued" and img.get("os_glance_importing_to_stores") in (None, "") and delay > 2:
            # the import task has ended without activating the image
            raise GlanceError(f"Glance's import task ended but the image is still {status}",
                              "see the Glance server log for the task's error")
        if time.monotonic() > deadline:
            raise ImportStalled(f"the import did not finish within {timeout:g} s (status {status})",
                              "raise the timeout for big images or slow URLs")
        time.sleep(delay)
        delay = min(delay * 1.5, 3.0)


def _verify(img: Mapping[str, Any], size: int | None, digests: Mapping[str, str] | None) -> list[str]:
    problems = []
    if img.get("status") != "active":
        problems.append(f"status is {img.get('status')}, not active")
    if size is not None and img.get("size") != size:
        problems.append(f"size {img.get('size')} != local {size}")
    if digests:
        algo = str(img.get("os_hash_algo") or "")
        if algo in digests:
            if img.get("os_hash_value") != digests[algo]:
                problems.append(f"{algo} {str(img.get('os_hash_value'))[:16]}... != local {digests[algo][:16]}...")
        elif algo:
            problems.append(f"Glance hashes with {algo}, which was not computed locally")
        else:
            problems.append("Glance reports no os_hash_value")
        if "md5" in digests and img.get("checksum") not in (None, digests["md5"]):
            problems.append(f"checksum (md5) {img.get('checksum')} != local {digests['md5']}")
    return problems


def _put_data(c: Cloud, path: str, reader: HashingReader | StreamSource, what: str) -> None:
    """PUT the file to Glance (``/file`` or ``/stage``) with a Content-Length.

    The same request glanceclient's ``images.upload``/``images.stage`` make, sent
    through the same keystoneauth1 session (auth, identity headers, TLS settings),
    but as a sized body in 4 MiB pieces instead of glanceclient's chunked 1 MiB
    transfer encoding: that keeps up with ``curl -T``.
    """
    from glanceclient import exc as gexc

    url = _api_root(c.endpoint) + path
    headers = {"Content-Type": "application/octet-stream", "x-openstack-image-size": str(reader.size)}

    def put() -> None:
        resp = c.session.request(url, "PUT", data=reader.body(), headers=headers, raise_exc=False,
                                 connect_retries=0)
        if resp.status_code >= 400:
            raise gexc.from_response(resp, resp.text)

    c.call(what, put)


def _api_root(endpoint: str) -> str:
    """The endpoint without a version suffix (catalogs may list .../v2)."""
    return re.sub(r"/v\d+(\.\d+)?/?$", "", endpoint.rstrip("/"))


_SAVING_WAIT = 15.0  # seconds Glance gets to notice an interrupted upload


def _wait_while_saving(c: Cloud, image_id: str) -> None:
    """An interrupted upload: Glance's handler notices the closed connection a moment later and puts the
    image back to 'queued' (``_restore`` in glance/api/v2/image_data.py), even over a delete that came
    first. Let it finish before deleting."""
    deadline = time.monotonic() + _SAVING_WAIT
    while time.monotonic() < deadline:
        if image_dict(c.glance.images.get(image_id)).get("status") != "saving":
            return
        time.sleep(0.1)


def _discard(c: Cloud, image_id: str) -> str:
    """Delete a failed image; say what happened. Never raises."""
    from glanceclient import exc as gexc

    try:
        _wait_while_saving(c, image_id)
        c.glance.images.delete(image_id)
        log.warning("deleted the incomplete image %s", image_id)
        return f"the incomplete image {image_id} was deleted"
    except gexc.HTTPNotFound:
        return f"the image {image_id} is already gone"
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original error
        why = translate(exc, c.name, "delete the incomplete image", c.endpoint).message
        try:
            c.glance.images.update(image_id, **{INCOMPLETE: "true"})
            marked = f"it is marked {INCOMPLETE}=true"
        except Exception:  # noqa: BLE001
            marked = f"it was created with {INCOMPLETE}=true and is not active"
        log.info("could not delete the incomplete image %s: %s", image_id, why)
        return (f"the incomplete image {image_id} could NOT be deleted ({why}); {marked}: "
                f"delete it once the cloud answers ('openstack image delete {image_id}')")


@dataclass
class _Sent:
    """What the data transfer produced: Glance's image, the local digests of what was sent."""

    img: dict[str, Any]
    digests: dict[str, str] | None
    bytes_read: int
    data_seconds: float


def upload(c: Cloud, path: str | os.PathLike[str] | None, options: UploadOptions,
           progress: Progress | None = None, plan_: Plan | None = None,
           stream: StreamSource | None = None) -> UploadResult:
    """Check, upload, verify; see the module documentation. Raises ImagekitError subclasses only
    (and KeyboardInterrupt — Ctrl-C, or SIGTERM/SIGHUP through ``imagekit.signals`` — after deleting
    the incomplete image).

    ``stream`` (with ``plan_``): send these bytes, produced as they are sent, instead of reading a file
    (``imagekit.glance_stream.upload_converted``); its ``finish()`` runs after the data went out and
    before Glance's size and hash are compared; no reuse of an existing image (its hash is not known
    ahead)."""
    p = plan_ or plan(path, options)
    t0 = time.monotonic()
    pre_digests: dict[str, str] | None = None
    if not options.force_upload and p.path is not None and stream is None:
        reuse, pre_digests = _find_reusable(c, p, progress)
        if reuse is not None:
            log.info("reusing image %s (same name, size and sha512)", reuse["id"])
            return UploadResult(image=summary(reuse), reused=True, method=p.import_method,
                                disk_format=str(reuse.get("disk_format")), size=p.size,
                                sha512=pre_digests["sha512"] if pre_digests else None, md5=reuse.get("checksum"),
                                bytes_read=p.size or 0, seconds=round(time.monotonic() - t0, 3),
                                throughput_mib_s=None, verified=True, cloud=c.describe(),
                                lint=[f.to_dict() for f in p.lint])
    image_id: str | None = None
    try:
        img = c.call("create the image record", lambda: image_dict(c.glance.images.create(**_create_kwargs(p))))
        image_id = str(img["id"])
        log.info("created image %s (%s, %s)", image_id, p.name, p.disk_format)
        if p.import_method == "web-download":
            sent = _web_download(c, p, image_id, options, progress, pre_digests)
        else:
            sent = _send_file(c, p, image_id, options, progress, stream)
        img = _verify_and_finish(c, p, image_id, sent)
    except KeyboardInterrupt:
        if image_id is not None:
            log.warning("interrupted: %s", _discard(c, image_id))
        raise
    except Exception as exc:
        if image_id is None:
            raise
        raise _failed(c, p, image_id, exc) from exc
    result = _result(c, p, img, sent, time.monotonic() - t0)
    if options.prune_keep is not None and p.prune_prefix:
        result.pruned = prune(c, p.prune_prefix, options.prune_keep, options.prune_action)
    return result


def _create_kwargs(p: Plan) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(p.properties)
    kwargs.update(name=p.name, disk_format=p.disk_format, container_format=p.container_format,
                  visibility=p.visibility, min_disk=p.min_disk, min_ram=p.min_ram, tags=p.tags)
    kwargs[INCOMPLETE] = "true"
    return kwargs


def _send_file(c: Cloud, p: Plan, image_id: str, options: UploadOptions, progress: Progress | None,
               stream: StreamSource | None = None) -> _Sent:
    """``direct`` (PUT /file) or ``glance-direct`` (PUT /stage, then import), hashing what is sent."""
    t_data = time.monotonic()
    if stream is None:
        assert p.path is not None
    with stream if stream is not None else HashingReader(str(p.path), progress=progress) as reader:
        if p.import_method == "direct":
            _put_data(c, f"/v2/images/{image_id}/file", reader, "upload the image data")
        else:
            _put_data(c, f"/v2/images/{image_id}/stage", reader, "stage the image data")
        digests = reader.digests()
        bytes_read = reader.bytes_read
        if bytes_read != reader.size:
            raise GlanceError(f"{p.path or 'the stream'} changed while it was uploaded ({bytes_read} bytes "
                              f"read, {reader.size} expected)")
        if stream is not None:
            stream.finish()
    if p.import_method == "glance-direct":
        c.call("start the glance-direct import",
               lambda: c.glance.images.image_import(image_id, method="glance-direct"))
        img = _wait_import(c, image_id, options.import_timeout, progress)
    else:
        img = c.call("read the image back", lambda: image_dict(c.glance.images.get(image_id)))
    return _Sent(img, digests, bytes_read, time.monotonic() - t_data)


def _web_download(c: Cloud, p: Plan, image_id: str, options: UploadOptions, progress: Progress | None,
                  pre_digests: dict[str, str] | None) -> _Sent:
    """``web-download``: Glance fetches the URL; the local copy, when given, is hashed to verify it."""
    digests: dict[str, str] | None = None
    bytes_read = 0
    if p.path is not None:
        from imagekit.artifact import hash_file

        digests = pre_digests or hash_file(p.path, ("sha512",), progress=(
            (lambda d, t: progress("hash", d / t if t else 1.0)) if progress else None))
        bytes_read = p.size or 0
    t_data = time.monotonic()
    c.call("start the web-download import",
           lambda: c.glance.images.image_import(image_id, method="web-download", uri=p.url))
    img = _wait_import(c, image_id, options.import_timeout, progress)
    return _Sent(img, digests, bytes_read, time.monotonic() - t_data)


def _verify_and_finish(c: Cloud, p: Plan, image_id: str, sent: _Sent) -> dict[str, Any]:
    """Compare Glance's size and hash with the local ones; then drop the incomplete mark (and protect)."""
    algo = str(sent.img.get("os_hash_algo") or "")
    if sent.digests is not None and p.path is not None and algo and algo not in sent.digests \
            and algo in hashlib.algorithms_available:
        from imagekit.artifact import hash_file

        log.info("Glance hashes with %s: hashing the file again with it to verify", algo)
        sent.digests = {**sent.digests, **hash_file(p.path, (algo,))}
    problems = _verify(sent.img, p.size, sent.digests)
    if problems:
        raise VerifyError(f"Glance does not hold what was sent: {'; '.join(problems)}",
                          "the data was altered in transit or by the server; the image was not kept")
    final: dict[str, Any] = {"protected": True} if p.protected else {}
    return c.call("finish the image", lambda: image_dict(
        c.glance.images.update(image_id, remove_props=[INCOMPLETE], **final)))


def _failed(c: Cloud, p: Plan, image_id: str, exc: Exception) -> GlanceError:
    """The error to raise after a failed upload, once the incomplete image is deleted (or marked)."""
    done = _discard(c, image_id)
    what = f"upload of {p.path or p.source or p.url} to cloud '{c.name}' failed"
    if isinstance(exc, ImagekitError):
        cls = type(exc) if isinstance(exc, GlanceError) else GlanceError
        return cls(f"{what}: {exc.message}; {done}", exc.hint)
    return GlanceError(f"{what}: {type(exc).__name__}: {exc}; {done}", "run again with --debug for details")


def _result(c: Cloud, p: Plan, img: dict[str, Any], sent: _Sent, seconds: float) -> UploadResult:
    size = p.size if p.size is not None else img.get("size")
    thr = (size / sent.data_seconds / (1 << 20)) if size and sent.data_seconds > 0 else None
    digests = sent.digests
    return UploadResult(image=summary(img), reused=False, method=p.import_method, disk_format=p.disk_format,
                        size=size, sha512=digests.get("sha512") if digests else img.get("os_hash_value"),
                        md5=img.get("checksum"), bytes_read=sent.bytes_read, seconds=round(seconds, 3),
                        throughput_mib_s=round(thr, 1) if thr else None, verified=digests is not None,
                        cloud=c.describe(), lint=[f.to_dict() for f in p.lint])


__all__ = ["CHUNK", "IMAGE_FIELDS", "SEND_CHUNK", "CloudError", "GlanceError", "HashingReader", "ImportStalled", "Plan",
           "Progress",
           "PruneAction", "UploadOptions", "UploadResult", "VerifyError", "image_dict", "list_images", "plan", "prune",
           "summary", "upload"]
