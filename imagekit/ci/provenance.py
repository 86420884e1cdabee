"""In-toto statements with SLSA v1 provenance for each output, signed in a DSSE envelope.

For every output file of ``imagekit ci run`` (the image, its manifest) :func:`statement`
makes an in-toto Statement v1 (``_type``, ``subject`` with the file's sha256,
``predicateType: https://slsa.dev/provenance/v1``) whose predicate says how it was made:
``buildDefinition`` (``buildType``, ``externalParameters``: the pipeline file and its
digest, the unit, recipe and matrix variables; ``internalParameters``: tool versions and
accelerator; ``resolvedDependencies``: the base image and recipe file with their digests)
and ``runDetails`` (``builder.id``, the invocation: the CI job's URL when the CI system
gives one, start and end times; ``byproducts``: the build log).

With a signing key (``provenance.signing_key`` or ``signing_key_env`` in the pipeline file:
a PEM Ed25519 or ECDSA P-256 private key) :func:`sign` wraps the statement in a DSSE
envelope (payload type ``application/vnd.in-toto+json``; the signature covers DSSE's
pre-authentication encoding, PAE); :func:`verify` checks an envelope with the public key
and returns the statement.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit.errors import ImagekitError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://imagekit.invalid/ci/run/v1"


class ProvenanceError(ImagekitError):
    code = "provenance-failed"


@dataclass(frozen=True)
class Dependency:
    name: str
    uri: str
    algo: str
    digest: str


@dataclass(frozen=True)
class BuildFacts:
    """What the statement tells about the run (the same for every output of one run)."""

    builder_id: str
    invocation: str
    started: str
    finished: str
    external: dict[str, Any]
    internal: dict[str, Any]
    dependencies: tuple[Dependency, ...]
    byproducts: tuple[Path, ...]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def invocation_id() -> str | None:
    """The CI job's URL (GitLab, GitHub Actions) or build id (Zuul), when the CI system gives one."""
    env = os.environ
    if env.get("CI_JOB_URL"):
        return env["CI_JOB_URL"]
    if env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        return f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    if env.get("ZUUL_BUILD_UUID"):
        return f"zuul:build:{env['ZUUL_BUILD_UUID']}"
    return None


def statement(subject: Path, facts: BuildFacts, sha256: str | None = None) -> dict[str, Any]:
    """The in-toto Statement v1 (SLSA provenance v1 predicate) for one output file."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject.name, "digest": {"sha256": sha256 or file_sha256(subject)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": facts.external,
                "internalParameters": facts.internal,
                "resolvedDependencies": [{"name": d.name, "uri": d.uri, "digest": {d.algo: d.digest}}
                                         for d in facts.dependencies],
            },
            "runDetails": {
                "builder": {"id": facts.builder_id},
                "metadata": {"invocationId": facts.invocation, "startedOn": facts.started,
                             "finishedOn": facts.finished},
                "byproducts": [{"name": p.name, "digest": {"sha256": file_sha256(p)}}
                               for p in facts.byproducts if p.is_file()],
            },
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def load_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ProvenanceError(f"the signing key is not a PEM private key without a passphrase: {exc}",
                              "make one with 'openssl genpkey -algorithm ed25519 -out ci.pem'") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ProvenanceError(f"signing keys are Ed25519 or ECDSA, not {type(key).__name__}")
    return key


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sign(doc: dict[str, Any], key: Any) -> dict[str, Any]:
    """A DSSE envelope of ``doc`` signed with ``key`` (from :func:`load_key`)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    message = pae(PAYLOAD_TYPE, payload)
    sig = key.sign(message, ec.ECDSA(hashes.SHA256())) if isinstance(key, ec.EllipticCurvePrivateKey) \
        else key.sign(message)
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}]}


def verify(envelope: dict[str, Any], public_pem: bytes) -> dict[str, Any]:
    """The statement inside ``envelope`` once one of its signatures verifies with the public key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pub: Any = load_pem_public_key(public_pem)
    try:
        payload = base64.b64decode(envelope["payload"])
        message = pae(str(envelope["payloadType"]), payload)
        sigs = [base64.b64decode(s["sig"]) for s in envelope["signatures"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProvenanceError(f"not a DSSE envelope: {exc}") from exc
    for sig in sigs:
        try:
            if isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            else:
                pub.verify(sig, message)
        except InvalidSignature:
            continue
        doc: dict[str, Any] = json.loads(payload)
        return doc
    raise ProvenanceError("no signature of the envelope verifies with this key",
                          "the statement was altered, or signed with another key")


def write_all(outputs: list[Path], facts: BuildFacts, folder: Path, key: Any | None,
              digests: dict[str, str] | None = None) -> list[Path]:
    """One statement per output (``NAME.intoto.json``) and, with a key, its envelope
    (``NAME.intoto.dsse.json``), in ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for out in outputs:
        doc = statement(out, facts, (digests or {}).get(out.name))
        written.append(_write_json(folder / f"{out.name}.intoto.json", doc))
        if key is not None:
            written.append(_write_json(folder / f"{out.name}.intoto.dsse.json", sign(doc, key)))
    return written


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
