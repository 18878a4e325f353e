"""Serving a gateway with uvicorn, bounded against slow and numerous clients.

uvicorn closes an idle keep-alive connection, but a connection that sends a request
head slowly (a header line every few seconds: slowloris) or never finishes its body
is kept for ever, and so is every connection past any number: 1,100 such clients
held all 1,024 descriptors of a gateway and every normal request timed out. The
protocol :func:`config` gives uvicorn adds

- a **head deadline** (``head_timeout``, 10 s): a request's head must be complete
  within it, counted from the connection's start or the request's first byte; past
  it the client gets ``408`` and the connection is closed;
- a **body deadline** (``body_timeout``, 30 s) from the end of the head to the end of
  the body; past it the connection is closed (the call sees the client leave);
- a **connection limit** (``max_connections``; by default the descriptor limit less
  an eighth, as for services: :class:`micro.connections.ConnectionLimit`); past it a
  new connection gets ``503`` and is closed;
- **rate-limited logs**: uvicorn's own and the gateways' errors, and these closings,
  are logged at most once per 10 s per kind of message (:class:`micro.logs.RateLimit`).

``micro api`` and ``micro mcp --transport http`` serve through it; embedding a
gateway in your own uvicorn, pass ``**`` of the same settings to :func:`config`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from micro.connections import ConnectionLimit, write_all
from micro.errors import ConfigError
from micro.logs import rate_limit

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_HEAD_TIMEOUT", "config"]

log = logging.getLogger("micro.gateway.server")

DEFAULT_HEAD_TIMEOUT = 10.0
"""Seconds a client has to send a request's whole head."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to send a request's whole body once its head is in."""

LOGGERS = ("uvicorn.error", "micro.gateway", "micro.gateway.mcp", "micro.gateway.server")
"""The loggers whose messages are rate-limited while a gateway serves."""


def _response(status: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Corked:
    """A connection's transport whose writes in one loop iteration go out in one system call.

    uvicorn writes a response's head and its body apart: two ``send`` calls, which on a
    busy machine cost more than all the Python of a small call. Everything written while
    one loop iteration runs is joined and written once at its end (as the native wire
    does); ``close`` writes what is pending first. The rest is the transport's own.
    """

    __slots__ = ("_loop", "_out", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self.flush)
        self._out.append(data)

    def flush(self) -> None:
        """Write what is pending now."""
        out, self._out = self._out, []
        if out and not self._transport.is_closing():
            write_all(self._transport, out)  # a large body is not copied to join it to its head

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._out))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _protocol(head_timeout: float, body_timeout: float, limit: ConnectionLimit) -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as exc:  # httptools comes with the gateway extra
        raise ConfigError(f"the gateway needs httptools ({exc}): pip install 'micro[gateway]'") from None

    class Bounded(HttpToolsProtocol):
        """uvicorn's httptools protocol with a head and a body deadline, counted against ``limit``.

        The part of a request that is arriving (its head, then its body) and since when are
        noted as the parser reaches them; a timer is armed only when a ``data_received`` ends
        with a part still incomplete, so a request that arrives whole (the usual case) sets none.
        """

        _deadline: asyncio.TimerHandle | None = None
        _armed: tuple[str, float] | None = None  # the part and start the timer is for
        _part: str | None = None  # "head", "body", or None between requests
        _since = 0.0
        _now = 0.0
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            refusal = limit.admit(self)
            if refusal is not None:
                self._refused = True
                transport.write(_response("503 Service Unavailable", refusal))
                transport.close()
                return
            super().connection_made(_Corked(transport))  # type: ignore[arg-type]
            self._part, self._since = "head", self.loop.time()  # the first head: from the connection's start
            self._arm()

        def eof_received(self) -> None:
            # the client half-closed after its request: asyncio closes the transport when this returns,
            # so what the corked transport holds (a response written in this iteration) goes out first
            transport = self.transport
            if isinstance(transport, _Corked):
                transport.flush()
            super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            limit.discard(self)
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._now = self.loop.time()
            super().data_received(data)
            if self._part is None:
                if self._armed is not None:
                    self._disarm()
            elif self._armed != (self._part, self._since):  # a part is incomplete: its deadline
                self._disarm()
                self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._part is None:  # the next request on a kept-alive connection
                self._part, self._since = "head", self._now

        def on_headers_complete(self) -> None:
            self._part, self._since = "body", self._now
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._part = None
            super().on_message_complete()

        def _arm(self) -> None:
            part = self._part
            assert part is not None
            seconds = head_timeout if part == "head" else body_timeout
            self._armed = (part, self._since)
            self._deadline = self.loop.call_at(self._since + seconds, self._late, seconds, part)

        def _disarm(self) -> None:
            self._armed = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self, seconds: float, part: str) -> None:
            self._deadline = self._armed = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            log.warning("gateway: closed a connection whose request %s did not arrive within %g s", part, seconds)
            if part == "head":
                transport.write(_response("408 Request Timeout",
                                          f"the request head did not arrive within {seconds:g} s"))
            transport.close()

        def idle_since(self) -> float | None:
            return None  # uvicorn closes idle keep-alive connections itself

        def drop(self) -> None:
            if self.transport is not None:
                self.transport.close()

    return Bounded


def config(app: Any, *, head_timeout: float = DEFAULT_HEAD_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
           max_connections: int | None = None, **options: Any) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with the bounds above; ``options`` go to uvicorn as they are.

    Also rate-limits the gateways' and uvicorn's loggers. ``config.connection_limit`` is
    the :class:`~micro.connections.ConnectionLimit` (``open``, ``peak``, ``refused``).
    Serving it yourself, call :func:`micro.connections.quiet_accept_errors` in the
    server's loop too.
    """
    import uvicorn

    if head_timeout <= 0 or body_timeout <= 0:
        raise ConfigError(f"head_timeout and body_timeout must be > 0 seconds (got {head_timeout}, {body_timeout})")
    limit = ConnectionLimit("gateway", max_connections)
    cfg = uvicorn.Config(app, http=_protocol(head_timeout, body_timeout, limit), **options)
    cfg.connection_limit = limit  # type: ignore[attr-defined]
    rate_limit(*LOGGERS)
    return cfg
