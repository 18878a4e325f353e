"""The JetStream broker (``nats+js://host:4222``): at least once, durable consumers, via nats-py.

- **Streams** — one per topic prefix (the topic's first token: ``events.user.created``
  lives in the stream ``events`` capturing ``events`` and ``events.>``), created on
  demand, file storage, limits retention (``max_age``; 0 keeps messages for ever). A
  stream that already captures the topic (made by an operator) is used as it is.
- **Publish** waits for the server's ack, with ``Nats-Msg-Id`` set to the message
  id, so a retried publish with the same ``Micro-Id`` is stored once.
- **Consumers** are pull consumers with explicit ack. ``durable`` names the consumer
  (one topic per name); ``queue`` without ``durable`` gets one durable consumer per
  group and topic. Every subscription bound to one consumer shares its messages,
  each to one member, and the consumer outlives the process. Without either, the
  consumer is ephemeral and starts at new messages.
- **Delivery** — a :class:`~micro.broker.Message` says its attempt (``delivery``) and
  whether it is the last (``last_attempt``: attempt ``max_deliver``). The broker acks
  when the handler returns, unless the handler settled it itself (``ack``/``nack``/
  ``term``). If it raises, the message is nak'ed with a delay from ``backoff`` (by
  attempt) and comes back; when attempt ``max_deliver`` fails too, the message is
  published to ``dlq.<topic>`` (durable as well) with the error in ``Micro-Error``,
  ``Micro-Topic`` and ``Micro-Deliveries`` headers, then acked. While a handler runs
  the broker tells the server it is in progress, so a slow handler is not
  redelivered; a crashed process sends nothing and its messages come back after
  ``ack_wait``.

The connection and its settings are the core NATS broker's (:mod:`micro.broker.nats`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the nats+js broker needs nats-py: pip install 'micro[nats]'", name=e.name) from e

from micro import metrics
from micro.broker._base import (
    CONSUMER_HEADER,
    DELIVERIES_HEADER,
    ERROR_HEADER,
    ID_HEADER,
    PUBLISHED_HEADER,
    TOPIC_HEADER,
    Message,
    MessageHandler,
    Settlement,
    Subscription,
    drain_then_cancel,
    new_message_id,
    validate_topic,
)
from micro.broker.nats import NatsBroker
from micro.errors import BrokerError, ConfigError, Unavailable, UsageError
from micro.nats_connection import NatsConnection, describe
from micro.resource import redact

__all__ = ["JetStreamBroker", "JetStreamSubscription"]

log = logging.getLogger("micro.broker.jetstream")

_MSG_ID = "Nats-Msg-Id"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_IDLE_POLL = 5.0  # seconds a pull request for the next message lingers on the server
_BUSY_POLL = 0.05  # seconds a batch pull waits for stragglers while messages flow
_reason = describe


def _safe_name(name: str) -> str:
    """A stream or consumer name NATS accepts (no dots, wildcards or spaces)."""
    return _NAME_UNSAFE.sub("_", name)


def _consumer_name(durable: str | None, queue: str | None, topic: str) -> str:
    """The durable consumer's name: ``durable`` as given, else one per queue group and topic."""
    if durable:
        return _safe_name(durable)
    assert queue is not None
    digest = hashlib.blake2b(topic.encode(), digest_size=4).hexdigest()
    return f"{_safe_name(queue)[:48]}_{_safe_name(topic)[:64]}_{digest}"


class _Settlement(Settlement):
    """Settles one JetStream delivery: what ``Message.ack``/``nack``/``term`` do."""

    def __init__(self, sub: JetStreamSubscription, msg: Msg) -> None:
        self._sub = sub
        self._msg = msg

    async def ack(self) -> None:
        self.settled = True
        await self._sub._settle(self._msg.ack())

    async def nack(self, delay: float | None) -> None:
        self.settled = True
        await self._sub._settle(self._msg.nak(delay=delay))

    async def term(self) -> None:
        self.settled = True
        log.warning("message on %r terminated by its handler: it will not be delivered again", self._msg.subject)
        await self._sub._settle(self._msg.term())


class JetStreamSubscription(Subscription):
    """A JetStream pull consumer and its fetch loop."""

    def __init__(self, broker: JetStreamBroker, topic: str, handler: MessageHandler,
                 queue: str | None, durable: str | None, prefetch: int) -> None:
        self.topic = topic
        self.queue = queue
        self.durable = durable
        self._broker = broker
        self._handler = handler
        self._closed = False
        self._done = anyio.Event()
        self._handler_task: asyncio.Task[Any] | None = None
        self._stream = ""
        self._consumer = ""
        self._ephemeral = False
        self._last_seq = 0
        self._pull: JetStreamContext.PullSubscription | None = None
        self._scope = anyio.CancelScope()
        self._fetch_scope: anyio.CancelScope | None = None
        self._busy = False
        self.held: list[Msg] = []  # fetched and not yet acked/nak'ed
        self._gen = 0  # the client generation the pull subscription belongs to
        self.prefetch = prefetch  # messages pulled per request while busy

    async def _run(self) -> None:
        broker = self._broker
        self._handler_task = asyncio.current_task()
        try:
            with self._scope:
                while not self._closed:
                    if not broker._nc.is_connected:
                        await broker._wait_connected(1.0)
                        continue
                    if self._gen != broker._gen:  # a fresh client: the pull subscription died with the old one
                        try:
                            self._pull = None
                            await self._bind(restart=True)
                        except (Unavailable, BrokerError) as e:
                            log.warning("re-binding %r on the fresh connection failed: %s; retrying",
                                        self.topic, e)
                            await anyio.sleep(broker.reconnect_wait)
                        continue
                    try:
                        msgs = await self._fetch()
                    except TimeoutError:  # nats-py raises its own subclass, and the builtin
                        continue
                    except nats.errors.ConnectionClosedError:  # gave up: a fresh client comes
                        await anyio.sleep(broker.reconnect_wait)
                        continue
                    except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError,
                            nats.errors.NoRespondersError) as e:
                        await self._repair(e)
                        continue
                    except nats.errors.Error as e:
                        log.warning("fetching %r from %s failed: %s; retrying", self.topic,
                                    broker.url, _reason(e))
                        await anyio.sleep(broker.reconnect_wait)
                        continue
                    except Exception:  # a surprise from nats-py must not end the subscription
                        log.exception("fetching %r from %s failed; retrying", self.topic,
                                      broker.url)
                        await anyio.sleep(broker.reconnect_wait)
                        continue
                    self.held = msgs
                    while self.held:
                        if self._closed:
                            await self._release_held()
                            break
                        try:
                            await self._deliver(self.held[0])
                        except Exception:  # unsettled: the server redelivers it after ack_wait
                            log.exception("delivering a message of %r failed", self.topic)
                        self.held.pop(0)
            await self._forget_pull()
        finally:
            self._done.set()

    async def _fetch(self) -> list[Msg]:
        """Long-poll for one message when idle; take what is there, up to a batch, when busy.

        nats-py's ``fetch(n)`` waits for all ``n`` messages (or the timeout) once
        its request lingers, so a large batch is only asked for while messages are
        flowing, and then with a short timeout.
        """
        assert self._pull is not None
        busy = self._busy
        with anyio.CancelScope() as scope:
            self._fetch_scope = scope
            if self._closed:
                scope.cancel()
            try:
                if busy:
                    msgs = await self._pull.fetch(self.prefetch, timeout=_BUSY_POLL)
                else:
                    msgs = await self._pull.fetch(1, timeout=_IDLE_POLL)
                self._busy = True
                return msgs
            except TimeoutError:
                self._busy = False
                raise
            finally:
                self._fetch_scope = None
        return []

    async def _repair(self, error: Exception) -> None:
        """Pulls go unanswered: re-create the consumer (and stream) if they are gone."""
        broker = self._broker
        try:
            await broker._jsm.consumer_info(self._stream, self._consumer)
        except nats.js.errors.NotFoundError:
            log.warning("consumer %r of %r is gone (%s): re-creating it", self._consumer,
                        self.topic, _reason(error))
            broker._streams.pop(self.topic, None)
            try:
                await self._bind(restart=True)
                return
            except (Unavailable, BrokerError) as e:
                log.warning("re-creating consumer %r failed: %s", self._consumer, e)
        except nats.errors.Error:
            pass  # JetStream itself is not answering yet (just restarted, or leaderless)
        await anyio.sleep(broker.reconnect_wait)

    async def _bind(self, *, restart: bool = False) -> None:
        broker = self._broker
        self._stream = await broker._ensure_stream(self.topic)
        start = await self._resume_at() if restart else 0
        existing: ConsumerConfig | None = None
        if self.durable or self.queue:
            self._consumer = _consumer_name(self.durable, self.queue, self.topic)
            existing = await self._existing()
            config = ConsumerConfig(durable_name=self._consumer, deliver_policy=DeliverPolicy.ALL)
        else:
            self._ephemeral = True
            self._consumer = self._consumer or uuid.uuid4().hex
            config = ConsumerConfig(name=self._consumer, inactive_threshold=120.0,
                                    deliver_policy=DeliverPolicy.ALL if restart
                                    else DeliverPolicy.NEW)
        if existing is not None:  # the server refuses to change where a consumer starts
            config.deliver_policy = existing.deliver_policy
            config.opt_start_seq = existing.opt_start_seq
            config.opt_start_time = existing.opt_start_time
        elif start:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start
        config.ack_policy = AckPolicy.EXPLICIT
        config.ack_wait = broker.ack_wait
        config.max_deliver = -1  # counted here, so a crash on the last attempt still dead-letters
        config.filter_subject = self.topic
        try:
            await broker._jsm.add_consumer(self._stream, config)
            if self._pull is None:
                self._pull = await broker._js.pull_subscribe_bind(
                    consumer=self._consumer, stream=self._stream)
                self._gen = broker._gen
        except nats.errors.Error as e:
            raise broker._error(f"cannot create consumer {self._consumer!r} on stream "
                                f"{self._stream!r} for {self.topic!r}", e) from e

    async def _resume_at(self) -> int:
        """Where a re-created consumer starts: after the last message seen, if the stream is the same."""
        if not self._last_seq:
            return 0
        try:
            info = await self._broker._jsm.stream_info(self._stream)
        except nats.errors.Error:
            return 0
        return self._last_seq + 1 if info.state.last_seq >= self._last_seq else 0

    async def _existing(self) -> ConsumerConfig | None:
        """The durable consumer's config if it exists; it must filter on our topic."""
        broker = self._broker
        try:
            info = await broker._jsm.consumer_info(self._stream, self._consumer)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.Error as e:
            raise broker._error(f"cannot look up consumer {self._consumer!r}", e) from e
        config: ConsumerConfig = info.config
        if config.filter_subject and config.filter_subject != self.topic:
            raise UsageError(
                f"durable consumer {self._consumer!r} already consumes {config.filter_subject!r}, "
                f"not {self.topic!r}: give each topic its own durable name"
            )
        return config

    async def _deliver(self, msg: Msg) -> None:
        broker = self._broker
        meta = msg.metadata
        self._last_seq = meta.sequence.stream
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        message_id = (headers.get(ID_HEADER) or (msg.headers or {}).get(_MSG_ID)
                      or f"{meta.stream}:{meta.sequence.stream}")
        delivery = meta.num_delivered
        settlement = _Settlement(self, msg)
        message = Message(topic=msg.subject, data=msg.data, headers=headers, id=message_id,
                          delivery=delivery, last_attempt=delivery >= broker.max_deliver, settlement=settlement)
        if delivery > broker.max_deliver:  # earlier attempts died without an ack or nak
            await self._dead_letter(msg, message, f"not acknowledged after {delivery - 1} "
                                    "deliveries (the handler's process died or hung)")
            return
        settled = False
        try:
            await self._handler(message)
            settled = True
        except Exception as e:
            settled = True
            if settlement.settled:  # the handler settled it, then raised: its settlement stands
                log.exception("handler for %r failed on message %s after settling it", self.topic, message_id)
            elif delivery >= broker.max_deliver:
                log.exception("handler for %r failed on message %s (attempt %d of %d)",
                              self.topic, message_id, delivery, broker.max_deliver)
                await self._dead_letter(msg, message, f"{type(e).__name__}: {e}")
            else:
                delay = broker.backoff[min(delivery, len(broker.backoff)) - 1]
                log.warning("handler for %r failed on message %s (attempt %d of %d): %s: %s; "
                            "redelivery in %.1f s", self.topic, message_id, delivery,
                            broker.max_deliver, type(e).__name__, e, delay)
                await self._settle(msg.nak(delay=delay))
            return
        finally:
            if not settled and not settlement.settled:  # cancelled mid-handler: hand the message back at once
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._settle(msg.nak())
        if not settlement.settled:
            await self._settle(msg.ack())

    async def _settle(self, op: Any) -> None:
        try:
            await op
        except nats.errors.Error as e:  # the server redelivers after ack_wait
            log.warning("could not ack/nak a message of %r: %s", self.topic, e)

    async def _dead_letter(self, msg: Msg, message: Message, error: str) -> None:
        broker = self._broker
        target = broker.dead_letter_topic(msg.subject)
        if target is None:
            log.error("dead letter %s on %r failed again (%s): terminated",
                      message.id, msg.subject, error)
            await self._settle(msg.term())
            return
        metrics.count("dead_letters", type(broker).__name__, msg.subject, bounded=1)
        headers = dict(message.headers)
        headers.update({ID_HEADER: message.id, ERROR_HEADER: " ".join(error.split())[:1024],
                        TOPIC_HEADER: msg.subject, DELIVERIES_HEADER: str(message.delivery),
                        PUBLISHED_HEADER: f"{msg.metadata.timestamp.timestamp():.6f}"})
        headers.pop(CONSUMER_HEADER, None)
        if self.durable or self.queue:  # which subscriber gave up: each has its own deliveries of the message
            headers[CONSUMER_HEADER] = self.durable or self.queue or ""
        try:
            await broker.publish(target, message.data, headers=headers)
        except (Unavailable, BrokerError) as e:
            log.warning("could not dead-letter %s to %r: %s; retrying later", message.id, target, e)
            await self._settle(msg.nak(delay=broker.backoff[-1]))
            return
        log.error("message %s on %r dead-lettered to %r after %d deliveries: %s",
                  message.id, msg.subject, target, message.delivery, error)
        await self._settle(msg.ack())

    async def _release_held(self) -> None:
        held, self.held = self.held, []
        for msg in held:
            await self._settle(msg.nak())

    async def _forget_pull(self) -> None:
        if self._pull is None:
            return
        broker = self._broker
        with anyio.move_on_after(broker.drain_timeout):
            try:
                await self._pull.unsubscribe()
                if self._ephemeral and broker._nc.is_connected:
                    await broker._jsm.delete_consumer(self._stream, self._consumer)
            except nats.errors.Error:
                pass

    async def unsubscribe(self) -> None:
        """Stop fetching, give back what is held, let the message in hand finish (up to ``drain_timeout``)."""
        broker = self._broker
        if not self._closed:
            self._closed = True
            broker._subs.discard(self)
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()
        if asyncio.current_task() is self._handler_task:
            return  # the fetch loop stops after this handler returns
        await drain_then_cancel(self._done, self._scope, broker.drain_timeout, f"subscription {self.topic!r}")


class JetStreamBroker(NatsBroker):
    """NATS JetStream through nats-py (``nats+js://host:4222``): at least once, durable consumers.

    Takes the core broker's connection options (see :class:`~micro.broker.nats.NatsBroker`;
    message ids always travel in headers here), and:

    Args:
        publish_timeout: seconds to wait for the server's publish ack.
        max_deliver: attempts before a message goes to the dead-letter topic.
        ack_wait: seconds without an ack before the server redelivers.
        backoff: nak delays in seconds by attempt (the last one repeats).
        fetch_batch: messages pulled per request (held ones are kept alive).
        max_age: seconds streams created here keep messages (0 = for ever).
        dead_letter_prefix: the dead-letter topic is ``<prefix>.<topic>``.

    Example::

        async with JetStreamBroker("nats://127.0.0.1:4222") as broker:
            await broker.subscribe("orders.created", handle, durable="billing")
            await broker.publish("orders.created", {"id": 7})
    """

    SCHEME: ClassVar[str] = "nats+js"
    OPTIONS: ClassVar[dict[str, type]] = {
        **NatsBroker.OPTIONS,
        "publish_timeout": float,
        "max_deliver": int,
        "ack_wait": float,
        "backoff": tuple,
        "fetch_batch": int,
        "max_age": float,
        "dead_letter_prefix": str,
    }

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        connect_timeout: float = 2.0,
        reconnect_wait: float = 1.0,
        max_reconnect: int = -1,
        max_reconnect_wait: float = 30.0,
        drain_timeout: float = 5.0,
        pending_limit: int = 65536,
        message_ids: str | bool = "header",
        publish_timeout: float = 5.0,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = (1.0, 5.0, 30.0),
        fetch_batch: int = 16,
        max_age: float = 0.0,
        dead_letter_prefix: str = "dlq",
    ) -> None:
        super().__init__(servers, connect_timeout=connect_timeout, reconnect_wait=reconnect_wait,
                         max_reconnect=max_reconnect, max_reconnect_wait=max_reconnect_wait,
                         drain_timeout=drain_timeout, pending_limit=pending_limit,
                         message_ids=message_ids)
        self.message_ids = "header"  # Nats-Msg-Id de-duplicates, so ids are always headers here
        self._id_header, self._id_envelope = True, False
        if max_deliver < 1 or fetch_batch < 1 or not backoff or ack_wait <= 0:
            raise ConfigError(f"broker {redact(self.url)}: max_deliver and fetch_batch must be >= 1, "
                              "backoff must not be empty and ack_wait must be positive")
        validate_topic(dead_letter_prefix, wildcards=False)
        self.publish_timeout = publish_timeout
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.backoff = tuple(backoff)
        self.fetch_batch = fetch_batch
        self.max_age = max_age
        self.dead_letter_prefix = dead_letter_prefix
        self._js: Any = None
        self._jsm: Any = None
        self._streams: dict[str, str] = {}

    def dead_letter_topic(self, topic: str) -> str | None:
        """``<dead_letter_prefix>.<topic>``; ``None`` for a topic under the prefix (a dead letter failing
        again is terminated, not dead-lettered twice)."""
        if topic.startswith(self.dead_letter_prefix + "."):
            return None
        return f"{self.dead_letter_prefix}.{topic}"

    async def _ready(self, conn: NatsConnection) -> None:
        await conn.require_jetstream("broker")
        self._js = conn.jetstream(self.publish_timeout)
        self._jsm = conn.jsm(self.publish_timeout)
        self._streams.clear()

    async def _open(self) -> None:
        await super()._open()
        assert self._tg is not None
        self._tg.supervise(self._keepalive, name="keepalive")

    async def _keepalive(self) -> None:
        """Mark held messages as in progress, so only a crash lets ``ack_wait`` run out."""
        interval = self.ack_wait / 3
        while True:
            await anyio.sleep(interval)
            if not self._nc.is_connected:
                continue
            for sub in list(self._subs):
                for msg in list(sub.held if isinstance(sub, JetStreamSubscription) else ()):
                    try:
                        await msg.in_progress()
                    except Exception:
                        pass  # settled meanwhile, or the connection dropped: ack_wait decides

    async def on_disconnected(self) -> None:
        await super().on_disconnected()
        for sub in self._subs:  # their pull requests died with the connection: stop waiting
            if isinstance(sub, JetStreamSubscription) and sub._fetch_scope is not None:
                sub._fetch_scope.cancel()

    async def _wait_connected(self, patience: float) -> None:
        with anyio.move_on_after(patience):
            await self._connected.wait()

    async def on_new_client(self) -> None:
        conn = self._conn
        if conn is not None and not self._closed:
            self._js = conn.jetstream(self.publish_timeout)
            self._jsm = conn.jsm(self.publish_timeout)
            self._streams.clear()
        await super().on_new_client()  # the subscriptions re-bind on the new generation

    async def _publish(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        if not self._nc.is_connected:
            raise self._not_connected(f"cannot publish to {topic!r}")
        message_id = new_message_id(headers)
        hdrs = dict(headers) if headers else {}
        hdrs[ID_HEADER] = message_id
        hdrs[_MSG_ID] = message_id
        for attempt in (1, 2):
            if topic not in self._streams:
                await self._ensure_stream(topic)
            try:
                await self._js.publish(topic, data, timeout=self.publish_timeout, headers=hdrs)
                return
            except nats.js.errors.NoStreamResponseError as e:
                self._streams.pop(topic, None)  # deleted behind our back: create it again
                if attempt == 2:
                    raise self._error(f"no JetStream stream captures {topic!r}", e) from e
            except nats.errors.TimeoutError as e:
                raise Unavailable(
                    f"no publish ack for {topic!r} from {redact(self.url)} within "
                    f"{self.publish_timeout:g} s; message {message_id} may or may not be stored "
                    f"(republishing it with the same {ID_HEADER} header is de-duplicated)") from e
            except nats.errors.Error as e:
                raise self._error(f"cannot publish to {topic!r}", e) from e

    async def _subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None,
                         durable: str | None, prefetch: int | None) -> JetStreamSubscription:
        if self._tg is None:
            raise BrokerError(f"cannot subscribe to {topic!r}: broker {redact(self.url)} is closed")
        if not self._nc.is_connected:
            raise self._not_connected(f"cannot subscribe to {topic!r}")
        sub = JetStreamSubscription(self, topic, handler, queue, durable, prefetch or self.fetch_batch)
        await sub._bind()
        self._tg.start_soon(sub._run, name=f"micro.broker.jetstream:{topic}")
        self._subs.add(sub)
        return sub

    async def _ensure_stream(self, topic: str) -> str:
        """The stream that captures ``topic``: an existing one, or ``<first token>`` made here."""
        name = self._streams.get(topic)
        if name is not None:
            return name
        first = topic.split(".", 1)[0]
        if first in ("*", ">"):
            raise UsageError(f"JetStream topic {topic!r} must start with a literal token: "
                             "streams are made per first token")
        jsm = self._jsm
        try:
            try:
                name = await jsm.find_stream_name_by_subject(topic)
            except nats.js.errors.NotFoundError:
                config = StreamConfig(
                    name=_safe_name(first), subjects=[first, f"{first}.>"],
                    retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                    max_age=self.max_age or None, duplicate_window=120.0)
                try:
                    name = (await jsm.add_stream(config)).config.name
                except nats.js.errors.BadRequestError as e:
                    try:  # raced with another creator, or an operator's stream overlaps
                        name = await jsm.find_stream_name_by_subject(topic)
                    except nats.js.errors.NotFoundError:
                        raise BrokerError(f"cannot create JetStream stream {config.name!r} for "
                                          f"{topic!r} on {redact(self.url)}: {e.description}") from e
        except nats.errors.Error as e:
            raise self._error(f"cannot find or create the stream for {topic!r}", e) from e
        assert isinstance(name, str)
        if len(self._streams) >= 4096:
            self._streams.clear()
        self._streams[topic] = name
        return name
