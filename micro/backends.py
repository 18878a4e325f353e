"""The one scheme table mechanism: how every component finds a backend by name.

Each component keeps one small ``name -> "module:Class"`` table (the registry, broker
and store by URL scheme, models by provider name) and third parties add names through
the entry-point group ``micro.<component>``. Backend modules import their optional
third-party package themselves and, when it is missing, raise ``ImportError`` naming
the extra to install; the lookup turns that into a ``ConfigError``.
"""

from __future__ import annotations

import importlib
import urllib.parse
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from micro.errors import ConfigError

__all__ = ["EXTRAS", "known", "load", "load_backend"]

EXTRAS = {"nats": "nats", "nats+js": "nats", "postgresql": "postgres", "postgres": "postgres",
          "anthropic": "anthropic", "openai": "openai"}
"""Name -> the pip extra that installs its optional dependency (when it differs from nothing)."""


def known(component: str, table: Mapping[str, str]) -> list[str]:
    """Every name of ``component``: the built-in table and the ``micro.<component>`` entry points."""
    return sorted({*table, *(ep.name for ep in entry_points(group=f"micro.{component}"))})


def load(component: str, table: Mapping[str, str], name: str, *, where: str) -> Any | None:
    """The object ``name`` stands for, from ``table`` or the entry points; None when unknown.

    ``where`` names what was asked for in errors (a redacted URL, a provider name).
    Raises ``ConfigError`` for a module this version of micro lacks, or a missing
    optional dependency (naming the extra to install).
    """
    target = table.get(name)
    if target is None:
        for ep in entry_points(group=f"micro.{component}", name=name):
            return ep.load()
        return None
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name == module:
            raise ConfigError(f"{component} {where}: {module} is not available in this version of micro") from None
        extra = EXTRAS.get(name, name)
        raise ConfigError(f"{component} {where} needs an optional dependency ({exc.name} is missing): "
                          f"pip install 'micro[{extra}]'") from None
    return getattr(mod, attr)


def load_backend(component: str, table: Mapping[str, str], url: str) -> Any:
    """The backend class for ``url``'s scheme, from ``table`` or the ``micro.<component>`` entry points.

    Raises ``ConfigError`` naming the URL (pass it redacted): for an unknown scheme
    (listing the known ones, entry points included), a backend module this version of
    micro lacks, or a backend whose optional dependency is not installed (naming the extra).
    """
    scheme = urllib.parse.urlsplit(url).scheme
    found = load(component, table, scheme, where=f"URL {url!r}")
    if found is None:
        schemes = ", ".join(f"{s}://" for s in known(component, table))
        raise ConfigError(f"unknown {component} URL {url!r}: the scheme must be one of {schemes}")
    return found
