"""The lifecycle every backend shares: an async resource that is new, open or closed.

Registries, brokers, stores (and the NATS connection they may share) are all
:class:`Resource` subclasses, so they are built, opened and closed one way::

      from_url(url)        async with / acquire()        last release / aclose()
    ────────────────► new ────────────────────────► open ───────────────────────► closed
                                                     ▲                               │
                                                     └──── async with (opens anew) ──┘

- **Construction** (``Kind.from_url(url)``, or the class with keyword options) does no I/O.
- **Entering** takes a reference: the first one runs the backend's ``_open()`` hook.
  Entering the same object twice takes two references on every backend; each
  ``async with`` block gives its own back when it ends, and the backend closes
  with the last one (``_close()``). That is how several runtimes share one backend.
- **aclose()** gives back every reference the object holds, so it closes now;
  it is idempotent. A closed resource can be entered again: it opens anew.
- **Views** (``Store.scope()``) are handles on one resource: each holds its own
  references, and the connection closes when no handle holds one.
- **Use while not open** raises the kind's error (``StoreError``, ``RegistryError``,
  ``BrokerError``) saying so; backends call :meth:`Resource._check_open`.

Foreign errors (nats-py's, asyncpg's, the file system's) are translated at one edge
per backend with :func:`map_errors`, and every message names the backend by its
:func:`redact`-ed URL: a password never reaches a log or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import ClassVar, Self

from micro.errors import MicroError

__all__ = ["ErrorMap", "Resource", "State", "aclose", "map_errors", "reason", "redact"]


class State(enum.Enum):
    """Where a resource is in its life."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Resource:
    """An async resource with an explicit state, reference-counted ``_open``/``_close`` hooks.

    Subclasses set :attr:`kind` (``"store"``, ``"broker"``…) and :attr:`error` (the
    error raised when used while not open), and override ``_open``/``_close``. They
    need not call ``Resource.__init__``: the bookkeeping starts from class defaults.

    Example::

        class EchoRegistry(Registry):        # Registry is a Resource
            async def _open(self) -> None:   # runs on the first `async with`
                self._conn = await connect(self.url)

            async def _close(self) -> None:  # runs when the last user leaves
                await self._conn.close()
    """

    kind: ClassVar[str] = "resource"
    """What the resource is, for messages (``"store"``, ``"registry"``, ``"broker"``)."""
    error: ClassVar[type[MicroError]] = MicroError
    """The error :meth:`_check_open` raises."""
    url: str = ""

    _state: State = State.NEW
    _users: int = 0  # references on the resource (the root, for views)
    _held: int = 0  # references this handle holds
    _lifecycle_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build the backend for ``url`` (options in its query). No I/O."""
        return cls(url)  # type: ignore[call-arg]  # backends take the URL first

    @property
    def _resource(self) -> Resource:
        """The object whose references are counted: ``self``, or the root of a view."""
        return self

    @property
    def state(self) -> State:
        """``State.NEW`` until first opened, ``OPEN`` while referenced, then ``CLOSED``."""
        return self._resource._state

    @property
    def is_open(self) -> bool:
        return self._resource._state is State.OPEN

    def _lock(self) -> asyncio.Lock:
        root = self._resource
        if root._lifecycle_lock is None:
            root._lifecycle_lock = asyncio.Lock()
        return root._lifecycle_lock

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()

    async def acquire(self) -> None:
        """Take a reference; the first one opens the resource (``_open``)."""
        root = self._resource
        async with self._lock():
            if root._users == 0:
                await root._open()  # if it fails, nothing is held and the state is unchanged
                root._state = State.OPEN
            root._users += 1
            self._held += 1

    async def release(self) -> None:
        """Give back one reference; the last one closes the resource (``_close``)."""
        await self._give_back(1)

    async def aclose(self) -> None:
        """Give back every reference this object holds, so it closes now. Idempotent."""
        await self._give_back(None)

    async def _give_back(self, count: int | None) -> None:
        if self._held == 0:
            return  # nothing held: also the way out for a handler closing what is closing it
        root = self._resource
        async with self._lock():
            n = self._held if count is None else min(count, self._held)
            self._held -= n
            root._users -= n
            if root._users == 0 and n:
                root._state = State.CLOSED
                await root._close()

    def _check_open(self, action: str = "") -> None:
        """Raise :attr:`error` unless the resource is open."""
        state = self._resource._state
        if state is not State.OPEN:
            what = f"cannot {action}: " if action else ""
            how = "is not open: use `async with` first" if state is State.NEW else \
                "is closed: `async with` opens it again"
            raise self.error(f"{what}{self.kind} {redact(self.url)} {how}")

    async def _open(self) -> None:
        """Connect and start background work (first reference, under the lifecycle lock)."""

    async def _close(self) -> None:
        """Stop background work and disconnect (last reference, under the lifecycle lock)."""


async def aclose(thing: object) -> None:
    """Close an async iterator (or anything) now if it can be closed: what ``contextlib.aclosing``
    does on exit, for an object that may have no ``aclose`` (a handler may return any async
    iterator). The one way micro ends a stream its consumer stopped early: the generator runs
    its ``finally`` now, not when it is collected."""
    close = getattr(thing, "aclose", None)
    if close is not None:
        await close()


def redact(url: str) -> str:
    """``url`` without its password, for messages and reprs."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def reason(exc: BaseException) -> str:
    """A foreign exception in one line: its message, or its type's name when it has none."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


ErrorMap = Mapping[
    type[BaseException] | tuple[type[BaseException], ...], type[MicroError] | tuple[type[MicroError], str]
]
"""Foreign exception type(s) -> micro error class, or (class, what to say instead of the foreign message)."""


@contextlib.contextmanager
def map_errors(mapping: ErrorMap, where: str, *,
               describe: Callable[[BaseException], str] = reason) -> Iterator[None]:
    """Translate foreign exceptions at a backend's edge (first matching entry wins).

    The raised error reads ``"{where}: {reason}"`` and chains the original. ``where``
    should name the backend by its redacted URL and the action; ``describe`` turns the
    foreign error into the reason. Errors of micro's own tree and anything unmatched
    pass through unchanged.

    Example::

        with map_errors({OSError: Unavailable}, f"store {redact(self.url)}: read {key!r}"):
            data = await self._conn.get(key)
    """
    try:
        yield
    except MicroError:
        raise
    except Exception as exc:
        for foreign, target in mapping.items():
            if isinstance(exc, foreign):
                cls, text = target if isinstance(target, tuple) else (target, describe(exc))
                raise cls(f"{where}: {text}") from exc
        raise
