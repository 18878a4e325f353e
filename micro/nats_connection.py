"""One NATS connection for the registry, broker and store: settings, connecting, sharing, errors.

Every NATS backend connects through :func:`shared`, so they all use one set of
connect/reconnect settings (:class:`NatsSettings`) and one error mapping
(:func:`nats_errors`). Backends of one event loop that name the same servers with
the same settings share one connection: it opens with the first of them and closes
with the last (a :class:`~micro.resource.Resource`, reference-counted).

Connecting is bounded by ``connect_timeout`` and fails at the first error with
``Unavailable`` naming the redacted URL. Once up, the connection **reconnects for as
long as it is open**: nats-py retries every ``reconnect_wait`` seconds (with a little
jitter), by default for ever (``max_reconnect=-1``). When a bounded ``max_reconnect``
runs out, nats-py closes its client; this module then starts over with a fresh client,
retrying with a capped exponential backoff (``reconnect_wait`` doubling up to
``max_reconnect_wait``, each wait jittered by ±20 %), and tells the backends
(:meth:`Listener.on_new_client`), which re-create their subscriptions and contexts on
it. ``generation`` counts the clients, so a backend can see that its contexts are stale.
A service outlives a NATS outage of any length.

While it is down, operations fail fast with ``Unavailable`` and nothing is buffered.
Each change of state is logged once (disconnected, reconnected, gave up and starting
over, connected again), never once per operation or attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import anyio

from micro.errors import ConfigError, MicroError, Unavailable
from micro.resource import Resource, map_errors, reason, redact
from micro.tasks import backoff

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.manager import JetStreamManager
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("NATS backends need nats-py: pip install 'micro[nats]'", name=exc.name) from None

__all__ = ["Listener", "NatsConnection", "NatsSettings", "callback_errors", "connect", "describe", "nats_errors",
           "servers_of", "shared"]

log = logging.getLogger("micro.nats")

SCHEMES = ("nats", "nats+js", "tls")
"""URL schemes whose netloc names NATS servers (``nats+js`` selects the JetStream broker)."""


@dataclass(frozen=True)
class NatsSettings:
    """How every NATS backend connects.

    Args:
        connect_timeout: seconds to reach a server at start before ``Unavailable``.
        reconnect_wait: seconds between reconnect attempts on each server after a disconnect.
        max_reconnect: reconnect attempts of one nats-py client before it is replaced
            by a fresh one; -1 (the default) lets one client retry for ever. The
            connection never gives up either way.
        close_timeout: seconds closing may take (flushing what is buffered).
        max_reconnect_wait: the cap on the backoff between fresh clients (seconds).
    """

    connect_timeout: float = 2.0
    reconnect_wait: float = 1.0
    max_reconnect: int = -1
    close_timeout: float = 5.0
    max_reconnect_wait: float = 30.0



_callback_errors: contextvars.ContextVar[Callable[[Exception], bool] | None] = contextvars.ContextVar(
    "micro_nats_callback_errors", default=None)


@contextlib.contextmanager
def callback_errors(report: Callable[[Exception], bool]) -> Iterator[None]:
    """Subscriptions made in this block give ``report`` the exceptions their callback raises.

    nats-py hands such an exception to the connection's error callback, awaited in the
    subscription's own task, whose context is a copy of the one ``client.subscribe`` ran
    in; so the connection finds ``report`` there, and a subscription callback needs no
    ``try`` (no coroutine) of its own around the handler. ``report`` returns whether the
    exception was its callback's (else the connection reports it as a connection error).
    """
    token = _callback_errors.set(report)
    try:
        yield
    finally:
        _callback_errors.reset(token)


class Listener(Protocol):
    """What a backend hears about its connection (called on the loop, in nats-py's callback task)."""

    async def on_disconnected(self) -> None: ...

    async def on_reconnected(self) -> None: ...

    async def on_closed(self) -> None: ...

    async def on_new_client(self) -> None:
        """The connection has a fresh nats-py client (the old one gave up): re-create what used it."""


def servers_of(url: str) -> list[str]:
    """The server URLs in ``url``: ``nats://a:4222,b:4222`` names two servers of one cluster.

    ``nats+js://`` names the same servers as ``nats://``; ``tls://`` keeps its scheme.
    User and password stay on each server URL (nats-py reads them from there).
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ConfigError(f"NATS URL {redact(url)!r} must look like nats://host:4222 (several: nats://a:4222,b:4222)")
    scheme = "tls" if parts.scheme == "tls" else "nats"
    auth, _, hosts = parts.netloc.rpartition("@")
    return [f"{scheme}://{auth + '@' if auth else ''}{host}" for host in hosts.split(",")]


class NatsConnection(Resource):
    """A nats-py client shared by the backends that use these servers (see :func:`shared`).

    ``client`` is the nats-py ``Client`` while the connection is open.
    """

    kind: ClassVar[str] = "NATS connection"
    error: ClassVar[type[MicroError]] = Unavailable

    def __init__(self, url: str, settings: NatsSettings = NatsSettings()) -> None:
        self.url = url
        self.servers = servers_of(url)
        self.settings = settings
        self.listeners: set[Listener] = set()
        self._client: Client | None = None
        self._connecting: anyio.CancelScope | None = None
        self._first_error: BaseException | None = None
        self._up = False
        self._renewal: asyncio.Task[None] | None = None
        self._pending: Client | None = None
        self._lost: BaseException | None = None
        self.generation = 0
        """Counts the nats-py clients this connection has had (contexts made on an older one are stale)."""

    @property
    def client(self) -> Client:
        self._check_open("use it")
        assert self._client is not None
        return self._client

    @property
    def is_connected(self) -> bool:
        """Open and connected now (not reconnecting)."""
        return self._client is not None and self._client.is_connected

    @property
    def is_closed(self) -> bool:
        """Closed by its last user (a client that gave up is being replaced: not closed)."""
        return self._client is None

    def jetstream(self, timeout: float) -> JetStreamContext:
        """A JetStream context whose API requests time out after ``timeout`` seconds."""
        return self.client.jetstream(timeout=timeout)

    def jsm(self, timeout: float) -> JetStreamManager:
        """A JetStream management context (streams, consumers)."""
        return self.client.jsm(timeout=timeout)

    async def require_jetstream(self, what: str) -> None:
        """Raise ``Unavailable`` unless the server has JetStream enabled."""
        try:
            await self.client.jsm(timeout=self.settings.connect_timeout).account_info()
        except (nats.errors.Error, TimeoutError) as e:
            raise Unavailable(f"{what} {redact(self.url)}: JetStream is not available on the server "
                              f"(start nats-server with -js): {describe(e)}") from None

    async def _open(self) -> None:
        self._client = await self._connect()
        self.generation += 1
        self._up = True

    async def _connect(self) -> Client:
        """A connected nats-py client, or ``Unavailable`` at the first error."""
        settings = self.settings
        client = self._pending = Client()
        self._first_error = None
        with anyio.move_on_after(settings.connect_timeout) as scope:
            self._connecting = scope
            try:
                await client.connect(
                    self.servers,
                    name="micro",
                    connect_timeout=max(1, round(settings.connect_timeout)),
                    reconnect_time_wait=settings.reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=settings.max_reconnect,
                    error_cb=self._only(client, self._on_error),
                    disconnected_cb=self._only(client, self._on_disconnected),
                    reconnected_cb=self._only(client, self._on_reconnected),
                    closed_cb=self._only(client, self._on_closed),
                )
            except (OSError, nats.errors.Error, TimeoutError) as e:
                self._first_error = self._first_error or e
            finally:
                self._connecting = None
                self._pending = None
                if not client.is_connected:  # failed, or cancelled (closed while starting over): no client left behind
                    with anyio.CancelScope(shield=True):
                        await _close_client(client, settings.close_timeout, self.url)
        if not client.is_connected:
            why = self._first_error or f"no answer within {settings.connect_timeout:g} s"
            raise Unavailable(f"cannot connect to {redact(self.url)}: {describe(why)}")
        return client

    async def _close(self) -> None:
        client, self._client = self._client, None
        self._up = False
        forget(self)
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([renewal])
        if client is not None:
            await _close_client(client, self.settings.close_timeout, self.url)

    async def _renew(self) -> None:
        """Replace a client that gave up with fresh ones until one connects (the connection owns this task)."""
        attempt = 0
        while self._client is not None:
            attempt += 1
            await anyio.sleep(backoff(attempt, self.settings.reconnect_wait, self.settings.max_reconnect_wait))
            try:
                client = await self._connect()
            except Unavailable as e:
                log.debug("%s: a fresh connection failed (attempt %d): %s", redact(self.url), attempt, e)
                continue
            if self._client is None:  # closed meanwhile
                await _close_client(client, self.settings.close_timeout, self.url)
                return
            self._client = client
            self.generation += 1
            self._up = True
            log.warning("%s: connected again (fresh connection after %d attempts)", redact(self.url), attempt)
            self._renewal = None
            for listener in list(self.listeners):
                try:
                    await listener.on_new_client()
                except Exception:
                    log.exception("%s: %r could not resume on the fresh connection", redact(self.url), listener)
            return

    def _only(self, client: Client, callback: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """``callback`` for ``client``'s events while it is this connection's (a replaced one is ignored)."""

        async def relay(*args: Any) -> None:
            if client is self._client or client is self._pending:
                await callback(*args)

        return relay

    async def _on_error(self, e: Exception) -> None:
        report = _callback_errors.get()
        if report is not None and report(e):  # a subscription's callback raised (see callback_errors)
            return
        if self._connecting is not None:
            self._first_error = self._first_error or e
            self._connecting.cancel()  # fail at the first error, not after every retry
        elif isinstance(e, nats.errors.SlowConsumerError):
            log.warning("%s: a subscription is too slow, messages dropped: %s", redact(self.url), e)
        elif not self._up:  # a failed reconnect attempt: expected while the server is down
            log.debug("%s: reconnect attempt failed: %s", redact(self.url), describe(e))
        elif isinstance(e, _LOST):  # the cause of the disconnect that follows: said in its one line
            self._lost = e
            log.debug("%s: %s", redact(self.url), describe(e))
        else:
            log.warning("%s: %s", redact(self.url), describe(e))

    async def _on_disconnected(self) -> None:
        if self._up and self._client is not None:
            why = f" ({describe(self._lost)})" if self._lost is not None else ""
            log.warning("%s: disconnected%s, reconnecting", redact(self.url), why)
        self._lost = None
        self._up = False
        for listener in list(self.listeners):
            await listener.on_disconnected()

    async def _on_reconnected(self) -> None:
        log.info("%s: reconnected", redact(self.url))
        self._up = True
        for listener in list(self.listeners):
            await listener.on_reconnected()

    async def _on_closed(self) -> None:
        client = self._client
        if client is None or not client.is_closed or self._renewal is not None:
            return  # closed by us, or a replaced client closing late
        self._up = False
        log.error("%s: connection closed after %d reconnect attempts; starting over with a fresh connection "
                  "(backoff up to %g s)", redact(self.url), self.settings.max_reconnect,
                  self.settings.max_reconnect_wait)
        self._renewal = asyncio.create_task(self._renew(), name=f"micro.nats:renew:{redact(self.url)}")
        for listener in list(self.listeners):
            await listener.on_closed()


async def _close_client(client: Client, timeout: float, url: str) -> None:
    with anyio.move_on_after(timeout):
        try:
            await client.close()
        except nats.errors.Error as e:
            log.debug("closing the connection to %s: %s", redact(url), describe(e))


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[tuple[str, ...], NatsSettings],
                                                                   NatsConnection]] = weakref.WeakKeyDictionary()


def shared(url: str, settings: NatsSettings = NatsSettings()) -> NatsConnection:
    """The connection of this loop to ``url``'s servers with ``settings`` (made on first use).

    Call it when opening (it needs the running loop), then ``await conn.acquire()``;
    ``await conn.release()`` when closing. No I/O until the first ``acquire``.
    """
    table = _shared.setdefault(asyncio.get_running_loop(), {})
    key = (tuple(servers_of(url)), settings)
    conn = table.get(key)
    if conn is None:
        conn = table[key] = NatsConnection(url, settings)
    return conn


def forget(conn: NatsConnection) -> None:
    """Drop a closed connection from the sharing table (the next ``shared`` makes a new one)."""
    for table in _shared.values():
        for key, value in list(table.items()):
            if value is conn:
                del table[key]


def describe(e: object) -> str:
    """A nats-py error in one line (JetStream API errors with their codes)."""
    if isinstance(e, nats.js.errors.APIError):
        codes = ", ".join(f"{k} {v}" for k, v in (("status", e.code), ("error", e.err_code)) if v)
        return f"{e.description or type(e).__name__}" + (f" ({codes})" if codes else "")
    if isinstance(e, BaseException):
        return reason(e)
    return str(e)


_LOST: tuple[type[BaseException], ...] = (
    OSError, nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError, nats.errors.ConnectionClosedError)
"""Errors nats-py reports as a connection drops."""

UNAVAILABLE: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats.errors.TimeoutError subclasses it
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
)
"""nats-py errors that mean "the server is not answering now": ``Unavailable``."""


@contextlib.contextmanager
def nats_errors(where: str, error: type[MicroError], conn: NatsConnection | None = None) -> Iterator[None]:
    """Translate nats-py errors raised inside to micro's: the one NATS error edge.

    Unanswered requests and a lost connection become ``Unavailable``; a payload over the
    server's limit and every other nats-py error become ``error`` (the backend's
    ``StoreError``, ``BrokerError`` or ``RegistryError``), or ``Unavailable`` when
    ``conn`` is given and not connected. ``where`` names the backend by its redacted URL
    and the action.
    """
    try:
        with map_errors({
            nats.js.errors.ServiceUnavailableError: (Unavailable, "JetStream is unavailable"),
            UNAVAILABLE: Unavailable,
            nats.errors.MaxPayloadError: (error, "the message is larger than the server's max_payload"),
        }, where, describe=describe):
            yield
    except nats.errors.Error as e:
        cls = Unavailable if conn is not None and not conn.is_connected else error
        raise cls(f"{where}: {describe(e)}") from e


async def connect(url: str, settings: NatsSettings, *, who: str) -> NatsConnection:
    """The shared connection for ``url``, acquired (give it back with ``release()``).

    ``who`` names the backend in the error (``"registry"``): ``Unavailable("cannot
    connect to registry nats://…: …")`` when no server answers.
    """
    conn = shared(url, settings)
    try:
        await conn.acquire()
    except Unavailable as e:
        raise Unavailable(str(e).replace("cannot connect to ", f"cannot connect to {who} ", 1)) from None
    return conn
