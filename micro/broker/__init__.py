"""Brokers: publish and subscribe by topic, chosen by URL.

==================================  ==============================================
``memory://``                       one process (:class:`~micro.broker.memory.MemoryBroker`)
``local://``                        processes on one machine, no server (``micro.broker.local``)
``nats://host:4222``                core NATS, at most once (:class:`~micro.broker.nats.NatsBroker`)
``nats+js://host:4222``             JetStream, at least once, durable (:class:`~micro.broker.jetstream.JetStreamBroker`)
==================================  ==============================================

Other packages add schemes through the ``micro.broker`` entry-point group (name =
scheme, value = ``"module:Class"`` of a :class:`Broker` subclass with ``from_url``)::

    broker = micro.broker.from_url("nats+js://127.0.0.1:4222?max_deliver=3")
    async with broker:
        await broker.publish("events.user.created", {"id": 1})
"""

from __future__ import annotations

import os

from micro.backends import load_backend
from micro.broker._base import (
    CONSUMER_HEADER,
    DELIVERIES_HEADER,
    ERROR_HEADER,
    PUBLISHED_HEADER,
    TOPIC_HEADER,
    Broker,
    Message,
    MessageHandler,
    Settlement,
    Subscription,
    drain,
    encode_message,
)
from micro.errors import ConfigError
from micro.resource import redact

__all__ = [
    "BACKENDS",
    "CONSUMER_HEADER",
    "DEFAULT_URL",
    "DELIVERIES_HEADER",
    "ERROR_HEADER",
    "PUBLISHED_HEADER",
    "TOPIC_HEADER",
    "Broker",
    "Message",
    "MessageHandler",
    "Settlement",
    "Subscription",
    "drain",
    "encode_message",
    "from_url",
]

DEFAULT_URL = "memory://"

BACKENDS: dict[str, str] = {
    "memory": "micro.broker.memory:MemoryBroker",
    "local": "micro.broker.local:LocalBroker",
    "nats": "micro.broker.nats:NatsBroker",
    "nats+js": "micro.broker.jetstream:JetStreamBroker",
}
"""URL scheme -> ``"module:Class"``, imported only when used."""


def from_url(url: str | None = None) -> Broker:
    """The broker for ``url``; ``None`` reads ``MICRO_BROKER``, then uses ``memory://``.

    Construction does no I/O: enter the broker with ``async with`` to connect.

    Raises:
        ConfigError: the scheme is unknown (the message lists the known ones), the
            backend's optional dependency is missing, or the URL's options are bad.
    """
    url = url or os.environ.get("MICRO_BROKER") or DEFAULT_URL
    cls = load_backend("broker", BACKENDS, redact(url))
    if not (isinstance(cls, type) and issubclass(cls, Broker)):
        raise ConfigError(f"broker URL {redact(url)!r}: {cls!r} is not a micro.broker.Broker")
    return cls.from_url(url)
