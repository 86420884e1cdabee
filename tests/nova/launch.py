"""Run Nova's pieces for the test cloud, each with imagekit's SQLite tuning installed first.

    python -m tests.nova.launch manage-setup NOVA_CONF CELL0_URL
    python -m tests.nova.launch conductor|scheduler|compute --config-file NOVA_CONF

``manage-setup`` does ``nova-manage api_db sync``, ``cell_v2 map_cell0``, ``cell_v2
create_cell --name cell1`` and ``db sync`` in one process (each nova-manage run costs
seconds of imports; ``nova.cmd.manage.main()`` can run only once per process, so the
later steps call the same command classes). The services run with ``tests/nova/virt``
on ``nova.virt.__path__``, so ``compute_driver = imagekit_fake.ImagekitFakeDriver``
resolves to ``nova.virt.imagekit_fake`` without writing into the installed Nova.

gunicorn entry points: ``tests.nova.launch:api`` (nova-api; ``nova.wsgi.osapi_compute``
parses ``sys.argv``, which is gunicorn's, so it is reset first) and
``tests.nova.launch:placement``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from imagekit import sqlite_tuning

SERVICES = {"compute": "nova.cmd.compute", "conductor": "nova.cmd.conductor", "scheduler": "nova.cmd.scheduler"}


def manage_setup(conf: str, cell0_url: str) -> None:
    from nova.cmd import manage

    sys.argv = ["nova-manage", "--config-file", conf, "api_db", "sync"]
    if manage.main() not in (0, None):
        sys.exit("nova-manage api_db sync failed")
    steps = (("cell_v2 map_cell0", lambda: manage.CellV2Commands().map_cell0(database_connection=cell0_url)),
             ("cell_v2 create_cell", lambda: manage.CellV2Commands().create_cell(name="cell1")),
             ("db sync", lambda: manage.DbCommands().sync()))
    for what, step in steps:
        if step() not in (0, None):
            sys.exit(f"nova-manage {what} failed")


def service(name: str, args: list[str]) -> int:
    sys.argv = [f"nova-{name}", *args]
    import nova.virt

    nova.virt.__path__.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "virt"))
    result: int = importlib.import_module(SERVICES[name]).main()
    return result


def __getattr__(name: str) -> Any:
    """The gunicorn entry points, loaded on first use (``tests.nova.launch:api``)."""
    if name == "api":
        sqlite_tuning.install()
        sys.argv = sys.argv[:1]
        from nova.wsgi.osapi_compute import application as api

        return api
    if name == "placement":
        sqlite_tuning.install()
        from placement.wsgi.api import application as placement

        return placement
    raise AttributeError(name)


def main() -> None:
    sqlite_tuning.install()
    what = sys.argv[1]
    if what == "manage-setup":
        manage_setup(sys.argv[2], sys.argv[3])
    else:
        sys.exit(service(what, sys.argv[2:]))


if __name__ == "__main__":
    main()
