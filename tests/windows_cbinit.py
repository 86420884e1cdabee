"""cloudbase-init's own definitions, read from its PyPI package (a test dependency).

``options()``: every option cloudbase-init registers (``cloudbaseinit.conf.opts``) plus
oslo.log's, as {group: {name: kind}}; ``classes(subpackage, kind)``: the plugin and
metadata service classes its modules define, found by reading the source (many of its
modules import Windows-only modules and cannot be imported on Linux).

``python -m tests.windows_cbinit`` prints ``imagekit/windows/cbinit_table.py`` as it should
be for the installed cloudbase-init (the tests compare the two).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

KINDS = {"BoolOpt": "bool", "IntOpt": "int", "FloatOpt": "float", "StrOpt": "str", "ListOpt": "list",
         "PortOpt": "int", "DictOpt": "dict", "MultiStrOpt": "list"}


def package_root() -> Path:
    import cloudbaseinit

    return Path(cloudbaseinit.__file__).parent


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("cloudbase-init")


def options() -> dict[str, dict[str, str]]:
    from cloudbaseinit.conf import opts
    from oslo_log import _options as log_opts

    out: dict[str, dict[str, str]] = {}
    for group, opt_list in opts.get_options():
        for o in opt_list:
            out.setdefault(group, {})[o.dest] = KINDS.get(type(o).__name__, "str")
    for o in log_opts.list_opts()[0][1]:
        out["DEFAULT"][o.dest] = KINDS.get(type(o).__name__, "str")
    return out


def choices() -> dict[str, tuple[str, ...]]:
    from cloudbaseinit.conf import opts

    out: dict[str, tuple[str, ...]] = {}
    for group, opt_list in opts.get_options():
        for o in opt_list:
            ch = getattr(o.type, "choices", None)
            if ch:
                out[f"{group}.{o.dest}"] = tuple(str(c) for c in ch)
    return out


def _classes_in(path: Path) -> dict[str, list[str]]:
    with warnings.catch_warnings():  # cloudbase-init's sources have invalid escape sequences
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}


def classes(subpackage: str, base_names: tuple[str, ...]) -> list[str]:
    """Dotted paths of the classes under ``cloudbaseinit.<subpackage>`` derived (by name, through the
    package's own classes) from one of ``base_names``."""
    root = package_root()
    found: dict[str, list[str]] = {}
    for py in sorted((root / subpackage.replace(".", "/")).rglob("*.py")):
        if "tests" in py.parts:
            continue
        module = ".".join(("cloudbaseinit", *py.relative_to(root).with_suffix("").parts))
        for name, bases in _classes_in(py).items():
            found[f"{module}.{name}"] = bases
    simple: dict[str, list[list[str]]] = {}
    for path, bases in found.items():
        simple.setdefault(path.rsplit(".", 1)[1], []).append(bases)

    def derives(bases: list[str], seen: set[str]) -> bool:
        for b in bases:
            short = b.rsplit(".", 1)[-1]
            if short in base_names:
                return True
            if short not in seen and any(derives(other, seen | {short}) for other in simple.get(short, [])):
                return True
        return False

    return sorted(p for p, bases in found.items()
                  if derives(bases, set()) and not p.rsplit(".", 1)[1].startswith("Base"))


def plugin_classes() -> list[str]:
    return [p for p in classes("plugins", ("BasePlugin",)) if ".userdataplugins." not in p]


def user_data_plugin_classes() -> list[str]:
    return classes("plugins.common.userdataplugins", ("BaseUserDataPlugin",))


def metadata_service_classes() -> list[str]:
    return classes("metadata.services", ("BaseMetadataService",))


def render_table() -> str:
    lines = ['"""cloudbase-init\'s options, plugins and metadata services (generated from cloudbase-init '
             f'{version()}:', '``python -m tests.windows_cbinit``; ``tests/test_windows_provision.py`` checks it).',
             '"""', "", "from __future__ import annotations", "", f'CLOUDBASE_INIT_VERSION = "{version()}"', "",
             "# group -> option -> kind (bool, int, float, str, list, dict); DEFAULT includes oslo.log's options",
             "OPTIONS: dict[str, dict[str, str]] = {"]
    for group, opts in sorted(options().items()):
        lines.append(f'    "{group}": {{')
        lines.extend(f'        "{name}": "{kind}",' for name, kind in sorted(opts.items()))
        lines.append("    },")
    lines.append("}")
    lines.append("CHOICES: dict[str, tuple[str, ...]] = {")
    lines.extend(f'    "{k}": {v!r},' for k, v in sorted(choices().items()))
    lines.append("}")
    for name, items in (("PLUGINS", plugin_classes()), ("USER_DATA_PLUGINS", user_data_plugin_classes()),
                        ("METADATA_SERVICES", metadata_service_classes())):
        lines.append(f"{name} = frozenset({{")
        lines.extend(f'    "{p}",' for p in items)
        lines.append("})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
