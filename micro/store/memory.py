"""The in-memory store: one dict per database/table, for tests and single-process apps.

It is a real backend, not a mock: it passes the same conformance kit as the file,
PostgreSQL and NATS stores. Keys are kept sorted (``sortedcontainers.SortedDict``), so a
prefix read costs O(log n + what it returns) however many other records there are: an
agent's history window does not slow down as other sessions and run records pile up.
Records live as long as the ``MemoryStore`` object (closing and re-entering it keeps
them); expiry is checked on read, and an expired record is dropped when a read meets it or,
for one never read again (an idempotency record), by any later read or write of its table: each
table keeps a heap of its expiry times, and every operation drops the records whose time has
passed (a look at the heap's top; each record popped once).
Versions come from one counter per store (shared by its views), so a key deleted and
written again never gets a version it had before. A conditional write checks and sets
with no await in between: nothing else in the process can run in the middle.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from collections.abc import Callable, Iterator

from sortedcontainers import SortedDict

from micro.store._base import Record, Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Records in a dict. ``from_url("memory://")`` makes one.

    Example:
        async with MemoryStore() as store:
            await store.write(Record("greeting", b"hello"))
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        database: str = "micro",
        table: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(url, database=database, table=table, clock=clock)
        # Views made by scope() are shallow copies: they share this dict of tables.
        self._tables: dict[tuple[str, str], SortedDict[str, Record]] = {}
        self._versions = itertools.count(1)  # shared by views too
        # per table, (expiry, key) of every record written with one, soonest first (shared by views too)
        self._expiries: dict[tuple[str, str], list[tuple[float, str]]] = {}

    def _records(self) -> SortedDict[str, Record]:
        table = self._tables.get((self.database, self.table))
        if table is None:
            table = self._tables[(self.database, self.table)] = SortedDict()
        return table

    def _live(self, prefix: str, now: float, limit: int | None = None, offset: int = 0,
              reverse: bool = False) -> list[Record]:
        """The live records under ``prefix`` in key order (descending if ``reverse``), windowed;
        expired ones met on the way are dropped."""
        records = self._records()
        self._sweep(records, now)
        found: list[Record] = []
        expired: list[str] = []
        skip, room = offset, limit
        for key in _prefixed(records, prefix, reverse):
            record = records[key]
            if record.expiry is not None and record.expiry <= now:
                expired.append(key)
            elif skip:
                skip -= 1
            else:
                if room is not None:
                    if room == 0:
                        break
                    room -= 1
                found.append(record)
        for key in expired:
            del records[key]
        return found

    async def _get(self, key: str, now: float) -> Record | None:
        records = self._records()
        self._sweep(records, now)
        record = records.get(key)
        if record is None:
            return None
        if record.expiry is not None and record.expiry <= now:
            del records[key]
            return None
        return _copy(record)

    async def _put(self, record: Record, if_version: int | None) -> int:
        records = self._records()
        if if_version is not None:
            old = records.get(record.key)
            current = 0 if old is None or (old.expiry is not None and old.expiry <= self.clock()) else old.version
            if current != if_version:
                raise self._conflict(record.key, if_version, current)
        record.version = next(self._versions)
        records[record.key] = record  # already a private copy (Store.write made it)
        if record.expiry is not None:
            heapq.heappush(self._expiries.setdefault((self.database, self.table), []), (record.expiry, record.key))
        self._sweep(records, self.clock())
        return record.version

    def _sweep(self, records: SortedDict[str, Record], now: float) -> None:
        """Drop the table's records whose expiry has passed (an entry of a key written again since is skipped)."""
        heap = self._expiries.get((self.database, self.table))
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            record = records.get(key)
            if record is not None and record.expiry is not None and record.expiry <= now:
                del records[key]

    async def _delete(self, key: str) -> None:
        self._records().pop(key, None)

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        return [r.key for r in self._live(prefix, now, limit, offset, reverse)]

    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Record]:
        return [_copy(r) for r in self._live(prefix, now, limit, offset, reverse)]


def _copy(record: Record) -> Record:
    return Record(record.key, record.value, dict(record.metadata), record.expiry, record.version)


def _prefixed(records: SortedDict[str, Record], prefix: str, reverse: bool) -> Iterator[str]:
    """The keys starting with ``prefix``, in order: one bisection, then only the matches."""
    if not prefix:
        return iter(reversed(records.keys()) if reverse else records.keys())
    last = ord(prefix[-1])
    if last < sys.maxunicode:  # every key with the prefix sorts in [prefix, prefix with its last char + 1)
        upper = prefix[:-1] + chr(last + 1)
        return iter(records.irange(prefix, upper, inclusive=(True, False), reverse=reverse))
    return (k for k in records.irange(prefix, reverse=reverse) if k.startswith(prefix))
