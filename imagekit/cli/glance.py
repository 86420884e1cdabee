"""``imagekit glance serve|stop|status``: the local Glance on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import click

from imagekit.cli.output import (
    emit,
    json_option,
    out_console,
    result_type,
)
from imagekit.cli.root import cli


@cli.group("glance")
def glance_group() -> None:
    """A local Glance on 127.0.0.1 (SQLite, file store, no Keystone) for publishing without a cloud account."""


@glance_group.command("serve")
@result_type("imagekit.glance_server:ServerInfo", "glance serve")
@click.option("--port", type=click.IntRange(1, 65535), help="Port on 127.0.0.1 (default: a free one).")
@click.option("--dir", "data_dir", type=click.Path(file_okay=False), help="Data directory (default: under the "
              "imagekit state directory).")
@click.option("--clouds-yaml", type=click.Path(dir_okay=False), help="clouds.yaml to update (default: "
              "OS_CLIENT_CONFIG_FILE, else ~/.config/openstack/clouds.yaml).")
@click.option("--timeout", type=float, default=60, show_default=True, help="Seconds to wait for the API.")
@json_option
def glance_serve(port: int | None, data_dir: str | None, clouds_yaml: str | None, timeout: float) -> None:
    """Start the local Glance (in the background) and add the cloud 'imagekit-local' to clouds.yaml."""
    from imagekit import glance_server as gs

    info = gs.serve(port=port, data_dir=data_dir, clouds_yaml=clouds_yaml, timeout=timeout)

    def human() -> None:
        state = "already running" if info.already_running else f"started in {info.start_seconds} s"
        out_console.print(f"[green]local Glance[/] {info.endpoint} (pid {info.pid}, {state})", highlight=False)
        out_console.print(f"  cloud '{info.cloud}' in {info.clouds_yaml}; data in {info.data_dir}", highlight=False)
        out_console.print(f"  next: imagekit upload IMAGE --cloud {info.cloud}; stop: imagekit glance stop",
                          highlight=False)

    emit(info.to_dict(), human)


@glance_group.command("stop")
@result_type("imagekit.cli.results:GlanceStopResult", "glance stop")
@json_option
def glance_stop() -> None:
    """Stop the local Glance (SIGTERM to its PID, then wait)."""
    from imagekit import glance_server as gs

    res = gs.stop()
    emit(res, lambda: out_console.print(f"stopped local Glance (pid {res['pid']})" if res["stopped"]
                                        else f"nothing to stop: {res['reason']}", markup=False))


@glance_group.command("status")
@result_type("imagekit.glance_server:ServerInfo | imagekit.cli.results:GlanceNotRunning", "glance status")
@json_option
def glance_status() -> None:
    """Show whether the local Glance runs (exit 1 when it does not)."""
    from imagekit import glance_server as gs

    info = gs.status()
    data: dict[str, Any] = info.to_dict() if info is not None else {"running": False}
    emit(data, lambda: out_console.print(
        f"running: {info.endpoint} (pid {info.pid}), cloud '{info.cloud}', data {info.data_dir}"
        if info is not None and info.running else "not running", markup=False))
    if info is None or not info.running:
        raise gs.GlanceServerError("the local Glance is not running", "start it with 'imagekit glance serve'")


@glance_group.command("env")
@result_type("imagekit.cli.results:GlanceEnvResult", "glance env")
@json_option
def glance_env() -> None:
    """Print shell exports for clients that read no clouds.yaml: eval "$(imagekit glance env)" then e.g. glance image-list."""
    import shlex

    from imagekit import glance_server as gs

    info = gs.status()
    if info is None or not info.running:
        raise gs.GlanceServerError("the local Glance is not running", "start it with 'imagekit glance serve'")
    env = gs.shell_env(info.endpoint, info.cloud)
    emit(env, lambda: click.echo("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), nl=False))
