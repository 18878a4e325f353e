"""The PostgreSQL store: one table per store database, through an asyncpg pool.

Database ``agent`` lives in the table ``micro_store_agent`` (in the connection's
current schema), created on first use::

    tbl text, key text COLLATE "C", value bytea, metadata jsonb, expiry double precision,
    version bigint, PRIMARY KEY (tbl, key)

``COLLATE "C"`` orders keys by code point, as Python sorts them, and lets a prefix
become an index range (``key >= 'abc' AND key < 'abd'``), so no ``LIKE`` pattern
needs escaping and reading the last N records under a prefix is an index scan.
A write is one upsert (``INSERT … ON CONFLICT … DO UPDATE``).

Versions: every write sets ``version`` to its transaction's id (``txid_current()``,
64-bit and never reused), so it changes on every write and a key deleted and written
again never gets an old version back. A conditional write is one statement: create
only (``if_version=0``) is an insert whose ``ON CONFLICT`` branch updates only an
expired row; ``if_version=n`` is ``UPDATE … WHERE version = n`` on a live row. Tables
made before versions existed get the column on first use (``ALTER TABLE … ADD COLUMN
version bigint NOT NULL DEFAULT 1``: no rewrite, old rows read as version 1). Clients
of older micro versions still writing to the table leave the version as it was: upgrade
all writers before relying on conditional writes.

TTL: ``expiry`` (unix time by the store's clock) is compared on every read; expired
rows are deleted lazily: when a read meets one, and once per table when the store
first touches it.

A query that fails because its connection dropped (server restart, failover,
``pg_terminate_backend``) is retried once on a fresh connection; if that fails too
the store raises ``Unavailable`` naming the URL and the reason. While the server is
down that is logged once (a warning), and once more when a query works again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from micro.errors import ConfigError, StoreError, Unavailable
from micro.resource import redact
from micro.store._base import Record, Store
from micro.tasks import Streak

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the postgres store needs asyncpg: pip install 'micro[postgres]'", name=exc.name) from exc

__all__ = ["PostgresStore", "table_name"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_DROPPED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # includes "connection was closed in the middle of operation"
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,  # "connection is closed"
    OSError,  # includes ConnectionError and TimeoutError
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
    tbl text NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{{}}',
    expiry double precision,
    version bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (tbl, key)
)"""

# Tables made before versions existed: add the column (once; catalog lookup first, so an
# up-to-date table is never locked for it).
_HAS_VERSION = """
SELECT EXISTS (
    SELECT 1 FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = 'version' AND NOT attisdropped
)"""
_ADD_VERSION = "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 1"


def table_name(database: str) -> str:
    """The SQL table (unquoted) that holds store ``database``: ``micro_store_<database>``,
    hashed when PostgreSQL's 63-byte identifier limit would truncate it."""
    name = "micro_store_" + database
    if len(name.encode()) > 63:
        name = "micro_store_" + hashlib.sha256(database.encode()).hexdigest()[:40]
    return name


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (None: none)."""
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point <= 0x10FFFF:
            return "".join(chars) + chr(0xE000 if 0xD800 <= point <= 0xDFFF else point)
    return None


class PostgresStore(Store):
    """Records in PostgreSQL at ``url`` (``postgresql://user:password@host:5432/db``).

    Example:
        async with PostgresStore("postgresql://app@db.internal/app") as store:
            await store.write(Record("orders/1001", b"{...}", {"type": "json"}))
    """

    def __init__(
        self,
        url: str,
        *,
        database: str = "micro",
        table: str = "default",
        clock: Callable[[], float] = time.time,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(url, database=database, table=table, clock=clock)
        if urllib.parse.urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"PostgreSQL store URL {redact(url)!r} must start with postgresql://")
        self.min_size, self.max_size, self.connect_timeout = min_size, max_size, connect_timeout
        # Name the connections in pg_stat_activity, unless the URL does (…?application_name=app).
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        self._settings = None if "application_name" in query else {"application_name": "micro-store"}
        self._pool: Any = None
        self._schema = ""
        self._ready: set[str] = set()  # databases whose table exists
        self._prepare_lock = asyncio.Lock()
        # a server that is down is logged once (and once when it answers again), not per query
        self._streak = Streak(f"store {redact(url)}: the connection to PostgreSQL", log)

    async def _open(self) -> None:
        pool = None
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                server_settings=self._settings,
            )
            schema = await pool.fetchval("SELECT current_schema()")
        except (*_DROPPED, asyncpg.PostgresError) as exc:
            if pool is not None:
                pool.terminate()
            raise Unavailable(f"store {redact(self.url)}: cannot connect: {_why(exc)}") from exc
        except (ValueError, TypeError) as exc:  # asyncpg's reading of the URL: a port that is not a number, …
            if pool is not None:
                pool.terminate()
            raise ConfigError(f"store {redact(self.url)}: the URL is not one PostgreSQL can use ({exc}); "
                              "write it as postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from exc
        if schema is None:
            pool.terminate()
            raise StoreError(f"store {redact(self.url)}: no current schema to create tables in (check search_path)")
        self._pool, self._schema, self._ready = pool, schema, set()

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(10):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    def _table(self) -> str:
        return f"{_quote(self._root._schema)}.{_quote(table_name(self.database))}"

    async def _prepare(self, conn: Any) -> None:
        """Create this database's table (once per pool), then sweep its expired rows."""
        root = self._root
        if self.database in root._ready:
            return
        async with root._prepare_lock:
            if self.database in root._ready:
                return
            try:
                await conn.execute(_SCHEMA.format(t=self._table()))
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                pass  # another client created it at the same moment
            if not await conn.fetchval(_HAS_VERSION, self._table()):
                await conn.execute(_ADD_VERSION.format(t=self._table()))
            await conn.execute(f"DELETE FROM {self._table()} WHERE expiry <= $1", self.clock())
            root._ready.add(self.database)

    async def _run(self, action: str, query: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run ``query`` on a pooled connection; retry once if the connection dropped."""
        where = f"store {redact(self.url)} ({self.database}/{self.table})"
        for attempt in (1, 2):
            pool = self._root._pool
            if pool is None:
                raise StoreError(f"{where}: {action}: the store was closed")
            try:
                async with pool.acquire() as conn:
                    await self._prepare(conn)
                    result = await query(conn)
                self._root._streak.ok()
                return result
            except asyncpg.UndefinedTableError as exc:  # dropped behind our back: create it again
                self._root._ready.discard(self.database)
                if attempt == 2:
                    raise StoreError(f"{where}: {action}: {_why(exc)}") from exc
            except _DROPPED as exc:
                if attempt == 2:
                    self._root._streak.failed(exc)
                    raise Unavailable(f"{where}: {action}: connection lost twice: {_why(exc)}") from exc
                # a warning while the server was thought up; at debug while it is known down
                level = logging.DEBUG if self._root._streak.failures else logging.WARNING
                log.log(level, "%s: %s: connection lost (%s); retrying once", where, action, _why(exc))
                await pool.expire_connections()  # the others may be dead too
            except asyncpg.PostgresError as exc:
                raise StoreError(f"{where}: {action}: {_why(exc)}") from exc
        raise AssertionError("unreachable")

    async def _get(self, key: str, now: float) -> Record | None:
        sql = f"SELECT value, metadata::text, expiry, version FROM {self._table()} WHERE tbl = $1 AND key = $2"
        row = await self._run(f"read {key!r}", lambda c: c.fetchrow(sql, self.table, key))
        if row is None:
            return None
        if row[2] is not None and row[2] <= now:
            # Conditional on the expiry, so a fresh write racing this read survives.
            sql = f"DELETE FROM {self._table()} WHERE tbl = $1 AND key = $2 AND expiry <= $3"
            await self._run(f"expire {key!r}", lambda c: c.execute(sql, self.table, key, now))
            return None
        return Record(key, row[0], msgspec.json.decode(row[1], type=dict[str, str]), row[2], row[3])

    async def _put(self, record: Record, if_version: int | None) -> int:
        t = self._table()
        args: list[Any] = [self.table, record.key, record.value, msgspec.json.encode(record.metadata).decode(),
                           record.expiry]
        update = ("SET value = EXCLUDED.value, metadata = EXCLUDED.metadata, expiry = EXCLUDED.expiry,"
                  " version = EXCLUDED.version")
        insert = (f"INSERT INTO {t} AS r (tbl, key, value, metadata, expiry, version)"
                  " VALUES ($1, $2, $3, $4::jsonb, $5, txid_current())")
        if if_version is None:
            sql = f"{insert} ON CONFLICT (tbl, key) DO UPDATE {update} RETURNING version"
        elif if_version == 0:  # create: over nothing, or over an expired row
            sql = f"{insert} ON CONFLICT (tbl, key) DO UPDATE {update} WHERE r.expiry <= $6 RETURNING version"
            args.append(self.clock())
        else:
            sql = (f"UPDATE {t} SET value = $3, metadata = $4::jsonb, expiry = $5, version = txid_current()"
                   " WHERE tbl = $1 AND key = $2 AND version = $6 AND (expiry IS NULL OR expiry > $7)"
                   " RETURNING version")
            args += [if_version, self.clock()]
        version: int | None = await self._run(f"write {record.key!r}", lambda c: c.fetchval(sql, *args))
        if version is None:
            current = await self._get(record.key, self.clock())
            raise self._conflict(record.key, if_version or 0, 0 if current is None else current.version)
        return version

    async def _delete(self, key: str) -> None:
        sql = f"DELETE FROM {self._table()} WHERE tbl = $1 AND key = $2"
        await self._run(f"delete {key!r}", lambda c: c.execute(sql, self.table, key))

    async def _select(
        self, columns: str, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Any]:
        upper = _successor(prefix)
        sql = (
            f"SELECT {columns} FROM {self._table()}"
            " WHERE tbl = $1 AND key >= $2 AND (expiry IS NULL OR expiry > $3)"
            + (" AND key < $6" if upper is not None else "")
            + f" ORDER BY key {'DESC' if reverse else 'ASC'} LIMIT $4 OFFSET $5"
        )
        args = [self.table, prefix, now, limit, offset] + ([upper] if upper is not None else [])
        rows: list[Any] = await self._run(f"read prefix {prefix!r}", lambda c: c.fetch(sql, *args))
        return rows

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        return [row[0] for row in await self._select("key", prefix, now, limit, offset, reverse)]

    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Record]:
        rows = await self._select("key, value, metadata::text, expiry, version", prefix, now, limit, offset, reverse)
        return [Record(r[0], r[1], msgspec.json.decode(r[2], type=dict[str, str]), r[3], r[4]) for r in rows]


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
