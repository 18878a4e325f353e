"""The core NATS broker (``nats://host:4222``): at most once, via nats-py.

Subjects are topics, queue groups are native, and a message published while nobody
listens is gone. The durable sibling, ``nats+js://``, is :mod:`micro.broker.jetstream`.

**Message ids.** Every message keeps its ``Micro-Id``, carried where it costs least
(``message_ids``, a URL option):

- ``envelope`` (the default): a message published without headers goes out as
  ``b"\\xffMI1"`` + the 32-character id + the payload, and micro subscribers take the
  id off again. nats-py's header path costs about half the throughput on both ends;
  this costs a copy of the payload. A subscriber that is not micro sees those 36
  bytes in front (``\\xff`` never starts UTF-8 text, JSON or a protobuf message);
  choose ``header`` when such subscribers read your topics.
- ``header``: the id rides in the ``Micro-Id`` header of every message.
- ``none``: a message published without headers goes out bare, and each subscriber
  makes up an id for it (ids then differ between subscribers).

A message published with headers always carries its id in the ``Micro-Id`` header.

The connection comes from :mod:`micro.nats_connection` (shared with a NATS registry
or store of the same loop and servers): connecting is bounded by ``connect_timeout``
and fails at the first error with ``Unavailable``; afterwards it reconnects for ever
(``reconnect_wait`` between attempts; ``max_reconnect`` to give up). While disconnected
``publish`` raises ``Unavailable`` at once (nothing is buffered) and subscriptions
resume after the reconnect (on a fresh client too, when nats-py gave up: see
:mod:`micro.nats_connection`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, urlsplit

try:
    import nats.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as CoreSubscription
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the nats broker needs nats-py: pip install 'micro[nats]'", name=e.name) from e

import anyio

from micro.broker._base import (
    ID_HEADER,
    Broker,
    Message,
    MessageHandler,
    Subscription,
    drain,
    new_message_id,
    stamp_message_id,
)
from micro.errors import BrokerError, ConfigError, Unavailable
from micro.nats_connection import UNAVAILABLE, NatsConnection, NatsSettings, callback_errors, connect, describe
from micro.resource import redact
from micro.tasks import BackgroundTasks

__all__ = ["ENVELOPE", "NatsBroker", "NatsSubscription"]

log = logging.getLogger("micro.broker.nats")

ENVELOPE = b"\xffMI1"
"""The first bytes of a core NATS payload that carries its message id (see the module docstring)."""
_ID_LEN = 32
_HEAD = len(ENVELOPE) + _ID_LEN
_ID_MODES = ("envelope", "header", "none")
_ID_FLAGS = {"1": "envelope", "true": "envelope", "yes": "envelope", "on": "envelope",
             "0": "none", "false": "none", "no": "none", "off": "none"}


class NatsSubscription(Subscription):
    """A core NATS subscription; nats-py runs its callbacks in one task of its own.

    nats-py calls :meth:`_callback`'s function with each message: a plain function that
    builds the :class:`Message` and returns the handler's own awaitable for nats-py to
    await, so no coroutine of micro's sits between nats-py's loop and the handler. A
    handler that raises reaches nats-py's error callback, which the connection passes to
    :meth:`_failed` (see :func:`micro.nats_connection.callback_errors`): it is logged and
    the subscription goes on. A nats-py that does not run callbacks that way (see
    :data:`_PLAIN_CALLBACKS`) gets a coroutine that awaits the handler and logs its error.
    """

    def __init__(self, broker: NatsBroker, topic: str, handler: MessageHandler, queue: str | None) -> None:
        self.topic = topic
        self.queue = queue
        self._broker = broker
        self._handler = handler
        self._closed = False
        self._sub: CoreSubscription | None = None
        self._task: asyncio.Task[Any] | None = None  # nats-py's task that runs the handler
        self._message: Message | None = None  # the message in hand

    async def _subscribe(self, nc: Client) -> None:
        """Subscribe on ``nc`` (the broker's client: at the start, or a fresh one after it gave up)."""
        self._task = None  # a fresh client's subscription runs its handler in a task of its own
        with callback_errors(self._failed):
            self._sub = await nc.subscribe(self.topic, queue=self.queue or "", cb=self._callback(),
                                           pending_msgs_limit=self._broker.pending_limit)

    def _callback(self) -> Callable[[Msg], Awaitable[None]]:
        sub, handler = self, self._handler

        def deliver(msg: Msg) -> Awaitable[None]:
            if sub._closed:
                return _nothing()  # unsubscribed: what nats-py still buffers is not delivered
            if sub._task is None:
                sub._task = asyncio.current_task()
            headers = msg.headers
            data = msg.data
            if headers:
                message = Message(msg.subject, data, headers, headers.get(ID_HEADER) or new_message_id())
            elif data[:4] == ENVELOPE and len(data) >= _HEAD:
                message_id = data[4:_HEAD].decode("ascii", "replace")
                message = Message(msg.subject, data[_HEAD:], {ID_HEADER: message_id}, message_id)
            else:  # a bare payload (message_ids="none", or a publisher that is not micro)
                message = Message(msg.subject, data, {}, new_message_id())
            sub._message = message
            return handler(message)

        if not _PLAIN_CALLBACKS:  # this nats-py may not pass a handler's error back here: catch it here
            async def catching(msg: Msg) -> None:
                try:
                    await deliver(msg)
                except Exception as e:
                    sub._log_failure(e)

            return catching

        async def as_coroutine(msg: Msg) -> None:
            await deliver(msg)

        # nats-py takes a coroutine function, or a callable whose ``func`` is one (as functools.partial)
        deliver.func = as_coroutine  # type: ignore[attr-defined]
        return deliver

    def _failed(self, error: Exception) -> bool:
        """Log ``error`` if the handler raised it: nats-py passes that on in this subscription's task
        while handling it (anything else reaching the error callback there is not ours)."""
        if asyncio.current_task() is not self._task or sys.exc_info()[1] is not error:
            return False
        self._log_failure(error)
        return True

    def _log_failure(self, error: Exception) -> None:
        message_id = self._message.id if self._message is not None else "?"
        log.error("handler for %r failed on message %s", self.topic, message_id, exc_info=error)

    async def unsubscribe(self) -> None:
        """Stop delivery and let the message in hand finish (up to ``drain_timeout``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        broker = self._broker
        broker._subs.discard(self)
        if self._sub is None:
            return
        if asyncio.current_task() is self._task and broker._tg is not None:
            # a handler unsubscribing its own subscription: drain from outside the handler
            broker._tg.start_soon(self._drain, self._sub, name=f"micro.broker.nats:unsubscribe:{self.topic}")
        else:
            await self._drain(self._sub)

    async def _drain(self, sub: CoreSubscription) -> None:
        timeout = self._broker.drain_timeout
        with anyio.move_on_after(timeout) as scope:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
                return
            except nats.errors.Error:
                pass
        if scope.cancelled_caught:
            log.warning("subscription %r did not drain within %.1f s", self.topic, timeout)
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass  # already gone with the connection


async def _nothing() -> None:
    pass


class NatsBroker(Broker):
    """Core NATS through nats-py (``nats://host:4222``; several: ``nats://a:4222,b:4222``).

    Args:
        servers: one ``nats://host:port`` URL or several.
        connect_timeout: seconds to reach the server at start before ``Unavailable``.
        reconnect_wait: seconds between reconnect attempts after a disconnect.
        max_reconnect: reconnect attempts of one nats-py client before micro replaces it
            with a fresh one (-1, the default: one client retries for ever); the broker
            never gives up (see :mod:`micro.nats_connection`).
        max_reconnect_wait: the cap (seconds) of the backoff between fresh clients.
        drain_timeout: seconds ``unsubscribe``/``aclose`` wait for handlers in progress.
        pending_limit: messages a subscription buffers before nats-py drops them.
        message_ids: where a message published without headers carries its id:
            ``"envelope"`` (default), ``"header"`` or ``"none"`` (see the module docstring);
            ``True``/``False`` mean ``"envelope"``/``"none"``.

    Example::

        async with NatsBroker("nats://127.0.0.1:4222") as broker:
            await broker.subscribe("orders.created", handle, queue="billing")
            await broker.publish("orders.created", {"id": 7})
    """

    SCHEME: ClassVar[str] = "nats"
    OPTIONS: ClassVar[dict[str, type]] = {
        "connect_timeout": float,
        "reconnect_wait": float,
        "max_reconnect": int,
        "max_reconnect_wait": float,
        "drain_timeout": float,
        "pending_limit": int,
        "message_ids": str,
    }
    """URL query options (the constructor's keyword arguments) and their types."""

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
        message_ids: str | bool = "envelope",
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.url = ",".join(s.replace("nats://", f"{self.SCHEME}://", 1) for s in self.servers)
        if isinstance(message_ids, bool):
            mode = "envelope" if message_ids else "none"
        else:
            mode = _ID_FLAGS.get(str(message_ids).lower(), str(message_ids).lower())
        if mode not in _ID_MODES:
            raise ConfigError(f"broker {redact(self.url)}: message_ids must be one of {', '.join(_ID_MODES)}, "
                              f"not {message_ids!r}")
        self.message_ids = mode
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.max_reconnect = max_reconnect
        self.drain_timeout = drain_timeout
        self.pending_limit = pending_limit
        self.settings = NatsSettings(connect_timeout=connect_timeout, reconnect_wait=reconnect_wait,
                                     max_reconnect=max_reconnect, close_timeout=drain_timeout,
                                     max_reconnect_wait=max_reconnect_wait)
        self._conn: NatsConnection | None = None
        self._nc: Client = _CLOSED
        self._gen = 0  # the connection's client generation that _nc (and JetStream contexts) belong to
        self._subs: set[Subscription] = set()
        self._id_header = mode == "header"
        self._direct = _DIRECT and not self._id_header  # see _publish
        self._id_envelope = mode == "envelope"
        self._tg: BackgroundTasks | None = None
        self._closed = False
        self._connected = asyncio.Event()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """``nats://host:4222`` (core NATS); ``nats+js://`` is :class:`~micro.broker.jetstream.JetStreamBroker`.

        Several servers are comma-separated (``nats://a:4222,b:4222``); options go in
        the query (``?drain_timeout=10&message_ids=header``) under the names of the
        constructor's keyword arguments.
        """
        parts = urlsplit(url)
        if parts.scheme != cls.SCHEME or not parts.netloc:
            raise ConfigError(f"bad broker URL {redact(url)!r}: expected {cls.SCHEME}://host:port")
        kwargs: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            kind = cls.OPTIONS.get(key)
            if kind is None:
                raise ConfigError(f"unknown option {key!r} in broker URL {redact(url)!r}; known: "
                                  f"{', '.join(sorted(cls.OPTIONS))}")
            try:
                kwargs[key] = tuple(float(v) for v in value.split(",")) if kind is tuple else kind(value)
            except ValueError:
                raise ConfigError(f"bad value {value!r} for {key!r} in broker URL {redact(url)!r}") from None
        broker = cls([f"nats://{host}" for host in parts.netloc.split(",")], **kwargs)
        broker.url = url
        return broker

    # -- lifecycle --------------------------------------------------------------

    async def _open(self) -> None:
        conn = await connect(self.url, self.settings, who="broker")
        try:
            await self._ready(conn)
            tg = BackgroundTasks(f"broker {redact(self.url)}", log)
            await tg.start()
        except BaseException:
            await conn.release()
            raise
        self._conn = conn
        self._nc = conn.client
        self._gen = conn.generation
        self._closed = False
        self._connected.set()
        conn.listeners.add(self)
        self._tg = tg

    async def _ready(self, conn: NatsConnection) -> None:
        """Check what the broker needs of the server, once connected (JetStream: that it is on)."""

    async def _close(self) -> None:
        self._closed = True
        try:
            await drain(self._subs)
            if self._tg is not None:
                tg, self._tg = self._tg, None
                await tg.aclose()
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.listeners.discard(self)
                await conn.release()
            self._nc = _CLOSED

    async def on_disconnected(self) -> None:
        self._connected.clear()

    async def on_reconnected(self) -> None:
        self._connected.set()

    async def on_closed(self) -> None:
        self._connected.clear()  # the connection starts over with a fresh client: on_new_client

    async def on_new_client(self) -> None:
        conn = self._conn
        if conn is None or self._closed:
            return
        self._nc = conn.client
        self._gen = conn.generation
        for sub in list(self._subs):
            if isinstance(sub, NatsSubscription) and not sub._closed:
                try:
                    await sub._subscribe(self._nc)
                except nats.errors.Error as e:
                    log.error("subscription %r on %s not resumed on the fresh connection: %s",
                              sub.topic, redact(self.url), describe(e))
        self._connected.set()

    # -- publish / subscribe ----------------------------------------------------

    def _publish(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> Coroutine[Any, Any, None]:
        if headers or not self._direct:
            return self._publish_checked(topic, data, headers)
        return self._send(topic, data)

    async def _send(self, topic: str, data: bytes) -> None:
        # The hot path (a message without headers, ids not in headers, nats-py with the internals
        # of _DIRECT): what Client.publish does after its checks, done here in one step with the
        # check, when the publish is awaited, so no other coroutine is made for it. The state
        # check and the append to nats-py's buffer happen with nothing awaited between them: a
        # publish awaited later (gather, create_task) is checked then, like any other backend's,
        # and a broker reconnecting, on a replaced client or closed raises Unavailable
        # (_publish_checked) instead of buffering into a client that may never send it.
        # Client.publish would also check the subject (micro's topics are valid subjects).
        nc = self._nc
        if nc._status != _CONNECTED or len(data) + _HEAD > nc._max_payload:
            return await self._publish_checked(topic, data, None)
        if self._id_envelope:
            data = stamp_message_id(ENVELOPE, data)
        size = len(data)
        command = b"PUB %b  %d\r\n%b\r\n" % (topic.encode(), size, data)  # nats-py's pub_cmd, reply ""
        nc._pending.append(command)
        pending = nc._pending_data_size = nc._pending_data_size + len(command)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        if 0 < nc._max_pending_size < pending:
            await nc._flush_pending(force_flush=True)  # the buffer is full: wait for the socket, as nats-py does
        elif nc._flush_queue.empty():  # type: ignore[union-attr]
            await nc._flush_pending()  # kick nats-py's flusher

    async def _publish_checked(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        nc = self._nc
        if not nc.is_connected:
            raise self._not_connected(f"cannot publish to {topic!r}")
        try:
            if headers or self._id_header:
                message_id = new_message_id(headers)
                await nc.publish(topic, data, headers={**(headers or {}), ID_HEADER: message_id})
            elif self._id_envelope:
                await nc.publish(topic, stamp_message_id(ENVELOPE, data))
            else:
                await nc.publish(topic, data)  # the bare payload
        except nats.errors.Error as e:
            raise self._error(f"cannot publish to {topic!r}", e) from e

    async def _subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None,
                         durable: str | None, prefetch: int | None) -> Subscription:
        if not self._nc.is_connected:
            raise self._not_connected(f"cannot subscribe to {topic!r}")
        sub = NatsSubscription(self, topic, handler, queue)
        try:
            await sub._subscribe(self._nc)
        except nats.errors.Error as e:
            raise self._error(f"cannot subscribe to {topic!r}", e) from e
        self._subs.add(sub)
        return sub

    async def check(self) -> None:
        await super().check()
        if not self._nc.is_connected:
            raise self._not_connected("cannot deliver")

    def _not_connected(self, what: str) -> Unavailable:
        state = "closed" if self._closed or self._nc is _CLOSED else "disconnected, reconnecting"
        return Unavailable(f"{what}: broker {redact(self.url)} is {state}")

    def _error(self, what: str, e: BaseException) -> BrokerError | Unavailable:
        if isinstance(e, UNAVAILABLE) or not self._nc.is_connected:
            return Unavailable(f"{what}: broker {redact(self.url)}: {describe(e)}")
        return BrokerError(f"{what}: broker {redact(self.url)}: {describe(e)}")


_CLOSED = Client()  # stands in for the connection while the broker is not open: never connected

_CONNECTED = getattr(Client, "CONNECTED", None)


def _has_pub_internals() -> bool:
    """Whether this nats-py has what :meth:`NatsBroker._send` uses (see :data:`_DIRECT`)."""
    try:
        from nats.protocol.command import pub_cmd
    except ImportError:
        return False
    client = _CLOSED
    stats = getattr(client, "stats", None)
    flush = getattr(Client, "_flush_pending", None)
    return (_CONNECTED is not None and isinstance(getattr(client, "_status", None), int)
            and isinstance(getattr(client, "_max_payload", None), int)
            and type(getattr(client, "_pending", None)) is list
            and isinstance(getattr(client, "_pending_data_size", None), int)
            and isinstance(getattr(client, "_max_pending_size", None), int)
            and hasattr(client, "_flush_queue")
            and isinstance(stats, dict) and {"out_msgs", "out_bytes"} <= stats.keys()
            and inspect.iscoroutinefunction(flush)
            and list(inspect.signature(flush).parameters) == ["self", "force_flush"]
            and pub_cmd("a.b", "", b"xy") == b"PUB a.b  2\r\nxy\r\n")


_DIRECT = _has_pub_internals()
"""Whether this nats-py has what the hot path of :meth:`NatsBroker._publish` uses, the steps
``Client.publish`` takes after its checks (nats-py 2.x): the client's state and size limit
(``_status``, ``_max_payload``), its pending buffer (``_pending``, ``_pending_data_size``,
``_max_pending_size``, ``stats``), the kick of its flusher (``_flush_queue``, ``_flush_pending``)
and the same PUB bytes. Without them every publish goes through ``Client.publish``."""


def _passes_callback_errors(subscription: type[CoreSubscription]) -> bool:
    """Whether nats-py's ``subscription`` runs a callback as :class:`NatsSubscription` relies on
    (see :data:`_PLAIN_CALLBACKS`), read from its source (no task, no connection at import)."""
    try:
        start = inspect.getsource(subscription._start)
        wait = inspect.getsource(subscription._wait_for_msgs)
    except (AttributeError, OSError, TypeError):
        return False
    return (re.search(r'hasattr\(self\._cb, "func"\) and inspect\.iscoroutinefunction\(self\._cb\.func\)', start)
            is not None
            and re.search(r"create_task\(self\._wait_for_msgs\(error_cb\)\)", start) is not None
            and re.search(r"await self\._cb\(msg\)\s*\n(?:\s*#.*\n)*\s*except asyncio\.CancelledError:", wait)
            is not None
            and re.search(r"except Exception as (\w+):\s*\n(?:\s*#.*\n)*\s*if error_cb:\s*\n\s*await error_cb\(\1\)",
                          wait) is not None)


_PLAIN_CALLBACKS = _passes_callback_errors(CoreSubscription)
"""Whether this nats-py runs a subscription's callback the way :meth:`NatsSubscription._callback`'s
plain function needs (nats-py 2.x): it takes a callable whose ``func`` is a coroutine function,
runs it in a task made in ``subscribe`` (so the task's context is a copy of the one
:func:`~micro.nats_connection.callback_errors` set), and awaits the error callback inside the
``except`` block around the callback, in that task. Without that, each message goes through a
coroutine of micro's that catches and logs the handler's exception itself."""
