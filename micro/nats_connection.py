"""One NATS connection for the registry, broker and store: settings, connecting, sharing, errors.

Every NATS backend connects through :func:`shared`, so they all use one set of
connect/reconnect settings (:class:`NatsSettings`) and one error mapping
(:func:`nats_errors`). Backends of one event loop that name the same servers with
the same settings share one connection: it opens with the first of them and closes
with the last (a :class:`~micro.resource.Resource`, reference-counted).

Connecting is bounded by ``connect_timeout`` and fails at the first error with
``Unavailable`` naming the redacted URL. Once up, the connection **reconnects for
ever** (``max_reconnect=-1``), waiting ``reconnect_wait`` seconds between attempts on
each server (nats-py adds a little jitter): a service outlives a NATS restart of any
length. While it is down, operations fail fast with ``Unavailable`` and nothing is
buffered; subscriptions resume after the reconnect. A backend that wants to hear
about disconnects and reconnects registers a :class:`Listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol
from urllib.parse import urlsplit

import anyio

from micro.errors import ConfigError, MicroError, Unavailable
from micro.resource import Resource, map_errors, reason, redact

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.manager import JetStreamManager
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("NATS backends need nats-py: pip install 'micro[nats]'", name=exc.name) from None

__all__ = ["Listener", "NatsConnection", "NatsSettings", "connect", "describe", "nats_errors", "servers_of", "shared"]

log = logging.getLogger("micro.nats")

SCHEMES = ("nats", "nats+js", "tls")
"""URL schemes whose netloc names NATS servers (``nats+js`` selects the JetStream broker)."""


@dataclass(frozen=True)
class NatsSettings:
    """How every NATS backend connects.

    Args:
        connect_timeout: seconds to reach a server at start before ``Unavailable``.
        reconnect_wait: seconds between reconnect attempts on each server after a disconnect.
        max_reconnect: reconnect attempts before the connection gives up and closes;
            -1 (the default) reconnects for ever.
        close_timeout: seconds closing may take (flushing what is buffered).
    """

    connect_timeout: float = 2.0
    reconnect_wait: float = 1.0
    max_reconnect: int = -1
    close_timeout: float = 5.0


class Listener(Protocol):
    """What a backend hears about its connection (called on the loop, in nats-py's callback task)."""

    async def on_disconnected(self) -> None: ...

    async def on_reconnected(self) -> None: ...

    async def on_closed(self) -> None: ...


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
        """Closed for good: by the last user, or by nats-py after ``max_reconnect`` attempts."""
        return self._client is None or self._client.is_closed

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
        settings = self.settings
        client = Client()
        self._first_error = None
        self._up = False
        with anyio.move_on_after(settings.connect_timeout) as scope:
            self._connecting = scope
            try:
                await client.connect(
                    self.servers,
                    name="micro",
                    connect_timeout=max(1, round(settings.connect_timeout)),
                    reconnect_time_wait=settings.reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=settings.max_reconnect,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except (OSError, nats.errors.Error, TimeoutError) as e:
                self._first_error = self._first_error or e
            finally:
                self._connecting = None
        if not client.is_connected:
            await _close_client(client, settings.close_timeout, self.url)
            why = self._first_error or f"no answer within {settings.connect_timeout:g} s"
            raise Unavailable(f"cannot connect to {redact(self.url)}: {describe(why)}")
        self._client = client
        self._up = True

    async def _close(self) -> None:
        client, self._client = self._client, None
        self._up = False
        forget(self)
        if client is not None:
            await _close_client(client, self.settings.close_timeout, self.url)

    async def _on_error(self, e: Exception) -> None:
        if self._connecting is not None:
            self._first_error = self._first_error or e
            self._connecting.cancel()  # fail at the first error, not after every retry
        elif isinstance(e, nats.errors.SlowConsumerError):
            log.warning("%s: a subscription is too slow, messages dropped: %s", redact(self.url), e)
        elif not self._up:  # a failed reconnect attempt: expected while the server is down
            log.debug("%s: reconnect attempt failed: %s", redact(self.url), describe(e))
        else:
            log.warning("%s: %s", redact(self.url), describe(e))

    async def _on_disconnected(self) -> None:
        if self._up and self._client is not None:
            log.warning("%s: disconnected, reconnecting", redact(self.url))
        self._up = False
        for listener in list(self.listeners):
            await listener.on_disconnected()

    async def _on_reconnected(self) -> None:
        log.info("%s: reconnected", redact(self.url))
        self._up = True
        for listener in list(self.listeners):
            await listener.on_reconnected()

    async def _on_closed(self) -> None:
        if self._client is not None:
            log.error("%s: connection closed (gave up reconnecting)", redact(self.url))
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
