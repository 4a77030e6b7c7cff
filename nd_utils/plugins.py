"""User plugins: modules named in the config's `plugins:` list, imported in every process.

`register_target`, `register_captioner` and the other `register_*` calls change registries of
the process that runs them. A run has several such processes: the runner, one Jupyter kernel
per stage notebook, Ray's workers. Naming the module that makes the calls in `plugins:` has
each of them import it before it reads a name from the config: `load_config` imports it (before
validating, so the names it registers are valid values), and so does unpickling a Config (how a
Ray task receives its config).

Only the standard library and nd_utils.errors are imported here, so any layer may call it.

Example:
    >>> import_plugins(["json"])          # any importable module name
    ['json']
    >>> import_plugins(["json"])          # a second call imports nothing again
    ['json']
    >>> import_plugins(["no_such_plugin_xyz"])                      # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nd_utils.errors.ConfigError: plugin 'no_such_plugin_xyz' could not be imported ...
"""
from __future__ import annotations

import importlib
import re
from typing import Iterable

from .errors import ConfigError

# dotted Python identifiers: `my_package.nd_plugins`
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

_IMPORTED: dict = {}   # plugin name -> its module, in import order (one import per process)


def imported_plugins() -> list[str]:
    """Names of the plugins this process has imported, in order."""
    return list(_IMPORTED)


def import_plugins(names: "Iterable[str] | None") -> list[str]:
    """Import each module of `names` once per process; return the names, in order.

    A module that cannot be imported (absent, or raising while it registers) raises a
    ConfigError naming it, the underlying error and the fix. Modules already imported are not
    imported again: a plugin's registrations run once, whatever the number of configs loaded.
    """
    names = [str(n).strip() for n in (names or [])]
    for name in names:
        if name in _IMPORTED:
            continue
        if not MODULE_NAME.fullmatch(name):
            raise ConfigError(f"plugin {name!r} is not a module name: write dotted Python "
                              f"names, e.g. plugins: [my_package.nd_plugins]")
        try:
            _IMPORTED[name] = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported
            raise ConfigError(
                f"plugin {name!r} could not be imported ({type(exc).__name__}: {exc}): install "
                f"it or put its folder on PYTHONPATH (every process of a run needs it: the "
                f"runner, the stages' kernels and Ray's workers), or remove it from plugins: in "
                f"the config") from exc
    return names
