"""Cloud access the OpenStack way: clouds.yaml / ``OS_*`` variables, keystoneauth1, glanceclient v2.

``connect(name)`` reads the cloud with openstacksdk's config loader
(``--cloud NAME``, else ``OS_CLOUD``, else the ``OS_*`` variables; clouds.yaml is
searched in the current directory, ``~/.config/openstack``, ``/etc/openstack``,
with ``OS_CLIENT_CONFIG_FILE`` first), builds a keystoneauth1 session and a
python-glanceclient v2 client, and checks the image service answers.

The local Glance (``imagekit glance serve``) runs without Keystone: its clouds.yaml
entry uses the standard ``admin_token`` auth type (a fixed token and an endpoint).

Credentials are never logged or put in messages: errors name the cloud, the
auth URL and the endpoint only. Every failure becomes a ``CloudError`` with a hint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from imagekit.errors import ImagekitError
from imagekit.secrets import Secrets

log = logging.getLogger("imagekit.cloud")

T = TypeVar("T")
DEFAULT_TIMEOUT = 120.0
NO_CLOUD_HINT = ("pass --cloud NAME (an entry of clouds.yaml), or set OS_CLOUD or the OS_AUTH_URL/OS_* variables; "
                 "'imagekit glance serve' creates the cloud 'imagekit-local'")


class CloudError(ImagekitError):
    """The cloud cannot be found, reached or authenticated against, or refused a request."""


@dataclass
class Cloud:
    """A connected cloud: the image endpoint, a keystoneauth1 session and a glanceclient v2 client."""

    name: str
    endpoint: str
    auth_type: str
    auth_url: str | None
    region: str | None
    session: Any
    glance: Any

    def describe(self) -> dict[str, Any]:
        """What may be shown to the user: no credentials."""
        return {"cloud": self.name, "endpoint": self.endpoint, "auth_type": self.auth_type,
                "auth_url": self.auth_url, "region": self.region}

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a glanceclient function; any client/transport error becomes a CloudError."""
        try:
            return fn(*args, **kwargs)
        except ImagekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below, re-raised as CloudError
            raise translate(exc, self.name, what, self.endpoint, self.auth_url) from exc


def _known_clouds(config: Any) -> list[str]:
    try:
        return sorted(str(n) for n in config.get_cloud_names())
    except Exception:  # noqa: BLE001 - only used for a hint
        return []


def translate(exc: BaseException, cloud: str, what: str, endpoint: str | None = None,
              auth_url: str | None = None, secrets: Secrets | Iterable[str] | None = None) -> CloudError:
    """A CloudError for an exception raised by keystoneauth1, glanceclient or openstacksdk.

    Every text taken from the exception is scrubbed of ``secrets`` (the cloud's credentials)."""
    from glanceclient import exc as gexc
    from keystoneauth1 import exceptions as ksa

    secrets = secrets if isinstance(secrets, Secrets) else Secrets(secrets or ())
    where = endpoint or auth_url or "the cloud"
    if isinstance(exc, ksa.Unauthorized | gexc.HTTPUnauthorized):
        return CloudError(f"cloud '{cloud}': authentication failed while trying to {what} (HTTP 401)",
                          "check the user name, password / application credential and project in clouds.yaml "
                          "or the OS_* variables")
    if isinstance(exc, ksa.Forbidden | gexc.HTTPForbidden):
        return CloudError(f"cloud '{cloud}': not allowed to {what} (HTTP 403): {_detail(exc, secrets)}",
                          "the user's roles in this project do not allow it")
    if isinstance(exc, ksa.ConnectTimeout | ksa.ConnectFailure | ksa.SSLError | ksa.UnknownConnectionError
                  | gexc.CommunicationError | gexc.InvalidEndpoint):
        target = auth_url if isinstance(exc, ksa.ConnectionError) and auth_url else where
        return CloudError(f"cloud '{cloud}': cannot reach {target} to {what}",
                          "check the endpoint / auth_url, that the service runs and the network path; "
                          "for the local Glance: 'imagekit glance status'")
    if isinstance(exc, ksa.EndpointNotFound | ksa.CatalogException):
        return CloudError(f"cloud '{cloud}': no image (Glance) endpoint in the service catalog",
                          "check region_name and interface in clouds.yaml")
    if isinstance(exc, ksa.MissingRequiredOptions | ksa.MissingAuthPlugin | ksa.NoMatchingPlugin):
        return CloudError(f"cloud '{cloud}': incomplete authentication settings: {secrets.scrub(str(exc))}",
                          "complete the cloud's auth section in clouds.yaml or the OS_* variables")
    if isinstance(exc, gexc.HTTPException):
        code = getattr(exc, "code", None)
        return CloudError(f"cloud '{cloud}': the image service refused to {what} (HTTP {code}): "
                          f"{_detail(exc, secrets)}", _hint_for_code(code))
    if isinstance(exc, ksa.HttpError):
        return CloudError(f"cloud '{cloud}': request failed while trying to {what} (HTTP {exc.http_status}): "
                          f"{secrets.scrub(exc.message or '')}", None)
    if isinstance(exc, ksa.ClientException):
        return CloudError(f"cloud '{cloud}': {what} failed: {secrets.scrub(str(exc))}", None)
    return CloudError(f"cloud '{cloud}': {what} failed: {type(exc).__name__}: {secrets.scrub(str(exc))}",
                      "run again with --debug for details")


def _detail(exc: BaseException, secrets: Secrets) -> str:
    text = str(getattr(exc, "details", "") or exc)
    text = " ".join(text.split())
    return secrets.scrub(text)[:500]


def _hint_for_code(code: object) -> str | None:
    return {
        404: "the image may have been deleted meanwhile",
        409: "the image is in a state that does not allow this (another upload or import running?)",
        413: "the image is larger than the cloud accepts (image_size_cap or quota)",
        415: "Glance's inspector refused the data (format mismatch or unsafe image); 'imagekit check' it",
    }.get(code) if isinstance(code, int) else None


def load_region(cloud: str | None = None) -> Any:
    """openstacksdk's CloudRegion for ``cloud`` (None: OS_CLOUD or the OS_* variables)."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as osexc
    from openstack.config import loader

    try:
        config = loader.OpenStackConfig(load_envvars=True)
    except osexc.ConfigException as exc:
        raise CloudError(f"cannot read the OpenStack configuration: {exc}",
                         "check clouds.yaml (or the file OS_CLIENT_CONFIG_FILE names)") from exc
    except OSError as exc:
        raise CloudError(f"cannot read the OpenStack configuration: {exc}") from exc
    try:
        return config.get_one(cloud=cloud)
    except osexc.ConfigException as exc:
        known = _known_clouds(config)
        msg = str(exc)
        if cloud is None and not known:
            raise CloudError("no cloud given and no OpenStack configuration found",
                             "pass --cloud NAME (a clouds.yaml entry) or set OS_CLOUD / the OS_* variables; "
                             "'imagekit glance serve' creates the cloud 'imagekit-local'") from exc
        raise CloudError(f"cloud '{cloud}' is not configured: {msg}" if cloud else f"no usable cloud: {msg}",
                         f"known clouds: {', '.join(known)}" if known
                         else "create clouds.yaml (or run 'imagekit glance serve')") from exc
    except ksa.ClientException as exc:
        err = translate(exc, cloud or "default", "load the cloud settings")
        if cloud is None and not os.environ.get("OS_CLOUD"):
            err.hint = NO_CLOUD_HINT
        raise err from exc


def connect(cloud: str | None = None, *, probe: bool = True, timeout: float | None = None) -> Cloud:
    """Connect to the image service of ``cloud``; with ``probe``, check it answers (auth included)."""
    import glanceclient
    from keystoneauth1 import session as ks_session

    region = load_region(cloud)
    name = str(region.name or cloud or "envvars")
    conf = region.config
    auth_conf = dict(conf.get("auth") or {})
    secrets = Secrets().add_mapping(auth_conf)
    secrets.add(*(v for k, v in auth_conf.items() if isinstance(v, str) and "passcode" in str(k).lower()))
    auth_type = str(conf.get("auth_type") or "password")
    auth_url = auth_conf.get("auth_url")
    try:
        auth = region.get_auth()
        verify, cert = region.get_requests_verify_args()
        sess = ks_session.Session(auth=auth, verify=verify, cert=cert,
                                  timeout=timeout or conf.get("api_timeout") or DEFAULT_TIMEOUT,
                                  app_name="imagekit")
        override = region.get_endpoint("image")
        interface = region.get_interface()
        region_name = region.get_region_name("image") or None
    except Exception as exc:  # noqa: BLE001 - translated
        err = translate(exc, name, "set up the session", auth_url=auth_url, secrets=secrets)
        if cloud is None and not os.environ.get("OS_CLOUD"):
            err.hint = NO_CLOUD_HINT
        raise err from exc
    try:
        if override:
            endpoint = str(override)
        else:
            endpoint = str(sess.get_endpoint(service_type="image", interface=interface, region_name=region_name))
    except Exception as exc:  # noqa: BLE001 - translated
        raise translate(exc, name, "authenticate and find the image endpoint", auth_url=auth_url,
                        secrets=secrets) from exc
    if not endpoint or endpoint == "None":
        raise CloudError(f"cloud '{name}': no image (Glance) endpoint found",
                         "check region_name / interface, or set image_endpoint_override in clouds.yaml")
    client = glanceclient.Client("2", session=sess, service_type="image", interface=interface,
                                 region_name=region_name, endpoint_override=endpoint)
    c = Cloud(name=name, endpoint=endpoint.rstrip("/"), auth_type=auth_type,
              auth_url=str(auth_url) if auth_url else None, region=region_name, session=sess,
              glance=client)
    log.info("cloud %s: image endpoint %s (auth %s)", name, c.endpoint, auth_type)
    if probe:
        c.call("list images", lambda: next(iter(client.images.list(limit=1, page_size=1)), None))
    return c
