"""SQLite for OpenStack services that several processes write at once (WAL, busy timeout, immediate writers).

Glance and Nova use SQLite through oslo.db and SQLAlchemy. With one process that is fine;
with a Nova API, a conductor and a compute service all writing (or Glance answering Nova
while imagekit uploads), a *deferred* transaction that reads and then writes fails at
once with "database is locked" when another process wrote in between: SQLite does not
wait on that conflict, whatever the busy timeout. So, once :func:`install` ran:

- every SQLite connection gets ``PRAGMA journal_mode=WAL`` (readers and a writer at the
  same time) and ``PRAGMA busy_timeout=30000``;
- oslo.db *writer* transactions start with ``BEGIN IMMEDIATE`` (they take the write lock
  first, so the busy timeout applies), *reader* transactions with a plain ``BEGIN``. Making
  every transaction immediate deadlocks Placement, whose allocation retry opens an
  independent reader inside an outer writer: the mode of the innermost oslo.db transaction
  context is tracked per thread for that.

oslo.db emits its own ``BEGIN`` from an engine-level "begin" listener unless
``conn.info['in_transaction']`` is set; class-level listeners on ``Engine`` run before the
engine's own, so the one here decides. Call :func:`install` before any engine exists (the
WSGI entry ``imagekit.glance_wsgi`` does, for ``glance_server.serve(sqlite_tuning=True)``).
Needs SQLAlchemy and oslo.db: imported by the processes that run those services only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_installed = False
_local = threading.local()


def _modes() -> list[Any]:
    if not hasattr(_local, "modes"):
        _local.modes = []
    modes: list[Any] = _local.modes
    return modes


def _track_modes() -> tuple[Any, ...]:
    """Wrap oslo.db's transaction contexts so the innermost one's mode (reader or writer) is known."""
    from oslo_db.sqlalchemy import enginefacade as ef

    ctx = ef._TransactionContext

    def wrap(orig: Any) -> Any:
        @contextlib.contextmanager
        def wrapped(self: Any, savepoint: bool = False, context: Any = None) -> Iterator[Any]:
            _modes().append(self.mode)
            try:
                with orig(self, savepoint=savepoint, context=context) as obj:
                    yield obj
            finally:
                _modes().pop()

        return wrapped

    ctx._session = wrap(ctx._session)
    ctx._connection = wrap(ctx._connection)
    return ef._READER, ef._ASYNC_READER


def install() -> None:
    """Install the listeners (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    import sqlalchemy
    from sqlalchemy.engine import Engine

    readers = _track_modes()

    @sqlalchemy.event.listens_for(Engine, "connect")
    def _connect(dbapi_con: Any, _record: Any) -> None:
        if type(dbapi_con).__module__.startswith("sqlite3"):
            dbapi_con.execute("PRAGMA busy_timeout = 30000")
            dbapi_con.execute("PRAGMA journal_mode = WAL")

    @sqlalchemy.event.listens_for(Engine, "begin")
    def _begin(conn: Any) -> None:
        if conn.dialect.name == "sqlite" and "in_transaction" not in conn.info:
            modes = _modes()
            reader = bool(modes) and modes[-1] in readers
            conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")
            conn.info["in_transaction"] = True
