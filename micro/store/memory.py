"""The in-memory store: one dict per database/table, for tests and single-process apps.

It is a real backend, not a mock: it passes the same conformance kit as the file,
PostgreSQL and NATS stores. Records live as long as the ``MemoryStore`` object
(closing and re-entering it keeps them); expiry is checked on read, and an expired
record is dropped when a read meets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from micro.store._base import Record, Store, window

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
        self._tables: dict[tuple[str, str], dict[str, Record]] = {}

    def _records(self) -> dict[str, Record]:
        return self._tables.setdefault((self.database, self.table), {})

    def _live(self, prefix: str, now: float) -> list[Record]:
        records = self._records()
        found = []
        for key in sorted(k for k in records if k.startswith(prefix)):
            record = records[key]
            if record.expiry is not None and record.expiry <= now:
                del records[key]
            else:
                found.append(record)
        return found

    async def _get(self, key: str, now: float) -> Record | None:
        records = self._records()
        record = records.get(key)
        if record is None:
            return None
        if record.expiry is not None and record.expiry <= now:
            del records[key]
            return None
        return _copy(record)

    async def _put(self, record: Record) -> None:
        self._records()[record.key] = record  # already a private copy (Store.write made it)

    async def _delete(self, key: str) -> None:
        self._records().pop(key, None)

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        return [r.key for r in window(self._live(prefix, now), limit, offset, reverse)]

    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Record]:
        return [_copy(r) for r in window(self._live(prefix, now), limit, offset, reverse)]


def _copy(record: Record) -> Record:
    return Record(record.key, record.value, dict(record.metadata), record.expiry)
