"""The shared step cache in an OCI registry, through the ``oras`` SDK.

One repository (``HOST[:PORT]/PATH``, e.g. ``registry.gitlab.com/group/project/imagekit-cache``)
holds three kinds of artifacts, each a manifest named by a tag:

- ``e-<stage>-<key>``: an entry. Its layers are the entry's files (the title annotation is
  the path in the entry's folder), its config blob the :class:`~imagekit.cache_remote.EntryIndex`
  (files with sha256 and size). Blobs are uploaded first (content-addressed, chunked: memory
  stays flat), the manifest last: the tag exists only once everything it names is there, so a
  runner killed mid-push leaves upload sessions nobody can see, never a tag.
- ``l-<stage>-<key>``: a lease (owner and token as manifest annotations, no layers).
- ``r-<name>``: a small record (its config blob), ``imagekit ci``'s unit records.

Pitfalls of the SDK handled here: its request wrapper retries any error for about two
minutes (3+5+11+29+83 s), so :class:`_Registry` calls the unwrapped request with a short,
bounded retry of connection errors and 5xx answers, and a timeout on every request; its
``delete_tag`` deletes the manifest by digest (every tag naming it goes), so leases are
only deleted by the digest of a manifest still holding the caller's token; downloads are
not checked against their digest by the SDK, so every pulled file is hashed here.
Credentials: ``username``/``password`` (basic, or the token flow registries answer 401
with), else the Docker config the SDK reads (``~/.docker/config.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imagekit.cache_remote import INDEX_JSON, EntryIndex, Lease, SharedCacheError, safe_relative, sha256_file
from imagekit.errors import UsageError

log = logging.getLogger("imagekit.ci.cache_oci")

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
FILE_TYPE = "application/vnd.imagekit.cache.file"
INDEX_TYPE = "application/vnd.imagekit.cache.index.v1+json"
RECORD_TYPE = "application/vnd.imagekit.record.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"
LEASE_OWNER = "io.imagekit.lease.owner"
LEASE_TOKEN = "io.imagekit.lease.token"
RETRIES = 2
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
CHUNK = 16 << 20


def _registry_class() -> type[Any]:
    """A ``oras.provider.Registry`` with bounded retries and timeouts (made on first use: the SDK
    is imported only by commands that use a registry)."""
    try:
        import oras.provider
        import requests
        from requests.adapters import HTTPAdapter
    except ImportError as exc:
        raise UsageError("the shared cache in an OCI registry needs the 'oras' package",
                         "install the server extra: .venv/bin/pip install -e '.[server]' (make setup does it)") from exc

    unwrapped = oras.provider.Registry.do_request.__wrapped__

    class _TimeoutAdapter(HTTPAdapter):
        def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True,
                 cert: Any = None, proxies: Any = None) -> Any:
            return super().send(request, stream=stream, timeout=timeout or (CONNECT_TIMEOUT, READ_TIMEOUT),
                                verify=verify, cert=cert, proxies=proxies)

    class _Registry(oras.provider.Registry):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for prefix in ("http://", "https://"):
                self.session.mount(prefix, _TimeoutAdapter())

        def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict[str, str] | None = None,
                       json: Any = None, stream: bool = False) -> Any:
            for attempt in range(RETRIES + 1):
                try:
                    resp = unwrapped(self, url, method, data, dict(headers or {}), json, stream)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    if attempt == RETRIES:
                        raise SharedCacheError(f"registry request {method} {url} failed: {type(exc).__name__}",
                                               "check that the registry runs and the URL in the pipeline "
                                               "file") from exc
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                if resp.status_code >= 500 and attempt < RETRIES:
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                return resp
            raise AssertionError("unreachable")

    return _Registry


def parse_url(url: str) -> tuple[str, str]:
    """``oci://HOST[:PORT]/PATH`` or ``HOST[:PORT]/PATH`` -> (host, repository path)."""
    rest = url.removeprefix("oci://")
    host, _, repo = rest.partition("/")
    if not host or not repo or ":" in repo or "@" in repo:
        raise UsageError(f"not a registry repository: {url!r}", "write HOST[:PORT]/PATH, e.g. 127.0.0.1:5000/imagekit/cache")
    return host, repo.rstrip("/")


class OciStore:
    """A :class:`~imagekit.cache_remote.Store` in one repository of an OCI registry."""

    def __init__(self, url: str, *, insecure: bool = False, username: str | None = None,
                 password: str | None = None) -> None:
        self.host, self.repo = parse_url(url)
        self.insecure = insecure
        self._username, self._password = username, password
        self._local = threading.local()  # one client (requests session) per thread: leases renew in a thread

    @property
    def url(self) -> str:
        return f"oci://{self.host}/{self.repo}"

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = _registry_class()(hostname=self.host, insecure=self.insecure)
            if self._username and self._password:
                client.auth.set_basic_auth(self._username, self._password)
            self._local.client = client
        return client

    def _container(self, tag: str) -> Any:
        return self._client().get_container(f"{self.host}/{self.repo}:{tag}")

    def _base(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.host}/v2/{self.repo}"

    # ---- manifests and blobs

    def _manifest(self, tag: str) -> tuple[dict[str, Any], str] | None:
        """(manifest, its digest) of ``tag``, None when absent."""
        resp = self._client().do_request(f"{self._base()}/manifests/{tag}", "GET", headers={"Accept": MANIFEST_TYPE})
        if resp.status_code == 404:
            return None
        _check(resp, f"read {tag}")
        digest = resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(resp.content).hexdigest()
        return resp.json(), str(digest)

    def _blob(self, digest: str, limit: int = 1 << 20) -> bytes:
        resp = self._client().do_request(f"{self._base()}/blobs/{digest}", "GET")
        _check(resp, f"read blob {digest[:19]}")
        data = bytes(resp.content[: limit + 1])
        if len(data) > limit or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise SharedCacheError(f"the blob {digest[:19]} does not match its digest")
        return data

    def _upload(self, path: Path, media_type: str, digest: str, size: int, title: str | None = None) -> dict[str, Any]:
        layer: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
        if title is not None:
            layer["annotations"] = {TITLE: title}
        c = self._client()
        resp = c.upload_blob(str(path), self._container("x"), layer, do_chunked=True, chunk_size=CHUNK)
        _check(resp, f"upload {title or media_type}")
        return layer

    def _upload_bytes(self, data: bytes, media_type: str) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(prefix="imagekit-oci-") as fh:
            fh.write(data)
            fh.flush()
            return self._upload(Path(fh.name), media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))

    def _put_manifest(self, tag: str, config: dict[str, Any], layers: list[dict[str, Any]],
                      annotations: dict[str, str] | None = None) -> None:
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config,
                                    "layers": layers}
        if annotations:
            manifest["annotations"] = annotations
        resp = self._client().do_request(f"{self._base()}/manifests/{tag}", "PUT",
                                         headers={"Content-Type": MANIFEST_TYPE}, data=json.dumps(manifest).encode())
        _check(resp, f"write {tag}")

    # ---- entries

    def index(self, stage: str, key: str) -> EntryIndex | None:
        found = self._manifest(f"e-{stage}-{key}")
        if found is None:
            return None
        manifest, _ = found
        try:
            idx = INDEX_JSON.validate_json(self._blob(manifest["config"]["digest"]))
            layers = {(lay.get("annotations") or {}).get(TITLE): lay for lay in manifest["layers"]}
        except (KeyError, TypeError, ValidationError) as exc:
            log.warning("registry entry e-%s-%s is not imagekit's, ignored: %s", stage, key[:12], exc)
            return None
        for f in idx.files:
            lay = layers.get(f.path)
            if lay is None or lay.get("digest") != f"sha256:{f.sha256}" or lay.get("size") != f.size:
                log.warning("registry entry e-%s-%s: its index and layers differ, ignored", stage, key[:12])
                return None
        return idx if (idx.stage, idx.key) == (stage, key) else None

    def pull(self, index: EntryIndex, into: Path) -> None:
        c = self._client()
        container = self._container(f"e-{index.stage}-{index.key}")
        for f in index.files:
            dest = into / safe_relative(f.path)
            try:
                c.download_blob(container, f"sha256:{f.sha256}", str(dest))
            except SharedCacheError:
                raise
            except Exception as exc:  # noqa: BLE001 - the SDK raises requests' and its own errors
                raise SharedCacheError(f"cannot download {f.path} of entry {index.stage}-{index.key[:12]}: "
                                       f"{type(exc).__name__}: {exc}") from exc
            if sha256_file(dest) != f.sha256:
                raise SharedCacheError(f"{f.path} of entry {index.stage}-{index.key[:12]} does not match its digest",
                                       "the registry returned other data; the entry is not used")

    def push(self, folder: Path, index: EntryIndex, replace: bool = False) -> bool:
        tag = f"e-{index.stage}-{index.key}"
        if not replace and self._manifest(tag) is not None:
            return False
        layers = [self._upload(folder / f.path, FILE_TYPE, f"sha256:{f.sha256}", f.size, f.path) for f in index.files]
        config = self._upload_bytes(INDEX_JSON.dump_json(index), INDEX_TYPE)
        self._put_manifest(tag, config, layers, {"io.imagekit.stage": index.stage, "io.imagekit.key": index.key,
                                                 "org.opencontainers.image.created": index.created})
        return True

    # ---- leases

    def read_lease(self, name: str) -> Lease | None:
        found = self._manifest(f"l-{name}")
        return _lease_of(found[0]) if found is not None else None

    def write_lease(self, name: str, lease: Lease) -> None:
        config = self._upload_bytes(b"{}", EMPTY_TYPE)
        self._put_manifest(f"l-{name}", config, [], {LEASE_OWNER: lease.owner, LEASE_TOKEN: lease.token})

    def delete_lease(self, name: str, lease: Lease) -> None:
        found = self._manifest(f"l-{name}")
        if found is None:
            return
        cur = _lease_of(found[0])
        if cur is None or cur.token != lease.token:
            return  # another runner's lease now
        resp = self._client().do_request(f"{self._base()}/manifests/{found[1]}", "DELETE")
        if resp.status_code not in (200, 202, 404):
            _check(resp, f"delete lease {name}")

    # ---- records

    def get_record(self, name: str) -> bytes | None:
        found = self._manifest(f"r-{name}")
        if found is None:
            return None
        try:
            return self._blob(found[0]["config"]["digest"])
        except (KeyError, TypeError) as exc:
            raise SharedCacheError(f"record {name} is not imagekit's") from exc

    def put_record(self, name: str, data: bytes) -> None:
        self._put_manifest(f"r-{name}", self._upload_bytes(data, RECORD_TYPE), [])

    def tags(self) -> list[str]:
        """Every tag of the repository (entries ``e-``, leases ``l-``, records ``r-``)."""
        resp = self._client().do_request(f"{self._base()}/tags/list", "GET")
        if resp.status_code == 404:
            return []
        _check(resp, "list tags")
        return sorted(resp.json().get("tags") or [])


def _lease_of(manifest: dict[str, Any]) -> Lease | None:
    ann = manifest.get("annotations") or {}
    owner, token = ann.get(LEASE_OWNER), ann.get(LEASE_TOKEN)
    return Lease(str(owner), str(token)) if owner and token else None


def _check(resp: Any, what: str) -> None:
    if resp.status_code in (200, 201, 202):
        return
    try:
        errors = "; ".join(str(e.get("message", e)) for e in resp.json().get("errors", []))
    except (ValueError, AttributeError):
        errors = str(resp.text or "")[:200]
    hint = ("check the registry credentials (username/password in the pipeline file's cache section, or "
            "'docker login')") if resp.status_code in (401, 403) else None
    raise SharedCacheError(f"registry: cannot {what}: HTTP {resp.status_code} {errors}".rstrip(), hint)
