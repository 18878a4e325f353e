"""The connections a server holds: how many, how long idle, and what an accept error costs.

One :class:`ConnectionLimit` per service, shared by its gRPC and native listeners:

- **A bound on their number** (``max_connections``). Past it a new connection is
  refused cleanly (the gRPC listener sends an HTTP/2 GOAWAY saying why, the native
  one an ERROR frame). The native listener closes it at once; the gRPC one
  half-closes it and waits (up to ``REFUSED_LINGER``, 1 s) for its client to read the
  GOAWAY and close, so the client can tell "refused, nothing ran" from a reset; at most
  ``max_lingering`` (64) refused connections wait so at once, the rest are closed at
  once (a flood of refused clients costs at most that many descriptors). The default is derived from the process's
  descriptor limit (``RLIMIT_NOFILE``), keeping an eighth of it (at least 64) for
  the process's own work: registry heartbeats, store files, outgoing calls. Idle
  clients holding every descriptor took a service off the registry before.
- **An idle timeout** (``idle_timeout``): a connection with nothing in flight that
  has been silent that long is closed (a client that went away without closing).
- Refusals are logged once per episode: the first, then when connections are
  accepted again.

:func:`quiet_accept_errors` makes the loop's accept errors (``EMFILE``/``ENFILE``:
the process or the machine is out of descriptors) one warning per episode instead
of a traceback per attempt (101,018 lines in 21 s before). The stock asyncio loop
pauses a listener for a second after each such error; uvloop's libuv closes the
pending connections it cannot hold.

:func:`write_all` writes what a connection queued in one loop iteration in one
system call without copying a large payload to join it (the native wire and the
HTTP gateway write through it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import weakref
from typing import Any, Protocol

from micro.errors import UsageError

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_LINGERING", "Connection", "ConnectionLimit", "default_max_connections",
           "quiet_accept_errors", "write_all"]

log = logging.getLogger("micro.connections")

DEFAULT_IDLE_TIMEOUT = 300.0
"""Seconds a connection with nothing in flight may stay silent before the server closes it."""
DEFAULT_MAX_LINGERING = 64
"""Refused connections a service keeps half-closed at once for their clients to read why."""

LARGE = 32 * 1024
"""A piece this big is written as it is, not copied into a joined buffer (see :func:`write_all`)."""


def write_all(transport: asyncio.WriteTransport, out: list[bytes]) -> None:
    """Write ``out`` in order: pieces joined into one write (one system call for many small frames), but
    a large piece (a big reply's body) handed over as it is, not copied into the join.

    A transport whose ``writelines`` gathers without joining (uvloop; asyncio's from Python 3.12) gets
    the list as it is; asyncio's 3.11 ``writelines`` joins, so there the small pieces around a large one
    are joined and the large one written on its own, and nothing more once a write failed (the
    transport is closing).
    """
    if len(out) == 1:
        transport.write(out[0])
        return
    if max(map(len, out)) < LARGE:
        transport.write(b"".join(out))
        return
    if type(transport).writelines is not asyncio.WriteTransport.writelines:
        transport.writelines(out)
        return
    small: list[bytes] = []
    for piece in out:
        if len(piece) < LARGE:
            small.append(piece)
            continue
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))
            small = []
            if transport.is_closing():  # the write failed (the peer went): nothing more goes out
                return
        transport.write(piece)
        if transport.is_closing():
            return
    if small:
        transport.write(small[0] if len(small) == 1 else b"".join(small))


def default_max_connections() -> int:
    """The connection bound a server gets by default: the descriptor limit less an eighth (at least 64)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return max(16, soft - max(64, soft // 8))


class Connection(Protocol):
    """What :class:`ConnectionLimit` needs of a server's connection."""

    def idle_since(self) -> float | None:
        """Loop time of the last byte received while nothing is in flight; ``None`` when busy."""

    def drop(self) -> None:
        """Close the connection."""


class ConnectionLimit:
    """The open connections of one service's listeners: bounded, and swept when idle.

    Args:
        where: names the service in messages.
        max_connections: most connections open at once (``None``: :func:`default_max_connections`).
        idle_timeout: seconds a connection with nothing in flight may stay silent.
        max_lingering: most refused connections kept half-closed at once for their clients to read
            why (:meth:`linger`); past it a refused connection is closed at once.

    ``open`` is the number open now, ``peak`` the most ever, ``refused`` the
    connections turned away, ``lingering`` the refused ones still half-closed.
    """

    def __init__(self, where: str, max_connections: int | None = None,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_lingering: int = DEFAULT_MAX_LINGERING) -> None:
        if max_connections is not None and max_connections < 1:
            raise UsageError(f"{where}: max_connections must be >= 1 (or None for the default)")
        if idle_timeout <= 0:
            raise UsageError(f"{where}: idle_timeout must be > 0 seconds")
        self.where = where
        self.max_connections = max_connections if max_connections is not None else default_max_connections()
        self.idle_timeout = idle_timeout
        self.peak = 0
        self.refused = 0
        self.max_lingering = max_lingering
        self.lingering = 0
        self._open: set[Connection] = set()
        self._refusing = 0  # refusals in the current episode

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, conn: Connection) -> str | None:
        """Count ``conn`` in, or return why it is refused (it is then not counted)."""
        if len(self._open) >= self.max_connections:
            self.refused += 1
            self._refusing += 1
            message = (f"{self.where} has {len(self._open)} connections open, its limit (max_connections): "
                       "try another node or later")
            if self._refusing == 1:
                log.warning("%s: refusing new connections: %d open, the limit (max_connections); logged again "
                            "when it accepts again", self.where, len(self._open))
            return message
        if self._refusing:
            log.info("%s: accepting connections again (%d refused)", self.where, self._refusing)
            self._refusing = 0
        self._open.add(conn)
        self.peak = max(self.peak, len(self._open))
        return None

    def discard(self, conn: Connection) -> None:
        self._open.discard(conn)

    def linger(self) -> bool:
        """Whether a refused connection may stay half-closed for its client to read why (counted in
        :attr:`lingering` until :meth:`lingered`), or must be closed at once (``max_lingering`` do)."""
        if self.lingering >= self.max_lingering:
            return False
        self.lingering += 1
        return True

    def lingered(self) -> None:
        """A refused connection that lingered is closed."""
        self.lingering -= 1

    async def sweep(self) -> None:
        """Close connections silent for ``idle_timeout`` with nothing in flight (runs until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_timeout / 4)
            stale = loop.time() - self.idle_timeout
            for conn in list(self._open):
                since = conn.idle_since()
                if since is not None and since < stale:
                    conn.drop()


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_QUIET_FOR = 2.0  # seconds without an accept error that end an episode
_guards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AcceptErrors] = weakref.WeakKeyDictionary()


class _AcceptErrors:
    """A loop exception handler that logs accept errors once per episode and passes the rest on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.failures = 0
        self.last = 0.0
        self._check: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if (isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES
                and ("accept" in message or "listen" in message)):
            self.failed(exc)
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def failed(self, exc: OSError) -> None:
        self.failures += 1
        self.last = self.loop.time()
        if self.failures == 1:
            log.warning("accepting connections failed: %s; new connections wait (or are closed) until "
                        "descriptors are free; logged again when it has stopped", exc)
            self._check = self.loop.call_later(_QUIET_FOR, self._ended)

    def _ended(self) -> None:
        quiet = self.loop.time() - self.last
        if quiet < _QUIET_FOR:
            self._check = self.loop.call_later(_QUIET_FOR - quiet, self._ended)
            return
        log.info("accepting connections: no errors for %g s (after %d failed attempts)", _QUIET_FOR, self.failures)
        self.failures = 0
        self._check = None


def quiet_accept_errors(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Log the running loop's accept errors once per episode, not per attempt (idempotent)."""
    loop = loop or asyncio.get_running_loop()
    guard = _guards.get(loop)
    if guard is not None and loop.get_exception_handler() is guard:
        return
    guard = _AcceptErrors(loop)
    _guards[loop] = guard
    loop.set_exception_handler(guard)
