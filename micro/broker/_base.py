"""The broker interface: topics, messages, publish and subscribe.

A broker moves messages between publishers and subscribers by topic. Topics are
dot-separated tokens (``events.user.created``); a subscription may use the NATS
wildcards ``*`` (exactly one token) and ``>`` (one or more trailing tokens) on
every backend. Subscribers in the same ``queue`` group compete: each message goes
to exactly one member; subscribers without a queue each get every message.

This module is the whole contract and imports no backend. Backends subclass
:class:`Broker` and :class:`Subscription`; :func:`micro.broker.from_url` picks
one by URL scheme.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import betterproto2
import msgspec

from micro import metrics
from micro.codec import encode_json
from micro.errors import BrokerError, MicroError, UsageError
from micro.resource import Resource, State

if TYPE_CHECKING:
    from micro.runtime import Runtime

log = logging.getLogger("micro.broker")
_OPEN = State.OPEN

__all__ = [
    "ID_HEADER",
    "Broker",
    "Message",
    "MessageHandler",
    "Settlement",
    "Subscription",
    "drain",
    "drain_then_cancel",
    "encode_message",
    "new_message_id",
    "validate_topic",
]

ID_HEADER = "Micro-Id"
"""The header that carries :attr:`Message.id` between processes."""
ERROR_HEADER = "Micro-Error"
"""A dead letter's header: why its last delivery failed."""
TOPIC_HEADER = "Micro-Topic"
"""A dead letter's header: the topic it was published to."""
DELIVERIES_HEADER = "Micro-Deliveries"
"""A dead letter's header: how many times it was delivered."""
CONSUMER_HEADER = "Micro-Consumer"
"""A dead letter's header: the ``durable`` name (else the ``queue`` group) of the subscription whose deliveries
were used up; absent for an ephemeral subscription. Each subscriber of a topic gets its own deliveries, so a
subscriber of the dead-letter topic keeps only its own dead letters."""
PUBLISHED_HEADER = "Micro-Published"
"""A dead letter's header: when the original message was published (unix seconds), if the broker knows."""


class Settlement(abc.ABC):
    """How a durable backend settles one delivery; what :meth:`Message.ack` and friends call."""

    settled: bool = False

    @abc.abstractmethod
    async def ack(self) -> None: ...

    @abc.abstractmethod
    async def nack(self, delay: float | None) -> None: ...

    @abc.abstractmethod
    async def term(self) -> None: ...


class Message(msgspec.Struct):
    """One delivered message.

    ``headers`` holds the publisher's headers plus ``Micro-Id``; ``id`` is unique per published message
    (32 hex digits unless the publisher set ``Micro-Id`` itself) and the same for every
    subscriber that receives it.

    What a delivery offers, on every backend:

    - ``delivery``: the attempt number, from 1 (JetStream counts redeliveries);
    - ``last_attempt``: no further delivery follows if this one fails: always on
      at-most-once brokers (memory, local, core NATS); on JetStream, attempt ``max_deliver``;
    - :meth:`ack`, :meth:`nack`, :meth:`term`: settle it now. A handler need not: the
      broker acks when it returns and, when it raises, gives the message back
      (JetStream: redelivered after a backoff, dead-lettered after the last attempt).
      On brokers without redelivery they do nothing: the message is delivered once.
    """

    topic: str
    data: bytes
    headers: dict[str, str] = {}
    id: str = ""
    delivery: int = 1
    last_attempt: bool = True
    settlement: Settlement | None = None

    async def ack(self) -> None:
        """Done: never deliver it again."""
        if self.settlement is not None and not self.settlement.settled:
            await self.settlement.ack()

    async def nack(self, delay: float | None = None) -> None:
        """Give it back to be delivered again (after ``delay`` seconds); counts as an attempt."""
        if self.settlement is not None and not self.settlement.settled:
            await self.settlement.nack(delay)

    async def term(self) -> None:
        """Never deliver it again, and do not dead-letter it: it can never succeed."""
        if self.settlement is not None and not self.settlement.settled:
            await self.settlement.term()


MessageHandler = Callable[[Message], Awaitable[None]]


class Subscription(abc.ABC):
    """Interest in a topic; returned by :meth:`Broker.subscribe`."""

    topic: str
    queue: str | None

    @abc.abstractmethod
    async def unsubscribe(self) -> None:
        """Stop delivery and let the message in hand finish. Idempotent."""


class Broker(Resource, abc.ABC):
    """Publish and subscribe by topic, a :class:`~micro.resource.Resource`.

    Construction does no I/O; ``async with`` connects, and leaving (or :meth:`aclose`,
    idempotent) drains every subscription, then disconnects::

        async with micro.broker.from_url("nats://127.0.0.1:4222") as broker:
            await broker.subscribe("events.>", handle)
            await broker.publish("events.user.created", {"id": 1})

    The public methods check topics, options and the state the same way for every
    backend, then call its hooks: ``_publish`` (the encoded bytes), ``_subscribe``,
    and ``_open`` / ``_close`` (which drains with :func:`drain`).
    """

    kind: ClassVar[str] = "broker"
    error: ClassVar[type[MicroError]] = BrokerError
    url: str = ""
    _topics: set[str] | None = None  # topics already validated (bounded)

    def publish(
        self, topic: str, message: object, *, headers: Mapping[str, str] | None = None
    ) -> Coroutine[Any, Any, None]:
        """Publish ``message`` (see :func:`encode_message`) to ``topic``: ``await broker.publish(...)``.

        The checks run when it is called; the backend's send runs when it is awaited
        (the coroutine is the backend's own: no extra frame on the hot path).
        """
        data = message if type(message) is bytes else encode_message(message)
        topics = self._topics
        if topics is None or topic not in topics:
            validate_topic(topic, wildcards=False)
            if topics is None:
                topics = self._topics = set()
            if len(topics) < 4096:
                topics.add(topic)
        if self._state is not _OPEN:
            self._check_open(f"publish to {topic!r}")
        if metrics.ON:
            metrics.count("published", type(self).__name__, topic, bounded=1)
        return self._publish(topic, data, headers)

    async def subscribe(
        self,
        topic: str,
        handler: MessageHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        prefetch: int | None = None,
    ) -> Subscription:
        """Call ``handler`` for each message on ``topic`` (wildcards allowed).

        ``queue`` joins a group of competing consumers. ``durable`` names a consumer
        that outlives the process on backends that persist (JetStream); elsewhere
        it is accepted and has no effect. ``prefetch`` bounds how many messages a
        pulling backend (JetStream) takes ahead for this subscription (default: the
        broker's ``fetch_batch``); 1 holds none back, so a stop has none to give back
        (each one given back counts as a delivery). Elsewhere it has no effect.
        """
        validate_topic(topic, wildcards=True)
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1):
            raise UsageError(f"prefetch must be at least 1 (got {prefetch!r}) for {topic!r}")
        self._check_open(f"subscribe to {topic!r}")
        handler = metrics.subscriber(type(self).__name__, topic, handler) if metrics.ON else handler
        return await self._subscribe(topic, handler, queue=queue or None, durable=durable or None,
                                     prefetch=prefetch)

    def dead_letter_topic(self, topic: str) -> str | None:
        """Where this broker moves a message of ``topic`` once its deliveries are used up — when the last
        attempt fails, and also when earlier attempts died unsettled and the handler is not called again —
        with :data:`ERROR_HEADER`, :data:`TOPIC_HEADER`, :data:`DELIVERIES_HEADER`, :data:`CONSUMER_HEADER` (which
        subscription gave up: every subscriber of ``topic`` has its own) and :data:`PUBLISHED_HEADER` set and the same
        message id. ``None``: it dead-letters nothing (at-most-once brokers), or ``topic`` is a dead-letter
        topic itself (its failures are dropped). A subscriber that records what it handles (a flow's runs)
        subscribes there to learn of the messages it never finished."""
        return None

    async def check(self) -> None:
        """Raise ``Unavailable`` (naming the broker) when it cannot deliver now; the runtime's
        health checks ask (:mod:`micro.health`). In-process brokers always can while open."""
        self._check_open("check it")

    def attach(self, runtime: Runtime) -> None:
        """Called by the :class:`~micro.Runtime` that holds this broker, before it opens it.

        A broker that delivers through the runtime (``local://``: its registry and client)
        keeps it; the others need nothing from it.
        """

    @abc.abstractmethod
    async def _publish(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Send ``data`` (already encoded; ``topic`` already valid) to ``topic``.

        :meth:`publish` returns what this returns for the caller to await: an ``async def``,
        or a plain function returning one. The send, with its check of the backend's state (connected,
        not closed), happens when that is awaited, in one step: a publish awaited later (``gather``,
        ``create_task``) is checked then, never sent through a connection that was gone meanwhile.
        """

    @abc.abstractmethod
    async def _subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None,
                         durable: str | None, prefetch: int | None) -> Subscription:
        """Start delivering ``topic`` (valid; ``queue``/``durable`` None when not given) to ``handler``."""


async def drain(subscriptions: Iterable[Subscription]) -> None:
    """Unsubscribe all of them at once and wait until each has let its message in hand finish.

    The one way a broker or a service closes many subscriptions: together, so one
    slow handler does not hold the others open while they start new messages.
    """
    async with anyio.create_task_group() as tg:
        for sub in list(subscriptions):
            tg.start_soon(sub.unsubscribe)


async def drain_then_cancel(done: anyio.Event, scope: anyio.CancelScope, timeout: float, what: str, *,
                            running: bool = True) -> None:
    """Wait up to ``timeout`` seconds for ``done``; then cancel ``scope`` and wait for it to end.

    What a subscription's ``unsubscribe`` does with its worker: the message in hand gets
    ``timeout`` seconds to finish, then its handler is cancelled. ``running=False`` (the
    worker never started) does not wait for the cancelled worker to end.
    """
    with anyio.move_on_after(timeout):
        await done.wait()
    if not done.is_set():
        log.warning("%s did not drain within %.1f s: cancelled", what, timeout)
        scope.cancel()
        if running:
            await done.wait()


def encode_message(message: object) -> bytes:
    """The wire bytes of ``message``.

    Bytes pass as they are; dicts, msgspec Structs and betterproto2 messages become
    JSON through :func:`micro.codec.encode_json`, the encoding a call's JSON wire uses,
    so a message looks the same published and sent in a call (proto3 JSON with field
    names kept). Anything else is a ``TypeError``.
    """
    if isinstance(message, bytes):
        return message
    if isinstance(message, bytearray | memoryview):
        return bytes(message)
    if isinstance(message, dict | msgspec.Struct | betterproto2.Message):
        return encode_json(message)
    raise TypeError(
        f"cannot publish a {type(message).__qualname__}: "
        "pass bytes, a dict, a msgspec.Struct or a betterproto2 message"
    )


class _Ids:
    """32 hex digits: 64 random bits per process, then a counter.

    As unique as a uuid4 hex and a tenth of its cost on the publish path; the
    random half is drawn again in a forked child so parent and child never clash.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.prefix_bytes = self.prefix.encode()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))
        # the counter's value without its last byte, and the prefix and that value's 14 hex digits
        # as ASCII bytes: one attribute, so that a reader on another thread never sees one without the other
        self.front: tuple[int, bytes] = (-1, b"")

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"  # starts below 2**32: never wraps

    def stamp(self, head: bytes, data: bytes) -> bytes:
        """``head`` + a fresh id + ``data``, as bytes in one step: the id's first 30 digits change
        once in 256 ids, the last two come from a table (a third of formatting each id)."""
        n = next(self.counter)
        block, front = self.front
        if n >> 8 != block:
            block = n >> 8
            front = b"%s%014x" % (self.prefix_bytes, block)
            self.front = (block, front)
        return b"".join((head, front, _HEX2[n & 255], data))


_HEX2 = tuple(b"%02x" % i for i in range(256))


_ids = _Ids()


stamp_message_id = _ids.stamp
"""``stamp_message_id(head, data)``: ``head``, a fresh message id (32 ASCII hex digits), then
``data``, as bytes (no ``str`` on the way; the core NATS envelope in one step)."""


def new_message_id(headers: Mapping[str, str] | None = None) -> str:
    """The publisher's ``Micro-Id`` header if it set one, else a fresh unique id."""
    if headers:
        given = headers.get(ID_HEADER)
        if given:
            return given
    return _ids.next()


_TOKEN = re.compile(r"[^\s.*>]+")


def validate_topic(topic: str, *, wildcards: bool) -> str:
    """Return ``topic`` if it is a valid topic (or pattern), else raise ``UsageError``."""
    tokens = topic.split(".")
    for i, token in enumerate(tokens):
        if _TOKEN.fullmatch(token):
            continue
        if wildcards and (token == "*" or (token == ">" and i == len(tokens) - 1)):
            continue
        what = "subscription pattern" if wildcards else "topic (no wildcards when publishing)"
        raise UsageError(
            f"invalid {what} {topic!r}: use dot-separated tokens without spaces, "
            "'*' for one whole token and '>' only as the last token"
        )
    return topic
