"""Pooled grpclib connections to one node.

One HTTP/2 connection carries at most ``max_streams`` calls at once (the server's
limit; grpclib's default is 100). Past that, grpclib's client parks every waiting
call on one event and wakes them all whenever any stream closes, which collapses
throughput above ~100 calls in flight. The pool never lets that happen: a call
takes a slot on the least busy connection, a new connection opens when all are
at the limit, and past ``max_connections * max_streams`` calls wait in FIFO order
on a semaphore.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

from grpclib.client import Channel
from grpclib.client import Handler as ClientHandler
from grpclib.client import Stream as ClientStream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline, _Metadata
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from grpclib.utils import DeadlineWrapper, Wrapper
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from multidict import MultiDict

from micro.codec import JSON, PROTO
from micro.errors import Error, Timeout, Unavailable
from micro.server.grpc import CODECS, DRAINING

# hpack logs every header it encodes or decodes, values included, at DEBUG: with
# debug logging on, bearer tokens in call metadata would reach the logs. Keep it
# at INFO (set it back explicitly after importing micro to debug HTTP/2 framing).
_hpack_log = logging.getLogger("hpack")
if _hpack_log.level < logging.INFO:
    _hpack_log.setLevel(logging.INFO)


class NodeUnreachable(Unavailable):
    """The node could not be reached at all: nothing was sent, another node may be tried."""


class _Wrapper(Wrapper):
    """grpclib's wrapper, remembering which tasks it cancelled.

    On a deadline or a lost connection grpclib cancels the task waiting on the stream
    and raises its own error in place of the ``CancelledError``, but never takes the
    cancellation back (``Task.uncancel()``). The caller's task would stay "cancelling"
    for good, and every later ``asyncio.timeout`` or anyio cancel scope in it would
    mistake its own expiry for an outside cancellation (a service's ``async with``
    exit then raised ``CancelledError`` after any call that had timed out).
    """

    def __init__(self) -> None:
        super().__init__()
        self.hit: list[asyncio.Task[Any]] = []
        self.unprocessed: str | None = None  # why the server said it never processed this call (a GOAWAY)

    def cancel(self, error: Exception) -> None:
        self.hit.extend(self._tasks)
        super().cancel(error)


class _DeadlineWrapper(_Wrapper, DeadlineWrapper):
    pass


class _Events(EventsProcessor):
    """grpclib's client events, marking the calls a GOAWAY says the server never processed.

    grpclib ends every call on a GOAWAY alike, then again with "Connection lost", and
    drops the frame's last stream id. By HTTP/2 (RFC 9113, 6.8) a stream above that id
    was not processed and may be sent again elsewhere: a server refusing connections at
    its limit (``ENHANCE_YOUR_CALM``, last stream id 0) or one closing gracefully. Such
    a call becomes :class:`NodeUnreachable`, so even a non-idempotent one goes to
    another node, as on the native wire.
    """

    def __init__(self, handler: ClientHandler, connection: Connection, protocol: _Protocol) -> None:
        super().__init__(handler, connection)
        self.protocol = protocol

    def process_connection_terminated(self, event: ConnectionTerminated) -> None:
        last = event.last_stream_id or 0
        code = event.error_code
        why = (event.additional_data or b"").decode("utf-8", "replace")
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        self.protocol.goaway = reason = f"{why} (GOAWAY {name})" if why else f"GOAWAY {name}"
        for stream in self.streams.values():
            if stream.id is not None and stream.id > last and isinstance(stream.wrapper, _Wrapper):
                stream.wrapper.unprocessed = reason
        super().process_connection_terminated(event)


class _Protocol(H2Protocol):
    goaway: str | None = None
    """Why the server closed this connection (its GOAWAY), if it did."""

    def __init__(self, config: Any, h2_config: Any) -> None:
        super().__init__(ClientHandler(), config, h2_config)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.processor = _Events(cast(ClientHandler, self.handler), self.connection, self)


class _Channel(Channel):
    """A grpclib channel whose connections tell which calls a GOAWAY left unprocessed."""

    def _protocol_factory(self) -> H2Protocol:
        return _Protocol(self._config, self._h2_config)


class _Stream(ClientStream[Any, Any]):
    """A client stream whose wrappers can give back the cancellations they made."""

    _wrapper: _Wrapper
    _protocol: _Protocol | None = None  # the connection its request went to (once connected)

    async def send_request(self, *, end: bool = False) -> None:
        # the connection, noted before grpclib sends on it: a GOAWAY that closed it before the request left
        # is this call's; one an earlier connection of the channel got is not (a failed reconnect since)
        with self._wrapper:
            protocol = await self._channel.__connect__()
        if isinstance(protocol, _Protocol):
            self._protocol = protocol
        await super().send_request(end=end)

    async def __aenter__(self) -> _Stream:
        if self._deadline is None:
            self._wrapper = _Wrapper()
        else:
            self._wrapper = _DeadlineWrapper()
            self._wrapper_ctx = self._wrapper.start(self._deadline)
            self._wrapper_ctx.__enter__()
        self._channel._calls_started += 1
        self._channel._last_call_started = time.monotonic()
        return self

    def take_back_cancellations(self) -> None:
        """Undo the ``Task.cancel()`` calls grpclib made on the current task."""
        task = asyncio.current_task()
        wrapper = getattr(self, "_wrapper", None)
        if task is None or wrapper is None:
            return
        for hit in wrapper.hit:
            if hit is task:
                task.uncancel()
        wrapper.hit.clear()

    def unprocessed(self) -> str | None:
        """Why the server never processed this call, or ``None``: a GOAWAY above its stream, or one that
        closed the connection before the request was sent (uvloop hands the GOAWAY over while connecting)."""
        wrapper = getattr(self, "_wrapper", None)
        if isinstance(wrapper, _Wrapper) and wrapper.unprocessed is not None:
            return wrapper.unprocessed
        if not self._send_request_done and self._protocol is not None:
            return self._protocol.goaway
        return None


class _Conn:
    __slots__ = ("channel", "inflight")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.inflight = 0


class Places:
    """The calls in flight to one node, at most ``capacity`` (streams and unary calls alike).

    A call takes a place at once while one is free and nobody waits (:meth:`take_now`,
    no coroutine); otherwise it waits, first come first served, never past its
    deadline (:meth:`take`). :meth:`release` hands the place to the first caller still
    waiting. Both pools (gRPC and the native wire) bound their calls with it.
    """

    __slots__ = ("_waiters", "address", "capacity", "inflight")

    def __init__(self, capacity: int, address: str) -> None:
        self.capacity = capacity
        self.address = address
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a place if one is free and nobody waits for one."""
        if self.inflight < self.capacity and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def take(self, path: str, deadline: float | None) -> None:
        """Wait for a place (first come, first served), no longer than ``deadline`` (then ``Timeout``)."""
        if self.take_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        placed = False
        try:
            if deadline is None:
                await waiter
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter
            placed = True
        except TimeoutError:
            raise Timeout(f"{path} on {self.address}: the deadline passed while the call waited for one of the "
                          f"{self.capacity} places in flight to this node") from None
        finally:
            if not placed:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # handed a place it will not use: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self) -> None:
        """Give a place back: to the first caller still waiting for one, else to the pool."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)  # the place passes to it: calls in flight stay the same
                return
        self.inflight -= 1


class NodePool:
    """Connections to one ``host:port``."""

    wire = "grpc"

    def __init__(self, address: str, *, max_streams: int = 100, max_connections: int = 16,
                 ssl: _ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.max_streams = max_streams
        self.max_connections = max_connections
        self._ssl = ssl
        self._conns: list[_Conn] = []
        self.places = Places(max_streams * max_connections, address)

    def _take(self) -> _Conn:
        best: _Conn | None = None
        for c in self._conns:
            if best is None or c.inflight < best.inflight:
                best = c
        if best is None or best.inflight >= self.max_streams:
            best = _Conn(_Channel(self.host, self.port, ssl=self._ssl))
            self._conns.append(best)
        best.inflight += 1
        return best

    def _stream(self, conn: _Conn, path: str, wire: str, card: Cardinality,
                deadline: float | None, metadata: Mapping[str, str] | None) -> _Stream:
        grpc_deadline = None
        if deadline is not None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise Timeout(f"deadline passed before calling {path} on {self.address}")
            grpc_deadline = Deadline.from_timeout(remaining)
        ch = conn.channel
        md = _Metadata(MultiDict[str | bytes](metadata or {}))
        return _Stream(
            ch, path, md, card, bytes, bytes,
            codec=CODECS[wire], status_details_codec=None,
            dispatch=ch.__dispatch__, deadline=grpc_deadline,
        )

    async def unary(self, path: str, data: bytes, *, wire: str = JSON,
                    deadline: float | None = None,
                    metadata: Mapping[str, str] | None = None) -> bytes:
        """One request, one reply; gRPC status mapped to ``micro.errors``."""
        places = self.places
        if not places.take_now():
            await places.take(path, deadline)
        try:
            conn = self._take()
            try:
                stream = self._stream(conn, path, wire, Cardinality.UNARY_UNARY, deadline, metadata)
                try:
                    async with stream:
                        await stream.send_message(data, end=True)
                        reply = await stream.recv_message()
                except Exception as exc:
                    stream.take_back_cancellations()
                    raise self._translate(exc, path, stream) from None
            finally:
                conn.inflight -= 1
        finally:
            places.release()
        if reply is None:
            raise Unavailable(f"{self.address} closed {path} without a reply")
        return bytes(reply)

    async def server_stream(self, path: str, data: bytes, *, wire: str = JSON,
                            deadline: float | None = None,
                            metadata: Mapping[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        """One request, a stream of replies."""
        places = self.places
        await places.take(path, deadline)
        try:
            conn = self._take()
            try:
                stream = self._stream(conn, path, wire, Cardinality.UNARY_STREAM, deadline, metadata)
                try:
                    async with stream:
                        await stream.send_message(data, end=True)
                        async for reply in stream:
                            yield bytes(reply)
                except Exception as exc:
                    stream.take_back_cancellations()
                    raise self._translate(exc, path, stream) from None
            finally:
                conn.inflight -= 1
        finally:
            places.release()  # stopped early, failed or done: the place goes now

    def _translate(self, exc: Exception, path: str, stream: _Stream) -> Exception:
        if isinstance(exc, Error):
            return exc
        refused = stream.unprocessed()
        if refused is not None:
            return NodeUnreachable(f"{path}: node {self.address} refused the call before processing it: {refused}")
        if isinstance(exc, GRPCError):
            if exc.status is Status.UNAVAILABLE and exc.message == DRAINING:
                return NodeUnreachable(f"{path}: node {self.address} is shutting down")
            return Error.from_status(exc.status, exc.message)
        if isinstance(exc, asyncio.TimeoutError):
            return Timeout(f"{path} on {self.address}: deadline exceeded")
        if isinstance(exc, ConnectionError | OSError):
            return NodeUnreachable(f"{path}: node {self.address} is unreachable ({exc or type(exc).__name__})")
        if isinstance(exc, StreamTerminatedError):
            return Unavailable(f"{path}: node {self.address} dropped the call ({exc})")
        return exc

    def connected(self) -> list[str]:
        """How each open connection reaches the node: ``"grpc"`` (HTTP/2 over TCP)."""
        return ["grpc" for _ in self._conns]

    def close(self) -> None:
        for c in self._conns:
            c.channel.close()
        self._conns.clear()


__all__ = ["JSON", "PROTO", "NodePool", "NodeUnreachable", "Places"]
