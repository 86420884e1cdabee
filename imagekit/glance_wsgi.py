"""The local Glance's WSGI entry with the SQLite tuning (``glance_server.serve(sqlite_tuning=True)``).

gunicorn imports ``imagekit.glance_wsgi:application``: :mod:`imagekit.sqlite_tuning` is
installed first (WAL, busy timeout, immediate writer transactions), then Glance's own
``glance.wsgi.api:application`` is loaded, so every engine Glance makes has the tuning.
For a Glance that other services (Nova) call while imagekit uploads to it.
"""

from __future__ import annotations

from imagekit import sqlite_tuning

sqlite_tuning.install()

from glance.wsgi.api import application  # noqa: E402  (after the tuning, on purpose)

__all__ = ["application"]
