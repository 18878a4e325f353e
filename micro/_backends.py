"""The scheme table lookup shared by every component (registry, broker, store, ai).

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
    """The backend class for ``url``'s scheme; ``ConfigError`` naming the URL otherwise."""
    scheme = urllib.parse.urlsplit(url).scheme
    target = table.get(scheme)
    if target is None:
        for ep in entry_points(group=f"micro.{component}"):
            if ep.name == scheme:
                return ep.load()
        known = ", ".join(f"{s}://" for s in sorted(table))
        raise ConfigError(f"unknown {component} URL {url!r}: the scheme must be one of {known}")
    module, _, name = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        extra = {"nats": "nats", "postgresql": "postgres", "postgres": "postgres"}.get(scheme, scheme)
        raise ConfigError(
            f"{component} URL {url!r} needs an optional dependency ({exc.name} is missing): "
            f"pip install 'micro[{extra}]'"
        ) from None
    return getattr(mod, name)
