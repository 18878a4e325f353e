"""The in-process broker: topics inside one event loop, no I/O.

Each subscription owns a bounded buffer and one worker task (in the broker's task
group) that awaits the handler for one message at a time, so a slow subscriber
never blocks the publisher or its siblings. When a buffer is full the **oldest**
message in it is dropped and counted (:attr:`MemorySubscription.dropped`, with a
warning in the log): the publisher never waits and never fails because of a slow
consumer. ``publish`` yields to the loop once when a buffer is past half full,
so a tight publishing loop lets consumers catch up before anything is dropped.

Wildcards (``*``, ``>``) and queue groups (round-robin among members, skipping a
member whose buffer is full when another has room) behave as on NATS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

import anyio

from micro.broker._base import (
    ID_HEADER,
    Broker,
    Message,
    MessageHandler,
    Subscription,
    drain,
    drain_then_cancel,
    new_message_id,
)
from micro.errors import ConfigError
from micro.tasks import BackgroundTasks

__all__ = ["DEFAULT_QUEUE_SIZE", "MemoryBroker", "MemorySubscription", "topic_matches"]

log = logging.getLogger("micro.broker.memory")

DEFAULT_QUEUE_SIZE = 1024
"""Messages a subscription buffers before the oldest is dropped."""

_CLOSE = Message(topic="", data=b"")  # sentinel: the worker stops after the messages before it
_ROUTE_CACHE_LIMIT = 4096


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` under NATS wildcard rules."""
    if pattern == topic:
        return True
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


class MemorySubscription(Subscription):
    """A subscription's buffer and worker. ``dropped`` counts messages lost to a full buffer."""

    def __init__(
        self,
        broker: MemoryBroker,
        topic: str,
        handler: MessageHandler,
        queue: str | None,
        size: int,
    ) -> None:
        self.topic = topic
        self.queue = queue
        self.dropped = 0
        self._broker = broker
        self._handler = handler
        self._size = size
        self._buf: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._task: asyncio.Task[object] | None = None
        self._closed = False

    def _full(self) -> bool:
        return len(self._buf) >= self._size

    def _push(self, message: Message) -> bool:
        """Buffer ``message``; return whether the buffer is past its high-water mark."""
        buf = self._buf
        if len(buf) >= self._size:
            buf.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "subscription %r (queue %r) is too slow: %d message(s) dropped "
                    "(buffer of %d full)", self.topic, self.queue, self.dropped, self._size,
                )
        buf.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return len(buf) * 2 > self._size

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        try:
            with self._scope:
                buf, handler = self._buf, self._handler
                loop = asyncio.get_running_loop()
                while True:
                    while buf:
                        message = buf.popleft()
                        if message is _CLOSE:
                            return
                        try:
                            await handler(message)
                        except Exception:
                            log.exception("handler for %r failed on message %s",
                                          self.topic, message.id)
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
        finally:
            self._done.set()

    async def unsubscribe(self) -> None:
        if not self._closed:
            self._closed = True
            self._broker._remove(self)
            self._buf.clear()  # what is not in hand yet is not delivered
            self._buf.append(_CLOSE)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        if self._task is not None and self._task is asyncio.current_task():
            return  # a handler unsubscribing its own subscription: the worker stops after it
        await drain_then_cancel(self._done, self._scope, self._broker.drain_timeout,
                                f"subscription {self.topic!r}", running=self._task is not None)


_Route = tuple[list[MemorySubscription], list[list[MemorySubscription]]]
"""Plain subscriptions and queue groups that a topic reaches."""


class MemoryBroker(Broker):
    """Topics in one process.

    Args:
        queue_size: messages each subscription buffers before the oldest is dropped.
        drain_timeout: seconds ``unsubscribe``/``aclose`` wait for the message in hand
            before cancelling its handler (buffered messages are discarded).

    Example::

        async with MemoryBroker() as broker:
            await broker.subscribe("events.*", handle)
            await broker.publish("events.created", {"id": 1})
    """

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, drain_timeout: float = 5.0) -> None:
        if queue_size < 1:
            raise ConfigError(f"memory broker: queue_size must be at least 1, not {queue_size}")
        self.url = "memory://"
        self.queue_size = queue_size
        self.drain_timeout = drain_timeout
        self._subs: list[MemorySubscription] = []
        self._routes: dict[str, _Route] = {}
        self._rr: dict[tuple[str, str], int] = {}
        self._tg: BackgroundTasks | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        """``memory://`` with optional ``?queue_size=N&drain_timeout=S``."""
        options = dict(parse_qsl(urlsplit(url).query))
        try:
            queue_size = int(options.pop("queue_size", DEFAULT_QUEUE_SIZE))
            drain_timeout = float(options.pop("drain_timeout", 5.0))
        except ValueError as e:
            raise ConfigError(f"bad option in broker URL {url!r}: {e}") from None
        if options:
            raise ConfigError(
                f"unknown option(s) {sorted(options)} in broker URL {url!r}: "
                "memory:// takes queue_size and drain_timeout"
            )
        broker = cls(queue_size=queue_size, drain_timeout=drain_timeout)
        broker.url = url
        return broker

    async def _open(self) -> None:
        tg = BackgroundTasks(f"broker {self.url}", log)
        await tg.start()
        self._tg = tg
        self._closed = False

    async def _close(self) -> None:
        self._closed = True
        try:
            await drain(self._subs)
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                await tg.aclose()

    async def _publish(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
        if headers:
            message_id = new_message_id(headers)
            hdrs = {**headers, ID_HEADER: message_id}
        else:
            message_id = new_message_id()
            hdrs = {ID_HEADER: message_id}
        msg = Message(topic=topic, data=data, headers=hdrs, id=message_id)
        crowded = False
        plain, groups = route
        for sub in plain:
            crowded = sub._push(msg) or crowded
        for members in groups:
            crowded = self._pick(members)._push(msg) or crowded
        if crowded:
            await asyncio.sleep(0)  # let consumers run before the publisher fills their buffers

    async def _subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None,
                         durable: str | None, prefetch: int | None) -> MemorySubscription:
        assert self._tg is not None
        sub = MemorySubscription(self, topic, handler, queue, self.queue_size)
        self._subs.append(sub)
        self._routes.clear()
        self._tg.start_soon(sub._run, name=f"micro.broker.memory:{topic}")
        return sub

    def _remove(self, sub: MemorySubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._routes.clear()

    def _route(self, topic: str) -> _Route:
        plain: list[MemorySubscription] = []
        grouped: dict[tuple[str, str], list[MemorySubscription]] = {}
        for sub in self._subs:
            if topic_matches(sub.topic, topic):
                if sub.queue is None:
                    plain.append(sub)
                else:
                    grouped.setdefault((sub.topic, sub.queue), []).append(sub)
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        route = (plain, list(grouped.values()))
        self._routes[topic] = route
        return route

    def _pick(self, members: list[MemorySubscription]) -> MemorySubscription:
        """Round-robin within a queue group, skipping full members while one has room."""
        first = members[0]
        key = (first.topic, first.queue or "")
        n = len(members)
        start = self._rr.get(key, 0)
        self._rr[key] = start + 1
        for i in range(n):
            sub = members[(start + i) % n]
            if not sub._full():
                return sub
        return members[start % n]
