"""The scheme table lookup shared by every component (registry, broker, store).

Each component keeps one small ``scheme -> "module:Class"`` table; third parties
add schemes through the entry-point group ``micro.<component>``.
"""

from __future__ import annotations

import importlib
import urllib.parse
from importlib.metadata import entry_points
from typing import Any

from micro.errors import ConfigError


def load_backend(component: str, table: dict[str, str], url: str) -> Any:
    """The backend class for ``url``'s scheme, from ``table`` or the ``micro.<component>`` entry points.

    Raises ``ConfigError`` naming the URL: for an unknown scheme (listing the known
    ones, entry points included), a backend module this version of micro lacks, or
    a backend whose optional dependency is not installed (naming the extra).
    """
    scheme = urllib.parse.urlsplit(url).scheme
    target = table.get(scheme)
    if target is None:
        plugins = entry_points(group=f"micro.{component}")
        for ep in plugins:
            if ep.name == scheme:
                return ep.load()
        known = ", ".join(f"{s}://" for s in sorted({*table, *(ep.name for ep in plugins)}))
        raise ConfigError(f"unknown {component} URL {url!r}: the scheme must be one of {known}")
    module, _, name = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name == module:
            raise ConfigError(f"{component} URL {url!r}: {module} is not available in this "
                              "version of micro") from None
        extra = {"nats": "nats", "postgresql": "postgres", "postgres": "postgres"}.get(
            scheme.partition("+")[0], scheme)
        raise ConfigError(
            f"{component} URL {url!r} needs an optional dependency ({exc.name} is missing): "
            f"pip install 'micro[{extra}]'"
        ) from None
    return getattr(mod, name)
