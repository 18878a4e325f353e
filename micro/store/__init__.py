"""Key/value storage: the ``Store`` interface and its backends, chosen by URL.

``from_url(None)`` reads ``MICRO_STORE`` and defaults to ``file://`` (one file per
record under ``$MICRO_HOME/store``, ``~/.micro/store`` by default). Schemes:
``memory://``, ``file:///abs/path``, ``postgresql://user@host/db`` (or ``postgres://``)
and ``nats://host:4222``. Third parties add schemes through the ``micro.store``
entry-point group (the entry point names a ``Store`` subclass taking the URL).

Example:
    async with micro.store.from_url("memory://") as store:
        await store.write(Record("agent/bot/history/000001", b"..."))
        last = await store.read("agent/bot/history/", prefix=True, limit=10, reverse=True)
"""

from __future__ import annotations

import os

from micro.backends import load_backend
from micro.resource import redact
from micro.store._base import MAX_KEY_BYTES, Record, Store

__all__ = ["BACKENDS", "MAX_KEY_BYTES", "Record", "Store", "from_url"]

BACKENDS: dict[str, str] = {
    "file": "micro.store.file:FileStore",
    "memory": "micro.store.memory:MemoryStore",
    "nats": "micro.store.nats:NatsStore",
    "postgres": "micro.store.postgres:PostgresStore",
    "postgresql": "micro.store.postgres:PostgresStore",
}


def from_url(url: str | None = None) -> Store:
    """A store for ``url`` (default: ``$MICRO_STORE`` or ``file://``). No I/O.

    An unknown scheme raises ``ConfigError``; an unreachable server fails later, in
    ``async with``, with ``Unavailable``.
    """
    url = url or os.environ.get("MICRO_STORE") or "file://"
    # The lookup only needs the scheme; it gets the URL without its password for messages.
    cls = load_backend("store", BACKENDS, redact(url))
    store: Store = cls.from_url(url)
    return store
