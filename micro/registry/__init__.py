"""Service discovery: the ``Registry`` interface and its backends, chosen by URL.

``from_url(None)`` reads ``MICRO_REGISTRY`` and defaults to ``local://`` (machine-wide,
no server). Schemes: ``memory://``, ``local://[/path]``, ``nats://host:port``.
Third parties add schemes through the ``micro.registry`` entry-point group.
"""

from __future__ import annotations

import os

from micro.backends import load_backend
from micro.registry._base import (
    Endpoint,
    Event,
    Node,
    PollWatcher,
    Registry,
    ServiceRecord,
    Snapshot,
    Watcher,
    diff,
    merge,
)
from micro.resource import redact

__all__ = ["BACKENDS", "Endpoint", "Event", "Node", "PollWatcher", "Registry", "ServiceRecord", "Snapshot", "Watcher",
           "diff", "from_url", "merge"]

BACKENDS: dict[str, str] = {
    "memory": "micro.registry.memory:MemoryRegistry",
    "local": "micro.registry.local:LocalRegistry",
    "nats": "micro.registry.nats:NatsRegistry",
}


def from_url(url: str | None = None) -> Registry:
    """A registry for ``url`` (default: ``$MICRO_REGISTRY`` or ``local://``). No I/O."""
    url = url or os.environ.get("MICRO_REGISTRY") or "local://"
    cls = load_backend("registry", BACKENDS, redact(url))
    backend: Registry = cls.from_url(url)
    return backend
