"""The native listener of a service: micro's own wire, served beside its gRPC server.

One :class:`NativeServer` per service serves the same endpoints as its gRPC server,
through the same :meth:`Endpoint.handle <micro.service.endpoints.Endpoint.handle>`:
a request's payload is decoded once by the endpoint's codec, the handler chain runs
under the call's deadline and metadata, and errors travel as the same statuses and
messages. Each connection is an ``asyncio.Protocol``: frames are cut by
:class:`~micro.wire.frames.FrameReader`, each call runs in its own task, replies
written in one ``transport.write`` per loop iteration. A call's task is cancelled (a
``CANCEL``, its deadline, a lost connection, a drain past its grace) the way an anyio cancel
scope around the handler would cancel it (:func:`micro.cancel.cancel`): a handler's shielded
section finishes first.

Stopping drains as the gRPC server does: no new connections, a GOAWAY on the open
ones, new calls refused with UNAVAILABLE (the client tries another node), calls in
flight given ``grace`` seconds, then cancelled; a handler in a shielded section gets
``shield_timeout`` seconds more to leave it, then is cut (``Task.cancel()``, logged). The server
owns every call's task until it ends, also the calls of a connection lost before the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl as _ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from micro import metrics
from micro.cancel import DEFAULT_SHIELD_TIMEOUT, cancel, stop_all
from micro.codec import JSON, PROTO
from micro.connections import DEFAULT_IDLE_TIMEOUT, ConnectionLimit, quiet_accept_errors, write_all
from micro.deadlines import Watch, Watchdog
from micro.errors import Error, ResourceExhausted, Status
from micro.limits import DEFAULT_BODY_TIMEOUT, BodyBudget
from micro.resource import aclose
from micro.tasks import BackgroundTasks

from . import frames as f
from .unix import bind as bind_socket
from .unix import remove as remove_socket

if TYPE_CHECKING:
    from micro.service.endpoints import Endpoint

log = logging.getLogger("micro.wire")

DEFAULT_KEEPALIVE_TIME = 60.0
"""Seconds a connection with calls in flight may stay silent before the server PINGs it."""
DEFAULT_KEEPALIVE_TIMEOUT = 20.0
"""Seconds the peer has to answer that PING."""

DRAINING = "the node is shutting down: call another node"
"""The UNAVAILABLE message of a call refused while draining (the same as on gRPC)."""

_EXPIRED_US = 1000  # less than 1 ms left on arrival is no time to run anything (as on gRPC)


class _Call:
    __slots__ = ("cancelled", "credit", "deadline", "task", "waiter", "watch", "where")

    def __init__(self, deadline: float | None = None, where: str = "") -> None:
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False  # by a CANCEL or a lost connection: its task is forgotten when it ends
        self.deadline = deadline
        self.where = where
        self.watch: Watch | None = None  # a unary call's deadline, once it outlived its first step
        self.credit = f.STREAM_WINDOW
        self.waiter: asyncio.Future[None] | None = None

    def grant(self, n: int) -> None:
        self.credit += n
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Connection(asyncio.Protocol):
    """One client connection: many calls in flight, each answered by request id."""

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = f.FrameReader(server.max_message_size)
        self.calls: dict[int, _Call] = {}
        self.greeted = False
        self._preface = b""
        self._out: list[bytes] = []
        self._flushing = False
        self._writable: asyncio.Future[None] | None = None
        self.last_seen = self.loop.time()
        self.pinged_at = 0.0  # when an unanswered keepalive PING was sent (0: none)
        # the frame arriving in pieces: (its number in the reader, bytes counted in the budget, body timer)
        self._held: tuple[int, int, asyncio.TimerHandle] | None = None
        self._unwatched: list[_Call] = []  # the calls with deadlines started in this data_received

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        refusal = self.server.connection_limit.admit(self)
        if refusal is not None:  # an ERROR instead of the preface: the client says why and tries another node
            self.transport.write(f.error(0, Status.UNAVAILABLE.value, refusal))
            self.transport.close()
            self.transport = None
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        self.server.connection_limit.discard(self)
        if self._held is not None:
            self._release()
        emptied = self.server._emptied
        if emptied is not None and not self.server.connections:
            emptied.set()  # stop() waits for the clients to close, once they have their answers
        if self.calls:  # the server still owns their tasks until they end: stop() waits for them too
            self.server.lost.add(self)
        for rid, call in list(self.calls.items()):
            self._cancel(rid, call)  # nobody is left to answer: the handlers stop (after their shielded sections)
        w = self._writable
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        w = self._writable
        if w is not None and not w.done():
            w.set_result(None)

    def idle_since(self) -> float | None:
        return None if self.calls else self.last_seen

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused
        self.last_seen = self.loop.time()
        self.pinged_at = 0.0
        if not self.greeted:
            data = self._greet(data)
            if not data:
                return
        try:
            for kind, rid, flags, aux, body, length in self.reader.feed(data):
                if kind == f.REQUEST:
                    self._request(rid, flags, aux, body, length)
                elif kind == f.CANCEL:
                    call = self.calls.get(rid)
                    if call is not None:
                        self._cancel(rid, call)
                elif kind == f.CREDIT:
                    call = self.calls.get(rid)
                    if call is not None:
                        call.grant(aux)
                elif kind == f.PING:
                    if flags & f.OVERSIZE or length > 8:
                        raise f.ProtocolError("a PING carries at most 8 bytes")
                    self.send(f.frame(f.PONG, rid, body))
                elif kind == f.PONG:
                    pass
                else:
                    raise f.ProtocolError(f"a client does not send {f.NAMES[kind]} frames (request id {rid})")
            if not self._flushing:
                # queued after the first steps of the calls just started: what they answer at once goes out
                # in one write in the next loop iteration, not the one after
                self._flushing = True
                self.loop.call_soon(self._flush)
            if self._unwatched:  # and their deadlines go on the watchdog's heap after those steps too
                self.loop.call_soon(self._watch, self._unwatched)
                self._unwatched = []
            self._account()
        except f.ProtocolError as exc:
            self.abort(str(exc))

    def eof_received(self) -> bool | None:
        return None  # close: a client that stops sending is gone

    # -- the bytes of a frame arriving in pieces --------------------------------------------------

    def _account(self) -> None:
        """Count the frame that is arriving in pieces against the server's budget, or refuse it.

        A REQUEST is refused before its body arrives (RESOURCE_EXHAUSTED) when the service is
        overloaded or the bytes it announces are over the budget; its bytes are then skipped.
        One that takes longer than ``body_timeout`` to arrive ends with DEADLINE_EXCEEDED.
        """
        reader = self.reader
        if self._held is not None:
            if self._held[0] == reader.frames:
                return  # still arriving, already counted
            self._release()  # it arrived (or was dropped)
        pending = reader.pending()
        if pending is None:
            return
        kind, rid, flags, size = pending
        server = self.server
        try:
            if kind == f.REQUEST and not flags & f.STREAM and server.admit is not None:
                server.admit()  # the overload check, before the body is read
            server.budget.reserve(size, self)
        except ResourceExhausted as exc:
            if kind != f.REQUEST:
                raise f.ProtocolError(f"a {f.NAMES[kind]} frame of {size} bytes: {exc.message}") from None
            reader.drop()
            self.send(f.error(rid, Status.RESOURCE_EXHAUSTED.value, exc.message))
            return
        timer = self.loop.call_later(server.body_timeout, self._late, reader.frames, kind, rid)
        self._held = (reader.frames, size, timer)

    def _release(self) -> None:
        assert self._held is not None
        _, size, timer = self._held
        self._held = None
        timer.cancel()
        self.server.budget.release(size, self)

    def _late(self, number: int, kind: int, rid: int) -> None:
        if self._held is None or self._held[0] != number:
            return
        self._release()
        self.reader.drop()
        message = f"the request did not arrive within {self.server.body_timeout:g} s"
        if kind == f.REQUEST:
            self.send(f.error(rid, Status.DEADLINE_EXCEEDED.value, f"request {rid}: {message}"))
        else:
            self.abort(f"a {f.NAMES[kind]} frame did not arrive within {self.server.body_timeout:g} s")

    # -- frames -----------------------------------------------------------------------------------

    def _greet(self, data: bytes) -> bytes:
        need = f.PREFACE_SIZE - len(self._preface)
        self._preface += data[:need]
        if len(self._preface) < f.PREFACE_SIZE:
            return b""
        try:
            version = f.read_preface(self._preface)
        except f.ProtocolError:
            assert self.transport is not None
            self.transport.close()  # not our wire: nothing it would understand to say
            return b""
        if version != f.VERSION:
            self.abort(f"the client speaks micro wire version {version}; this node speaks version {f.VERSION}: "
                       "upgrade the older side, or call with MICRO_TRANSPORT=grpc", Status.FAILED_PRECONDITION)
            return b""
        self.greeted = True
        self.send(f.preface())
        if self.server.closing:  # greeted while draining: the GOAWAY it was not sent before the preface
            self.goaway()
        return data[need:]

    def _request(self, rid: int, flags: int, aux: int, body: bytes, length: int) -> None:
        if rid in self.calls:
            raise f.ProtocolError(f"request id {rid} was reused while its call is in flight")
        server = self.server
        if server.closing:
            self.send(f.error(rid, Status.UNAVAILABLE.value, DRAINING))
            return
        try:
            path, timeout_us, metadata = f.read_head(body[:aux])
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec: UnicodeDecodeError for bad UTF-8
            self.send(f.error(rid, Status.INVALID_ARGUMENT.value, f"malformed request head: {exc}"))
            return
        found = server.endpoints.get(path)
        wire = PROTO if flags & f.PROTO else JSON
        if found is None or wire not in found[1]:
            hint = " (this service serves it as JSON only)" if found is not None else ""
            self.send(f.error(rid, Status.UNIMPLEMENTED.value, f"unknown method {path}{hint}"))
            return
        ep, _, where = found
        streaming = bool(flags & f.STREAM)
        if streaming != ep.streaming:
            how = "client.stream()" if ep.streaming else "client.call()"
            self.send(f.error(rid, Status.INVALID_ARGUMENT.value, f"{ep.where}: call it with {how}"))
            return
        if flags & f.OVERSIZE:
            size = length - aux
            self.send(f.error(rid, Status.RESOURCE_EXHAUSTED.value,
                              f"{ep.where}: request of {size} bytes is over the service's "
                              f"{server.max_message_size}-byte limit"))
            return
        deadline: float | None = None
        if timeout_us is not None:
            if timeout_us < _EXPIRED_US:
                self.send(f.error(rid, Status.DEADLINE_EXCEEDED.value,
                                  f"the call's deadline ({timeout_us} µs) had passed when it arrived"))
                return
            deadline = self.loop.time() + timeout_us / 1e6
        call = _Call(deadline, where)
        payload = body[aux:]
        coro = self._stream(rid, call, ep, where, wire, payload, metadata or {}, deadline) if streaming else \
            self._unary(rid, call, ep, where, wire, payload, metadata or {}, deadline)
        self.calls[rid] = call
        call.task = self.loop.create_task(coro)
        if deadline is not None and not streaming:
            # watched from after the call's first step (most calls end in it, and cost no watch): see _watch
            self._unwatched.append(call)

    async def _unary(self, rid: int, call: _Call, ep: Endpoint, where: str, wire: str, payload: bytes,
                     metadata: dict[str, str], deadline: float | None) -> None:
        limit = self.server.max_message_size
        try:
            try:
                body = ep.request.decode(payload, wire, where)
                if deadline is None:
                    result = await ep.handle(body, metadata, None, transport=metrics.NATIVE)
                else:
                    try:
                        result = await ep.handle(body, metadata, deadline, transport=metrics.NATIVE)
                    except asyncio.CancelledError:
                        watch, call.watch = call.watch, None
                        if watch is not None:  # Timeout when it was the deadline that cancelled it
                            watch.__exit__(asyncio.CancelledError, None, None)
                        raise
                    finally:
                        if call.watch is not None:
                            call.watch.__exit__(None, None, None)
                reply = ep.response.encode(result, wire)
            except Error as err:
                self.send(f.error(rid, err.status.value, err.message))
                return
            except asyncio.CancelledError:
                if self.server.closing:  # cancelled by stop() past the drain timeout: say so, then go
                    self.send(f.error(rid, Status.UNAVAILABLE.value, f"{ep.where}: the node dropped the call: "
                                      "it stopped before the call finished"))
                raise
            except Exception:
                log.exception("%s: the reply could not be encoded", ep.where)
                self.send(f.error(rid, Status.INTERNAL.value,
                                  f"{ep.where} failed with an internal error (details in the service log)"))
                return
            if len(reply) > limit:
                self.send(f.error(rid, Status.RESOURCE_EXHAUSTED.value,
                                  f"{ep.where}: response of {len(reply)} bytes is over the {limit}-byte limit"))
            else:
                self.send_payload(f.HEADER.pack(len(reply), rid, f.RESPONSE, 0, 0), reply)
        finally:
            self._done(rid, call)

    async def _stream(self, rid: int, call: _Call, ep: Endpoint, where: str, wire: str, payload: bytes,
                      metadata: dict[str, str], deadline: float | None) -> None:
        limit = self.server.max_message_size
        items: AsyncIterator[Any] | None = None
        try:
            try:
                body = ep.request.decode(payload, wire, where)
                items = await ep.handle(body, metadata, deadline, transport=metrics.NATIVE)
                if deadline is None:
                    await self._send_items(rid, call, ep, wire, items, limit)
                else:
                    with self.server.watchdog.watch(deadline, where, call.task):  # Timeout when it passes
                        await self._send_items(rid, call, ep, wire, items, limit)
                self.send(f.frame(f.END, rid))
            except Error as err:
                self.send(f.error(rid, err.status.value, err.message))
            except asyncio.CancelledError:
                if self.server.closing:  # cancelled by stop() past the drain timeout: say so, then go
                    self.send(f.error(rid, Status.UNAVAILABLE.value, f"{ep.where}: the node dropped the call: "
                                      "it stopped before the call finished"))
                raise
            except Exception:
                log.exception("%s: a stream item could not be encoded", ep.where)
                self.send(f.error(rid, Status.INTERNAL.value,
                                  f"{ep.where} failed with an internal error (details in the service log)"))
            finally:
                await aclose(items)  # the handler's generator runs its cleanup now
        finally:
            self._done(rid, call)

    async def _send_items(self, rid: int, call: _Call, ep: Endpoint, wire: str, items: AsyncIterator[Any],
                          limit: int) -> None:
        """Send each item as the client's credit and the socket allow."""
        sent = 0
        async for item in items:
            reply = ep.response.encode(item, wire)
            if len(reply) > limit:  # what went before was delivered; the stream ends here
                raise ResourceExhausted(f"{ep.where}: reply {sent + 1} of {len(reply)} bytes is over "
                                        f"the {limit}-byte limit")
            while call.credit <= 0:  # the client has not read what it was sent: wait
                call.waiter = self.loop.create_future()
                await call.waiter
            if self._writable is not None and not self._writable.done():
                await self._writable  # the socket's buffer is full: wait for it to drain
            if self.transport is None:
                return
            call.credit -= 1
            self.send_payload(f.HEADER.pack(len(reply), rid, f.ITEM, 0, 0), reply)
            sent += 1

    def _watch(self, calls: list[_Call]) -> None:
        """Put the deadlines of the calls that outlived their first step on the watchdog (the rest ended,
        or were cancelled before they ran: nothing would take them off its heap)."""
        watch = self.server.watchdog.watch
        for call in calls:
            task = call.task
            if task is not None and not task.done() and call.deadline is not None:
                call.watch = watch(call.deadline, call.where, task)

    def _cancel(self, rid: int, call: _Call) -> None:
        """Cancel a call's task as an anyio scope would (a shielded section inside finishes first), once: a
        flood of CANCELs for it, or a CANCEL and then a lost connection, adds nothing."""
        task = call.task
        if task is None or call.cancelled:
            return
        call.cancelled = True
        cancel(task)
        # a task cancelled before its first step never runs its own clean-up: forget it then
        task.add_done_callback(functools.partial(self._forget, rid, call))

    def _forget(self, rid: int, call: _Call, _task: asyncio.Task[None]) -> None:
        self._done(rid, call)

    def _done(self, rid: int, call: _Call) -> None:
        if self.calls.get(rid) is call:
            del self.calls[rid]
        if not self.calls and self.transport is None:
            self.server.lost.discard(self)  # its last call ended after the connection was lost

    # -- writing ----------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop iteration goes out in one write."""
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def send_payload(self, header: bytes, payload: bytes) -> None:
        """Queue a frame as its header and payload: a large payload is written as it is, never copied
        to be joined to its header (see :func:`micro.connections.write_all`)."""
        out = self._out
        out.append(header)
        out.append(payload)
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

    def abort(self, message: str, status: Status = Status.INVALID_ARGUMENT, level: int = logging.WARNING) -> None:
        """Tell the client why (an ERROR frame for request id 0), then close the connection."""
        log.log(level, "native wire: closing a connection: %s", message)
        t = self.transport
        if t is None:
            return
        self._flush()
        if not t.is_closing():
            t.write(f.error(0, status.value, message))
            t.close()

    def goaway(self) -> None:
        """Tell the client this node is draining (after the preface: an ungreeted connection gets it then)."""
        if self.greeted:
            self.send(f.frame(f.GOAWAY, 0))


class NativeServer:
    """Serves endpoints on micro's native wire. ``start()`` binds; ``stop()`` drains.

    Args:
        max_message_size: largest request or response payload in bytes.
        idle_timeout: seconds a connection with no call in flight may stay silent
            before it is closed (a half-open connection whose peer vanished).
        max_connections: most connections open at once; past it one is refused
            (``None``: derived from the descriptor limit, see :mod:`micro.connections`).
        connection_limit: the bound and idle timeout shared with other listeners (a
            service shares its gRPC server's); made from the two above when not given.
        budget: bounds the request bytes held while frames arrive in pieces (a service
            shares its gRPC server's, so the bound is per service); a new one with the
            defaults when not given.
        body_timeout: seconds a request may take to arrive once its header has.
        admit: called before a unary request's body is read; raises ``ResourceExhausted``
            when the service is overloaded.
        keepalive_time: seconds a connection with calls in flight may stay silent before
            the server sends a PING (``None``: never).
        keepalive_timeout: seconds after that PING within which the peer must send
            something (its PONG); then the connection is closed and its calls cancelled
            (a half-open connection whose peer vanished mid-call).
        shield_timeout: seconds ``stop()`` waits, once it has cancelled the calls still running after
            its grace, for handlers inside a shielded section to leave it; then they are cancelled
            with ``Task.cancel()`` (the section is cut, logged with the call's name).
    """

    def __init__(self, *, max_message_size: int, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_connections: int | None = None, connection_limit: ConnectionLimit | None = None,
                 budget: BodyBudget | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 admit: Callable[[], None] | None = None, keepalive_time: float | None = DEFAULT_KEEPALIVE_TIME,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 shield_timeout: float = DEFAULT_SHIELD_TIMEOUT) -> None:
        self.max_message_size = max_message_size
        self.shield_timeout = shield_timeout
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.connection_limit = connection_limit if connection_limit is not None else \
            ConnectionLimit("native wire server", max_connections, idle_timeout)
        self.budget = budget if budget is not None else BodyBudget("native wire server")
        self.body_timeout = body_timeout
        self.admit = admit
        self.endpoints: dict[str, tuple[Endpoint, tuple[str, ...], str]] = {}  # path: endpoint, wires, where
        self.connections: set[_Connection] = set()
        self.lost: set[_Connection] = set()
        """Lost connections whose calls' handlers have not ended yet (cancelled, in a shielded section):
        the server owns those tasks until they end, and ``stop()`` waits for them as for the others."""
        self.watchdog = Watchdog()
        self.closing = False
        self.host = ""
        self.port = 0
        self.unix: str | None = None
        """The path of its Unix socket while it serves one (:mod:`micro.wire.unix`)."""
        self._server: asyncio.Server | None = None
        self._unix_server: tuple[asyncio.Server, int] | None = None  # and the socket file's inode
        self._background: BackgroundTasks | None = None
        self._emptied: asyncio.Event | None = None  # set by the last connection to close while stopping

    def add(self, ep: Endpoint) -> None:
        """Serve ``ep`` (also after start)."""
        self.endpoints[ep.path] = (ep, ep.wires, ep.where)

    async def start(self, host: str, port: int = 0, *, ssl: _ssl.SSLContext | None = None,
                    unix: str | None = None) -> None:
        """Listen on ``host:port`` (TLS with ``ssl``) and, given a path, on a Unix socket there too (no TLS:
        see :mod:`micro.wire.unix`; when it cannot be bound the node serves TCP only, logged)."""
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        self.closing = False
        # a deep accept backlog: with asyncio's 100, a burst of connections overflows it and the kernel
        # drops SYNs, which the peers resend after a second (10,000 connections took 80 s instead of 2)
        self._server = await loop.create_server(lambda: _Connection(self), host, port, ssl=ssl,
                                                reuse_address=True, backlog=4096)
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        if unix is not None:
            await self._listen_unix(loop, unix)
        background = BackgroundTasks("native wire server", log)
        tg = await background.start()
        self._background = background
        tg.start_soon(self.connection_limit.sweep)
        if self.keepalive_time is not None:
            tg.start_soon(self._keepalive, self.keepalive_time, self.keepalive_timeout)

    async def _listen_unix(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        try:
            sock = bind_socket(path)  # listening before it is at its name: see micro.wire.unix.bind
            try:
                server = await loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=4096)
            except BaseException:
                sock.close()
                raise
            try:
                inode = os.lstat(path).st_ino
            except OSError:
                server.close()
                raise
        except OSError as exc:
            log.warning("native wire: no Unix socket at %s (%s); calls from this host use TCP", path, exc)
            return
        self._unix_server = (server, inode)
        self.unix = path

    async def _keepalive(self, every: float, timeout: float) -> None:
        """PING connections with calls in flight that went silent; close those that stay silent."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(every, timeout) / 2)
            now = loop.time()
            for conn in list(self.connections):
                silent = now - conn.last_seen
                if not conn.calls or silent <= every:
                    continue
                if not conn.pinged_at:
                    conn.pinged_at = now
                    conn.send(f.frame(f.PING, 0, b"keepaliv"))
                elif now - conn.pinged_at > timeout:  # pinged, and silent since (not merely a stalled loop)
                    conn.abort(f"no answer to a keepalive PING within {timeout:g} s", Status.UNAVAILABLE,
                               logging.DEBUG)  # a peer that vanished: nothing to act on

    async def _cancel_all(self, tasks: dict[asyncio.Task[None], str]) -> None:
        """Cancel the calls still running (each after its shielded section), wait ``shield_timeout`` for them,
        then cut those still in a shielded section (``Task.cancel()``), logged (:func:`micro.cancel.stop_all`)."""
        await stop_all(tasks, self.shield_timeout, "native wire")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, refuse new calls, let in-flight calls finish within ``grace``, cancel the rest.

        A call cancelled inside a shielded anyio scope finishes that section first (:mod:`micro.cancel`), for
        at most ``shield_timeout`` seconds; then its section is cut (``Task.cancel()``, logged). Calls of
        connections lost before are waited for and cancelled the same way.

        Then, within what is left of ``grace``, wait for the clients to close their connections (a micro
        client closes one once its calls on it are answered after the ``GOAWAY``) before closing the rest:
        a request already on its way when the ``GOAWAY`` left is answered "shutting down" (nothing ran,
        the client tries another node) instead of being cut off by a reset it could not tell from a
        call that ran.
        """
        server, self._server = self._server, None
        if server is None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        self.closing = True
        self._emptied = asyncio.Event()
        server.close()
        listening, self._unix_server = self._unix_server, None
        if listening is not None:
            listening[0].close()
            assert self.unix is not None
            remove_socket(self.unix, listening[1])  # nobody connects to it any more: no file left behind
            self.unix = None
        for conn in list(self.connections):
            conn.goaway()
        pending = {c.task: c.where for conn in (*self.connections, *self.lost) for c in conn.calls.values()
                   if c.task is not None and not c.task.done()}
        if pending:
            await asyncio.wait(pending, timeout=grace)
            await self._cancel_all(pending)
        if self.connections and until > loop.time():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), until - loop.time())
        self._emptied = None
        for conn in list(self.connections):
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()
        if self._background is not None:
            await self._background.aclose()
            self._background = None
        await server.wait_closed()
        if listening is not None:
            await listening[0].wait_closed()
