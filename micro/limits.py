"""Overload protection: a per-service limit on calls in flight, with a bounded queue.

Past ``max_concurrency`` calls in flight, up to ``max_queue`` more wait their turn
(first come, first served); beyond that a call fails at once with
``ResourceExhausted`` instead of piling up memory. It applies on both paths (in
process and over gRPC). Streaming endpoints are not counted: their slot would be
held for as long as the client keeps reading.

Over the network the check runs before the request body is read
(:meth:`Limiter.check`), and :class:`BodyBudget` bounds the request bytes a server
holds while bodies arrive: each call reserves the size its message announces, per
connection and per server, and one past either bound fails at once with
``ResourceExhausted``. Two hundred clients announcing 4 MiB and sending all but the
last byte held 930 MiB before; now they hold at most the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterator
from typing import Any

from micro import metrics
from micro.errors import ResourceExhausted, UsageError
from micro.middleware import Next, Request


class Limiter:
    """A handler wrapper that bounds concurrent and queued calls of one service."""

    def __init__(self, service: str, max_concurrency: int, max_queue: int = 0) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise UsageError(f"{service}: max_concurrency must be >= 1 and max_queue >= 0")
        self.service = service
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiting = 0
        self.rejected = 0
        self._slots = asyncio.Semaphore(max_concurrency)

    def check(self) -> None:
        """Refuse now (``ResourceExhausted``) if a call arriving now would be refused: before its body is read."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise self._refusal()

    def _refusal(self) -> ResourceExhausted:
        self.rejected += 1
        metrics.count("overload", self.service)
        return ResourceExhausted(f"{self.service} is at its limit of {self.max_concurrency} calls in flight "
                                 f"and {self.max_queue} queued: retry later")

    def __call__(self, next: Next) -> Next:
        async def limited(req: Request) -> Any:
            if req.streaming:
                return await next(req)
            if self._slots.locked():
                if self.waiting >= self.max_queue:
                    raise self._refusal()
                self.waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self.waiting -= 1
            else:
                await self._slots.acquire()
            self.in_flight += 1
            try:
                return await next(req)
            finally:
                self.in_flight -= 1
                self._slots.release()

        return limited


DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
"""Request bytes one server holds while bodies arrive (all connections)."""
DEFAULT_MAX_CONNECTION_BUFFERED_BYTES = 16 * 1024 * 1024
"""Request bytes one connection may have a server hold while its bodies arrive."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a request body may take to arrive once its call has started."""


class BodyBudget:
    """The request bytes a server holds while bodies arrive, bounded per server and per connection.

    ``hold(size, connection)`` reserves ``size`` bytes (what the message announces, so
    a client that announces much and sends little is counted in full) for as long as
    the ``with`` block runs. ``buffered`` is the total held now, ``peak`` the most ever
    held, ``refused`` the calls turned away.
    """

    def __init__(self, where: str, max_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
                 max_connection_bytes: int = DEFAULT_MAX_CONNECTION_BUFFERED_BYTES) -> None:
        if max_bytes < 1 or max_connection_bytes < 1:
            raise UsageError(f"{where}: max_buffered_bytes and max_connection_buffered_bytes must be >= 1")
        self.where = where
        self.max_bytes = max_bytes
        self.max_connection_bytes = max_connection_bytes
        self.buffered = 0
        self.peak = 0
        self.refused = 0
        self._by_connection: dict[Hashable, int] = {}

    def reserve(self, size: int, connection: Hashable) -> None:
        """Count ``size`` bytes held for ``connection``, or raise ``ResourceExhausted`` past a bound."""
        used = self._by_connection.get(connection, 0)
        if self.buffered + size > self.max_bytes or used + size > self.max_connection_bytes:
            self.refused += 1
            which, limit = ((f"this connection's {used}", self.max_connection_bytes)
                            if used + size > self.max_connection_bytes else (str(self.buffered), self.max_bytes))
            raise ResourceExhausted(f"{self.where}: a request of {size} bytes would take the {which} bytes of "
                                    f"request bodies held over the limit of {limit}: retry later")
        self.buffered += size
        self.peak = max(self.peak, self.buffered)
        self._by_connection[connection] = used + size

    def release(self, size: int, connection: Hashable) -> None:
        """Give back what :meth:`reserve` counted."""
        self.buffered -= size
        left = self._by_connection[connection] - size
        if left:
            self._by_connection[connection] = left
        else:
            del self._by_connection[connection]

    @contextlib.contextmanager
    def hold(self, size: int, connection: Hashable) -> Iterator[None]:
        """:meth:`reserve` ``size`` bytes for as long as the ``with`` block runs."""
        self.reserve(size, connection)
        try:
            yield
        finally:
            self.release(size, connection)
