"""Identity for the local Glance without Keystone: a paste filter that turns a token into identity headers.

The local Glance (``imagekit glance serve``) runs Glance's keystone pipeline with this
filter where ``authtoken`` would be. Every OpenStack client can then use the standard
``admin_token`` auth type (a fixed token and an endpoint) from clouds.yaml: ``openstack``,
``glance``, openstacksdk, imagekit itself, and Nova (which forwards only
``X-Auth-Token`` when it talks to Glance).

A token has the form ``USER:PROJECT`` or ``USER:PROJECT:ROLE,ROLE``; the filter sets
``X-Identity-Status: Confirmed``, ``X-User-Id``, ``X-Project-Id`` and ``X-Roles`` (default
roles ``admin,member,reader``) and removes any identity header the client sent. Requests
without a token, with a malformed token, or from anywhere but loopback get 401: this is a
stand-in for Keystone on 127.0.0.1, not an authentication system.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

DEFAULT_ROLES = "admin,member,reader"
_PART = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_ROLES = re.compile(r"^[a-z_]+(,[a-z_]+)*$")
_LOOPBACK = ("127.", "::1", "::ffff:127.")
_IDENTITY_KEYS = ("HTTP_X_IDENTITY_STATUS", "HTTP_X_USER_ID", "HTTP_X_PROJECT_ID", "HTTP_X_TENANT_ID",
                  "HTTP_X_ROLES", "HTTP_X_ROLE", "HTTP_X_USER_NAME", "HTTP_X_PROJECT_NAME",
                  "HTTP_X_SERVICE_CATALOG")

StartResponse = Callable[..., Any]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def parse_token(token: str) -> tuple[str, str, str] | None:
    """(user, project, roles) of a token ``USER:PROJECT[:ROLES]``, or None when it is malformed."""
    parts = token.strip().split(":")
    if len(parts) not in (2, 3) or not all(_PART.match(p) for p in parts[:2]):
        return None
    roles = parts[2] if len(parts) == 3 else DEFAULT_ROLES
    if not _ROLES.match(roles):
        return None
    return parts[0], parts[1], roles


def make_token(user: str, project: str, roles: str | None = None) -> str:
    return f"{user}:{project}" + (f":{roles}" if roles else "")


class IdentityFromToken:
    """The WSGI middleware (see the module documentation)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        for key in _IDENTITY_KEYS:
            environ.pop(key, None)
        if not str(environ.get("REMOTE_ADDR", "")).startswith(_LOOPBACK):
            return _deny(start_response, "the local Glance answers loopback clients only")
        # glanceclient's legacy HTTP client percent-encodes header values (':' -> %3A)
        ident = parse_token(unquote(str(environ.get("HTTP_X_AUTH_TOKEN", ""))))
        if ident is None:
            return _deny(start_response, "send X-Auth-Token: USER:PROJECT[:ROLES] (auth_type admin_token)")
        user, project, roles = ident
        environ.update({"HTTP_X_IDENTITY_STATUS": "Confirmed", "HTTP_X_USER_ID": user,
                        "HTTP_X_PROJECT_ID": project, "HTTP_X_TENANT_ID": project, "HTTP_X_ROLES": roles})
        return self.app(environ, start_response)


def _deny(start_response: StartResponse, why: str) -> Iterable[bytes]:
    body = f'{{"error": {{"code": 401, "title": "Unauthorized", "message": "{why}"}}}}'.encode()
    start_response("401 Unauthorized", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                        ("WWW-Authenticate", 'Keystone uri="none"')])
    return [body]


def filter_factory(global_conf: dict[str, Any], **local_conf: Any) -> Callable[[App], IdentityFromToken]:
    """The paste entry point (``paste.filter_factory = imagekit.glance_identity:filter_factory``)."""
    return IdentityFromToken
