"""Pooled connections to one node on micro's native wire.

The native twin of :class:`~micro.client.pool.NodePool`, with the same two calls
(``unary`` and ``server_stream``) and the same errors, so the client's retries,
breakers and node selection treat both wires alike. One connection carries many
calls, matched by request id; a pool opens another only when every connection
carries ``max_streams`` calls, up to ``max_connections``, and past that calls wait
for a place (never past their deadline).

Deadlines are enforced here (the call fails with ``Timeout`` and a CANCEL frame
stops the handler) and sent as a relative timeout that the server enforces too. A
caller that is cancelled cancels the handler the same way. Stream items are read
under a credit window: the server sends at most ``STREAM_WINDOW`` items the caller
has not taken, so a slow consumer holds the server back instead of growing either
side's memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl as _ssl
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from typing import cast

from micro.codec import JSON, PROTO
from micro.connections import write_all
from micro.deadlines import Watchdog
from micro.errors import Error, ResourceExhausted, Status, Timeout, Unavailable
from micro.wire import frames as f
from micro.wire import unix
from micro.wire.server import DRAINING

from .pool import NodeUnreachable, Places

log = logging.getLogger("micro.wire")

_PING_BODY = b"keepaliv"


class _Stream:
    """The items of one stream call as they arrive; the consumer takes them in order."""

    __slots__ = ("done", "error", "items", "taken", "waiter")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: Exception | None = None
        self.taken = 0

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Connection(asyncio.Protocol):
    """One connection to a node: calls in flight by request id."""

    def __init__(self, pool: NativePool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = f.FrameReader(pool.max_message_size)
        self.calls: dict[int, asyncio.Future[bytes] | _Stream] = {}
        self.ids = itertools.count(1)
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.draining = False
        self.lost: Exception | None = None
        self.last_seen = self.loop.time()
        self._preface = b""
        self._out: list[bytes] = []
        self._flushing = False

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.draining and self.transport is not None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.transport.write(f.preface())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.lost is None:
            detail = f" ({exc})" if exc else ""
            self.lost = Unavailable(f"node {self.pool.address} dropped the call: the connection closed{detail}")
        if not self.ready.done():
            self.ready.set_exception(NodeUnreachable(str(self.lost)))
            self.ready.exception()  # retrieved: nobody may be waiting for it
        self._fail_all(self.lost)
        self.pool.forget(self)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        if not self.ready.done():
            data = self._greet(data)
            if not data:
                return
        try:
            frames = self.reader.feed(data)
        except f.ProtocolError as exc:
            self.close(Unavailable(f"node {self.pool.address} broke the native wire: {exc}"))
            return
        calls = self.calls
        for kind, rid, flags, _, body, length in frames:
            call = calls.get(rid)
            if kind == f.RESPONSE:
                if call is not None and not isinstance(call, _Stream):
                    del calls[rid]
                    if not call.done():
                        if flags & f.OVERSIZE:
                            call.set_exception(ResourceExhausted(
                                f"response of {length} bytes from {self.pool.address} is over the client's "
                                f"{self.pool.max_message_size}-byte limit"))
                        else:
                            call.set_result(body)
                # a reply to a call that is gone (cancelled, timed out): nothing waits for it
            elif kind == f.ITEM:
                if isinstance(call, _Stream) and not call.done:
                    if flags & f.OVERSIZE:
                        self._end(rid, call, ResourceExhausted(
                            f"stream item of {length} bytes from {self.pool.address} is over the client's "
                            f"{self.pool.max_message_size}-byte limit"))
                        self.send(f.frame(f.CANCEL, rid))
                    else:
                        call.items.append(body)
                        call.wake()
            elif kind == f.END:
                if isinstance(call, _Stream):
                    self._end(rid, call, None)
            elif kind == f.ERROR:
                status, message = f.read_error(body)
                if rid == 0:
                    self.close(_error(status, message, self.pool.address))
                    return
                err = _error(status, message, self.pool.address)
                if isinstance(call, _Stream):
                    self._end(rid, call, err)
                elif call is not None:
                    del calls[rid]
                    if not call.done():
                        call.set_exception(err)
            elif kind == f.GOAWAY:
                self.draining = True  # calls in flight finish; new ones go to another connection
            elif kind == f.PING:
                self.send(f.frame(f.PONG, rid, body[:8]))
            elif kind == f.PONG:
                pass
            else:
                self.close(Unavailable(f"node {self.pool.address} sent a {f.NAMES[kind]} frame, "
                                       "which servers do not send"))
                return
        if frames and not self._flushing:
            # queued after the callers woken above: the calls they make next go out in one write in the
            # next loop iteration, not the one after
            self._flushing = True
            self.loop.call_soon(self._flush)
        if self.draining:
            self.close_drained()

    def close_drained(self) -> None:
        """After the server's GOAWAY, close the connection once no call on it waits for an answer: the
        server waits for that before it closes, so no request of ours is cut off on the way."""
        t = self.transport
        if not self.calls and t is not None and not t.is_closing():
            self._flush()
            t.close()

    def _greet(self, data: bytes) -> bytes:
        need = f.PREFACE_SIZE - len(self._preface)
        self._preface += data[:need]
        if len(self._preface) < f.PREFACE_SIZE:
            return b""
        try:
            version = f.read_preface(self._preface)
        except f.ProtocolError as exc:
            # an ERROR frame instead of the preface: the server refused us (a version it does not speak)
            try:
                kind = f.HEADER.unpack_from(self._preface + data[need:])[2]
            except Exception:
                kind = 0
            if kind == f.ERROR:
                try:
                    frames = f.FrameReader(self.pool.max_message_size).feed(self._preface + data[need:])
                    _, message = f.read_error(frames[0][4])
                except (f.ProtocolError, IndexError):
                    message = str(exc)
            else:
                message = str(exc)
            self.close(NodeUnreachable(f"node {self.pool.address} refused the native wire: {message}"))
            return b""
        if version != f.VERSION:
            self.close(NodeUnreachable(f"node {self.pool.address} speaks micro wire version {version}; this client "
                                       f"speaks {f.VERSION}: upgrade the older side or use MICRO_TRANSPORT=grpc"))
            return b""
        self.ready.set_result(None)
        return data[need:]

    # -- calls ------------------------------------------------------------------------------------

    def _end(self, rid: int, call: _Stream, err: Exception | None) -> None:
        call.done = True
        call.error = err
        self.calls.pop(rid, None)
        call.wake()

    def _fail_all(self, err: Exception) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if isinstance(call, _Stream):
                if not call.done:
                    call.done, call.error = True, err
                    call.wake()
            elif not call.done():
                call.set_exception(err)
                call.exception()

    def send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        t = self.transport
        if t is None or t.is_closing() or not out:
            return
        write_all(t, out)

    def close(self, err: Exception) -> None:
        if self.lost is None:
            self.lost = err
        t = self.transport
        if t is not None:
            t.close()
        if not self.ready.done():
            self.ready.set_exception(err if isinstance(err, NodeUnreachable) else NodeUnreachable(str(err)))
            self.ready.exception()
        self._fail_all(err)


def _error(status: int, message: str, address: str) -> Error:
    try:
        st = Status(status)
    except ValueError:
        st = Status.UNKNOWN
    if st is Status.UNAVAILABLE and message == DRAINING:
        return NodeUnreachable(f"node {address} is shutting down")
    return Error.from_status(st, message)


class NativePool:
    """Connections to one node's native address (``host:port``)."""

    wire = "native"

    def __init__(self, address: str, *, ssl: _ssl.SSLContext | None = None, max_streams: int = 1000,
                 max_connections: int = 4, max_message_size: int = 4 * 1024 * 1024,
                 keepalive: float = 30.0, unix: str | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.unix = unix
        """The node's Unix socket, used instead of TCP while it works (``None``: TCP; see :mod:`micro.wire.unix`)."""
        self.unix_fallbacks = 0
        """Connections opened over TCP because the Unix socket failed (it is tried again after ``unix.RETRY`` s)."""
        self._unix_failed_at = -float("inf")
        self._unix_said = False  # the failure was logged (once, until the socket works again)
        self.host = host.strip("[]")
        self.port = int(port)
        self.max_streams = max_streams
        self.max_connections = max_connections
        self.max_message_size = max_message_size
        self.keepalive = keepalive
        self._ssl = ssl
        self._conns: list[_Connection] = []
        self._connecting: asyncio.Future[_Connection] | None = None
        self.places = Places(max_streams * max_connections, address)
        self._watchdog = Watchdog()
        self._where: dict[str, str] = {}
        self._keeper: asyncio.TimerHandle | None = None

    # -- connections ------------------------------------------------------------------------------

    def _best(self) -> _Connection | None:
        """The least busy open connection, unless all are full and another may be opened."""
        conns = self._conns
        if len(conns) == 1:  # the usual case
            c = conns[0]
            if c.usable and (len(c.calls) < self.max_streams or self.max_connections == 1):
                return c
        best: _Connection | None = None
        for c in conns:
            if c.usable and (best is None or len(c.calls) < len(best.calls)):
                best = c
        if best is not None and (len(best.calls) < self.max_streams or len(conns) >= self.max_connections):
            return best
        return None

    async def _conn(self, path: str, deadline: float | None) -> _Connection:
        best = self._best()
        if best is not None:
            return best
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            if deadline is None:
                return await asyncio.shield(connecting)
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(connecting)
        except TimeoutError:
            raise Timeout(f"{path} on {self.address}: the deadline passed while connecting") from None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            conn = None
            if self.unix is not None and loop.time() >= self._unix_failed_at + unix.RETRY:
                conn = await self._open_unix(loop)
            if conn is None:
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port, ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None,
                    )
                except (OSError, _ssl.SSLError) as exc:
                    raise NodeUnreachable(f"node {self.address} is unreachable on the native wire "
                                          f"({exc or type(exc).__name__})") from None
                await conn.ready
            self._conns.append(conn)
            self._arm_keepalive()
            return conn
        finally:
            self._connecting = None

    async def _open_unix(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """A connection on the node's Unix socket, greeted; or ``None`` (TCP for :data:`unix.RETRY` seconds)
        when the socket is unusable (gone, stale, not ours to open, another mount namespace sharing this
        host's kernel, a listener of another user) or the connection fails before the handshake (a full
        accept backlog hands asyncio an unconnected socket)."""
        assert self.unix is not None
        transport: asyncio.BaseTransport | None = None
        try:
            transport, conn = await loop.create_unix_connection(lambda: _Connection(self), self.unix)
            uid = unix.peer_uid(transport.get_extra_info("socket"))
            if uid is not None and uid != os.geteuid():
                raise PermissionError(f"its listener runs as uid {uid}, not as this user (uid {os.geteuid()})")
            await conn.ready
        except (OSError, NodeUnreachable) as exc:
            if transport is not None:
                transport.close()
            self.unix_fallbacks += 1
            self._unix_failed_at = loop.time()
            level = logging.DEBUG if self._unix_said else logging.INFO
            self._unix_said = True
            log.log(level, "native wire: %s: the Unix socket %s is unusable (%s): TCP, trying the socket again "
                    "in %g s", self.address, self.unix, exc, unix.RETRY)
            return None
        if self._unix_said:
            log.info("native wire: %s: the Unix socket %s works again", self.address, self.unix)
            self._unix_said = False
        return conn

    def connected(self) -> list[str]:
        """How each open connection reaches the node: ``"unix"`` (its Unix socket) or ``"tcp"``."""
        out = []
        for c in self._conns:
            t = c.transport
            if t is not None:
                sock = t.get_extra_info("socket")
                out.append("unix" if sock is not None and sock.family == socket.AF_UNIX else "tcp")
        return out

    def forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)

    def _arm_keepalive(self) -> None:
        if self._keeper is None and self.keepalive > 0:
            self._keeper = asyncio.get_running_loop().call_later(self.keepalive, self._keepalive)

    def _keepalive(self) -> None:
        """Ping connections that carry calls but heard nothing for a while; drop those that stayed silent."""
        self._keeper = None
        now = asyncio.get_running_loop().time()
        for c in list(self._conns):
            silent = now - c.last_seen
            if c.calls and silent > 2 * self.keepalive:
                c.close(Unavailable(f"node {self.address} stopped answering on the native wire "
                                    f"(nothing for {silent:.0f} s, not even a keepalive PONG)"))
            elif c.calls and silent > self.keepalive:
                c.send(f.frame(f.PING, 0, _PING_BODY))
        if self._conns:
            self._arm_keepalive()

    # -- calls ------------------------------------------------------------------------------------

    async def unary(self, path: str, data: bytes, *, wire: str = JSON, deadline: float | None = None,
                    metadata: Mapping[str, str] | None = None) -> bytes:
        """One request, one reply; statuses as ``micro.errors``."""
        places = self.places
        if not places.take_now():
            await places.take(path, deadline)
        try:
            conn = self._best()  # the usual case: a connection is open
            if conn is None:
                conn = await self._conn(path, deadline)
            if not conn.usable:
                raise NodeUnreachable(f"{path}: node {self.address} is shutting down")
            loop = conn.loop
            if deadline is None:
                timeout_us = None
            else:  # _timeout, inlined (a method call is a fair part of a call's cost here)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Timeout(f"deadline passed before calling {path} on {self.address}")
                timeout_us = int(remaining * 1e6)
            rid = next(conn.ids)
            frame = self._frame(path, rid, data, wire, 0, timeout_us, metadata)
            fut: asyncio.Future[bytes] = loop.create_future()
            conn.calls[rid] = fut
            conn.send(frame)
            if deadline is not None:
                where = self._where.get(path)
                if where is None:
                    where = self._where[path] = f"{path} on {self.address}"
                self._watchdog.expire(fut, deadline, where)  # fails with Timeout when the deadline passes
            try:
                return await fut
            except (asyncio.CancelledError, Timeout):
                self._cancel(conn, rid)  # the handler stops too
                raise
        finally:
            places.release()

    async def server_stream(self, path: str, data: bytes, *, wire: str = JSON, deadline: float | None = None,
                            metadata: Mapping[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        """One request, a stream of replies, read under the credit window."""
        loop = asyncio.get_running_loop()
        timeout_us = self._timeout(path, deadline, loop)
        places = self.places
        await places.take(path, deadline)
        try:
            conn = await self._conn(path, deadline)
            if not conn.usable:
                raise NodeUnreachable(f"{path}: node {self.address} is shutting down")
            rid = next(conn.ids)
            call = _Stream()
            frame = self._frame(path, rid, data, wire, f.STREAM, timeout_us, metadata)  # may refuse: nothing kept
            conn.calls[rid] = call
            conn.send(frame)
            timer = None if deadline is None else loop.call_at(deadline, _expire_stream, call, path, self.address)
            try:
                while True:
                    if call.items:
                        item = call.items.popleft()
                        call.taken += 1
                        if call.taken >= f.STREAM_WINDOW // 2 and not call.done:
                            conn.send(f.frame(f.CREDIT, rid, aux=call.taken))
                            call.taken = 0
                        yield item
                        continue
                    if call.done:
                        if call.error is not None:
                            raise call.error
                        return
                    call.waiter = loop.create_future()
                    await call.waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._cancel(conn, rid)  # stopped early or timed out: the handler stops (a no-op once ended)
        finally:
            places.release()  # stopped early, failed or done: the place goes now

    def _frame(self, path: str, rid: int, data: bytes, wire: str, flags: int, timeout_us: int | None,
               metadata: Mapping[str, str] | None) -> bytes:
        if wire == PROTO:
            flags |= f.PROTO
        try:
            return f.request(rid, path, timeout_us, dict(metadata) if metadata else None, data, flags)
        except ValueError as exc:
            from micro.errors import BadRequest

            raise BadRequest(f"{path}: {exc}") from None

    def _timeout(self, path: str, deadline: float | None, loop: asyncio.AbstractEventLoop) -> int | None:
        if deadline is None:
            return None
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise Timeout(f"deadline passed before calling {path} on {self.address}")
        return int(remaining * 1e6)

    @staticmethod
    def _cancel(conn: _Connection, rid: int) -> None:
        if conn.calls.pop(rid, None) is not None and conn.transport is not None:
            conn.send(f.frame(f.CANCEL, rid))
            if conn.draining:
                conn.close_drained()

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        for c in list(self._conns):
            c.close(Unavailable(f"the connection to {self.address} was closed by this client"))
        self._conns.clear()


def _expire_stream(call: _Stream, path: str, address: str) -> None:
    if not call.done:
        call.done = True
        call.error = Timeout(f"{path} on {address}: deadline exceeded")
        call.wake()


__all__ = ["NativePool"]
