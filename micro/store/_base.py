"""The store interface: key/value records with prefixes, scoped by database and table.

A ``Store`` keeps ``Record``s (a key, a bytes value, string metadata, an optional
expiry) in one *table* of one *database*, like go-micro's store; ``scope()`` gives
a view on another database/table that shares the connection. The public methods
live here and check their arguments the same way for every backend; a backend
implements the small ``_get`` / ``_put`` / ``_delete`` / ``_list`` / ``_read_prefix``
hooks, plus the :class:`~micro.resource.Resource` hooks ``_open`` / ``_close`` if it
owns a connection (called on the root store, once for all its views).

Every stored record has a *version*, a positive integer that changes on every write
of its key. ``write(record, if_version=n)`` is a compare-and-set: the backend's
``_put`` checks and writes in one atomic step (a conditional SQL statement, a NATS
expected-last-sequence header, a file lock around check-and-rename, or no await
between check and set in memory) and raises ``VersionConflict`` when the check fails.
"""

from __future__ import annotations

import abc
import builtins
import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, Self, TypeVar, cast

import msgspec

from micro import metrics
from micro.errors import MicroError, RecordNotFound, StoreError, UsageError, VersionConflict
from micro.resource import Resource, redact

MAX_KEY_BYTES = 1024
"""The longest key (UTF-8 bytes) every backend stores; longer keys raise ``UsageError``."""

_T = TypeVar("_T")


class Record(msgspec.Struct):
    """One value under one key. ``expiry`` is unix time (set by ``write(ttl=...)``), None = never.

    ``version`` is set by reads: the stored record's version, a positive integer that
    changes on every write of the key. ``write`` ignores it (pass ``if_version=``).
    """

    key: str
    value: bytes
    metadata: dict[str, str] = {}
    expiry: float | None = None
    version: int = 0


class Store(Resource, abc.ABC):
    """Key/value with prefixes, a :class:`~micro.resource.Resource`: construction does no
    I/O; ``async with store:`` connects.

    ``aclose()`` is idempotent. Views from ``scope()`` share the connection: it closes
    when the last entered handle (store or view) closes. A view needs no ``async with``
    of its own while the store it came from is open.
    """

    kind: ClassVar[str] = "store"
    error: ClassVar[type[MicroError]] = StoreError
    url: str
    database: str
    table: str

    def __init__(
        self,
        url: str,
        *,
        database: str = "micro",
        table: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.database = _check_name("database", database)
        self.table = _check_name("table", table)
        self._clock = clock
        self._root: Self = cast(Self, self)  # scope() views point here

    @property
    def _resource(self) -> Resource:
        return self._root

    @property
    def clock(self) -> Callable[[], float]:
        """The time source for expiry, shared with every view (``time.time``; tests replace it)."""
        return self._root._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._root._clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.url)!r}, database={self.database!r}, table={self.table!r})"

    def scope(self, database: str, table: str | None = None) -> Self:
        """A view on ``database``/``table`` (default ``"default"``) sharing this store's connection."""
        view = copy.copy(self)
        view.database = _check_name("database", database)
        view.table = _check_name("table", table if table is not None else "default")
        view._held = 0
        return view

    async def read(
        self, key: str, *, prefix: bool = False, limit: int | None = None, offset: int = 0, reverse: bool = False
    ) -> list[Record]:
        """The record under ``key`` (a one-item list), or with ``prefix=True`` every live record
        whose key starts with ``key``, sorted by key (descending if ``reverse``), then windowed
        by ``offset``/``limit``. A missing or expired exact key raises ``RecordNotFound``.

        Example: the last 10 turns, newest first: ``await store.read("chat/", prefix=True, limit=10, reverse=True)``
        """
        self._check_open()
        if not prefix:
            _check_key(key)
            get = self._get(key, self.clock())
            found = await (metrics.store_op(self, "read", get) if metrics.ON else get)
            if found is None:
                raise RecordNotFound(f"no record {key!r} in store {self.database}/{self.table}")
            return [found]
        _check_key(key, empty=True)
        _check_window(limit, offset)
        if limit == 0:
            return []
        read = self._read_prefix(key, self.clock(), limit, offset, reverse)
        return await (metrics.store_op(self, "read", read) if metrics.ON else read)

    async def write(self, record: Record, *, ttl: float | None = None, if_version: int | None = None) -> int:
        """Store ``record`` under its key and return its new version. With ``ttl`` (seconds,
        > 0) it expires at ``clock() + ttl``; without, the record's own ``expiry`` is kept.
        The caller's record is not changed.

        ``if_version`` makes the write conditional: ``None`` replaces whatever is there;
        ``0`` writes only if no live record is there (an expired one counts as absent);
        ``n > 0`` only if the live record's version is ``n``. Otherwise it raises
        ``VersionConflict`` (naming the key, the expected and the current version) and
        changes nothing.

        Example: an increment that is safe across processes::

            while True:
                [rec] = await store.read("counter")
                try:
                    await store.write(Record("counter", b"%d" % (int(rec.value) + 1)), if_version=rec.version)
                    break
                except VersionConflict:
                    continue  # someone else wrote first: read again
        """
        self._check_open()
        if not isinstance(record, Record):
            raise UsageError(f"store.write takes a Record, not {type(record).__name__}")
        _check_key(record.key)
        if not isinstance(record.value, bytes):
            raise UsageError(f"Record.value must be bytes, not {type(record.value).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in record.metadata.items()):
            raise UsageError("Record.metadata must map str to str")
        expiry = record.expiry
        if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, int | float)
                                   or not math.isfinite(expiry)):
            # the backends disagreed: nats raised OverflowError on inf, file read nan back as None
            raise UsageError(f"Record.expiry must be a finite time in seconds or None, not {expiry!r}")
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0 or math.isinf(ttl):
                raise UsageError(f"ttl must be a positive number of seconds, not {ttl!r}")
            expiry = self.clock() + ttl
        if if_version is not None and (isinstance(if_version, bool) or not isinstance(if_version, int)
                                       or if_version < 0):
            raise UsageError(f"if_version must be None, 0 (create only) or a version > 0, not {if_version!r}")
        put = self._put(Record(record.key, record.value, dict(record.metadata), expiry), if_version)
        return await (metrics.store_op(self, "write", put) if metrics.ON else put)

    async def delete(self, key: str) -> None:
        """Remove the record under ``key``. A missing key is not an error."""
        self._check_open()
        _check_key(key)
        delete = self._delete(key)
        await (metrics.store_op(self, "delete", delete) if metrics.ON else delete)

    async def list(
        self, prefix: str = "", *, limit: int | None = None, offset: int = 0, reverse: bool = False
    ) -> list[str]:
        """The live keys starting with ``prefix``, sorted (descending if ``reverse``), then windowed."""
        self._check_open()
        _check_key(prefix, empty=True)
        _check_window(limit, offset)
        if limit == 0:
            return []
        keys = self._list(prefix, self.clock(), limit, offset, reverse)
        return await (metrics.store_op(self, "list", keys) if metrics.ON else keys)

    def _conflict(self, key: str, expected: int, current: int | None) -> VersionConflict:
        """The error a failed conditional write raises; ``current`` 0 = no live record, None = unknown."""
        want = "no record" if expected == 0 else f"version {expected}"
        found = "an unknown version" if current is None else "no record" if current == 0 else f"version {current}"
        where = f"{redact(self.url)} ({self.database}/{self.table})"
        return VersionConflict(
            f"store {where}: conditional write of {key!r} expected {want} but found {found}; "
            "nothing was written: read the record again and retry",
            store=where, key=key, expected=expected, current=current,
        )

    @abc.abstractmethod
    async def _get(self, key: str, now: float) -> Record | None:
        """The record under ``key`` unless missing or expired at ``now``; a copy the caller may change."""

    @abc.abstractmethod
    async def _put(self, record: Record, if_version: int | None) -> int:
        """Replace the record under ``record.key`` (its expiry is final) and return the new
        version; with ``if_version`` (see ``write``) check and write atomically, raising
        ``self._conflict(...)`` if the check fails."""

    @abc.abstractmethod
    async def _delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    @abc.abstractmethod
    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> builtins.list[str]:
        """Live keys with ``prefix``, sorted, windowed (see ``window``); ``limit`` is never 0."""

    @abc.abstractmethod
    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> builtins.list[Record]:
        """Live records with ``prefix``, sorted by key, windowed; ``limit`` is never 0."""


def window(items: Sequence[_T], limit: int | None, offset: int, reverse: bool) -> list[_T]:
    """``items`` (sorted ascending) in the requested order, ``offset`` skipped, at most ``limit``."""
    ordered = items[::-1] if reverse else items
    end = None if limit is None else offset + limit
    return list(ordered[offset:end])


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 128:
        raise UsageError(f"store {kind} must be a non-empty string of at most 128 characters, not {name!r}")
    return name


def _check_key(key: str, *, empty: bool = False) -> None:
    """Keys (and prefixes, which may be empty): strings without NUL, at most MAX_KEY_BYTES."""
    if not isinstance(key, str) or not (key or empty) or "\x00" in key:
        raise UsageError(f"store key must be a non-empty string without NUL, not {key!r:.80}")
    try:
        if len(key.encode()) > MAX_KEY_BYTES:
            raise UsageError(f"store key {key[:40]!r}… is longer than {MAX_KEY_BYTES} UTF-8 bytes")
    except UnicodeEncodeError:
        raise UsageError(f"store key {key!r:.80} is not valid Unicode") from None


def _check_window(limit: int | None, offset: int) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise UsageError(f"limit must be None or an int >= 0, not {limit!r}")
    if not isinstance(offset, int) or offset < 0:
        raise UsageError(f"offset must be an int >= 0, not {offset!r}")
