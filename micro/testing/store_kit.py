"""The store conformance kit: the behaviour every store backend must show.

A backend passes when every check in :data:`CHECKS` passes against it; the memory
store runs it too, so the in-process double cannot drift from the real backends.
Each check gets a factory returning a new, unopened store whose namespace (its
database) is empty, so one server can serve many runs. Checks never sleep: expiry
is proven with a :class:`Clock` the kit sets on the store::

    from micro.testing.store_kit import CHECKS, check_store

    await check_store(lambda: MyStore("my://server", database=f"kit-{uuid.uuid4().hex}"))

    @pytest.mark.parametrize("check", CHECKS)                  # or one test each
    async def test_my_store(check):
        await CHECKS[check](make_store)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from micro.errors import Conflict, RecordNotFound, StoreError, UsageError, VersionConflict
from micro.store import MAX_KEY_BYTES, Record, Store

__all__ = ["CHECKS", "Clock", "StoreFactory", "check_store"]

StoreFactory = Callable[[], Store]

TRICKY_KEYS = [
    "plain",
    "a/b/c",
    "a.b",
    "a=2Fb",
    "a%2Fb",
    "a_b",
    "a%b",
    "A",
    "a",
    "^a",
    ".",
    "..",
    ".hidden",
    "#hash",
    "-dash",
    "~tilde",
    "with space",
    "tab\there",
    "new\nline",
    "quote'\"",
    "back\\slash",
    "star*",
    "gt>",
    "//double//slash//",
    "/leading",
    "trailing/",
    "dots/./..",
    "ünïcödé/日本語/🙂",
    "agent/task-mgr/history/000001",
]


class Clock:
    """A clock the test moves by hand; starts at the real time (servers see sane TTLs)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _open(make_store: StoreFactory) -> tuple[Store, Clock]:
    store = make_store()
    clock = Clock()
    store.clock = clock
    return store, clock


async def _value(store: Store, key: str) -> bytes:
    return (await store.read(key))[0].value


async def check_lifecycle(make_store: StoreFactory) -> None:
    """Use before ``async with`` and after ``aclose`` fails clearly; ``aclose`` is idempotent."""
    store, _ = _open(make_store)
    try:
        await store.read("k")
        raise AssertionError("read before async with should raise StoreError")
    except StoreError as exc:
        assert not isinstance(exc, RecordNotFound), exc
    async with store as entered:
        assert entered is store
        await store.write(Record("k", b"v"))
    await store.aclose()
    await store.aclose()
    for action in (lambda: store.list(), lambda: store.write(Record("k", b"w")), lambda: store.delete("k")):
        try:
            await action()
            raise AssertionError("use after aclose should raise StoreError")
        except StoreError:
            pass
    async with store:  # open again: the data is still there
        assert await _value(store, "k") == b"v"


async def check_round_trip(make_store: StoreFactory) -> None:
    """Values (empty, every byte, large) and metadata come back exactly."""
    store, _ = _open(make_store)
    cases = {
        "empty": (b"", {}),
        "bytes": (bytes(range(256)) * 4, {"content-type": "application/octet-stream"}),
        "meta": (b"v", {"a": "1", "ünï": "cödé 🙂", "empty": ""}),
        "large": (bytes(range(256)) * 2048, {}),  # 512 KiB
    }
    async with store:
        for key, (value, metadata) in cases.items():
            await store.write(Record(key, value, metadata))
        for key, (value, metadata) in cases.items():
            [record] = await store.read(key)
            assert isinstance(record, Record)
            assert (record.key, record.value, record.metadata, record.expiry) == (key, value, metadata, None)


async def check_missing_and_overwrite(make_store: StoreFactory) -> None:
    """A missing key raises RecordNotFound (a StoreError and KeyError naming it); writes replace."""
    store, _ = _open(make_store)
    async with store:
        try:
            await store.read("nope/missing")
            raise AssertionError("read of a missing key should raise RecordNotFound")
        except RecordNotFound as exc:
            assert isinstance(exc, StoreError) and isinstance(exc, KeyError)
            assert "nope/missing" in str(exc)
        await store.write(Record("k", b"one", {"v": "1"}))
        await store.write(Record("k", b"two"))
        [record] = await store.read("k")
        assert (record.value, record.metadata) == (b"two", {})
        assert await store.list() == ["k"]


async def check_delete(make_store: StoreFactory) -> None:
    """Delete removes one key; deleting a missing key is not an error."""
    store, _ = _open(make_store)
    async with store:
        await store.write(Record("a/1", b"1"))
        await store.write(Record("a/2", b"2"))
        await store.delete("a/1")
        await store.delete("a/1")
        await store.delete("never/written")
        assert await store.list() == ["a/2"]
        try:
            await store.read("a/1")
            raise AssertionError("a deleted key should be gone")
        except RecordNotFound:
            pass
        await store.write(Record("a/1", b"again"))
        assert await _value(store, "a/1") == b"again"


async def check_tricky_keys(make_store: StoreFactory) -> None:
    """Keys with ``/``, dots, escapes, case, whitespace and Unicode round-trip through list()."""
    store, _ = _open(make_store)
    async with store:
        for key in TRICKY_KEYS:
            await store.write(Record(key, key.encode()))
        assert await store.list() == sorted(TRICKY_KEYS)
        for key in TRICKY_KEYS:
            assert await _value(store, key) == key.encode(), key
        records = await store.read("", prefix=True)
        assert [(r.key, r.value) for r in records] == [(k, k.encode()) for k in sorted(TRICKY_KEYS)]


async def check_prefix(make_store: StoreFactory) -> None:
    """A prefix matches exactly the keys that start with it: no wildcard, no separator magic."""
    store, _ = _open(make_store)
    keys = ["a", "a/b", "a/b/c", "a.b", "a_b", "ab", "a%b", "a%", "a\\b", "b", "é", "e", "a/", "a//"]
    async with store:
        for key in keys:
            await store.write(Record(key, b"x"))
        for prefix in ["", "a", "a/", "a/b", "a.", "a_", "a%", "a\\", "é", "a//", "zz", "a/b/c/d"]:
            expected = sorted(k for k in keys if k.startswith(prefix))
            assert await store.list(prefix) == expected, prefix
            assert [r.key for r in await store.read(prefix, prefix=True)] == expected, prefix


async def check_window(make_store: StoreFactory) -> None:
    """Sorted by key, ``reverse`` descends; ``offset``/``limit`` apply after sorting."""
    store, _ = _open(make_store)
    keys = [f"p/{i:02d}" for i in range(20)]
    async with store:
        for key in [*reversed(keys), "p", "o/1", "q/1", "p0"]:
            await store.write(Record(key, key.encode()))
        for limit in (None, 1, 3, 20, 25):
            for offset in (0, 1, 5, 19, 20, 30):
                for reverse in (False, True):
                    ordered = keys[::-1] if reverse else keys
                    end = None if limit is None else offset + limit
                    expected = ordered[offset:end]
                    got = await store.list("p/", limit=limit, offset=offset, reverse=reverse)
                    assert got == expected, (limit, offset, reverse, got)
                    records = await store.read("p/", prefix=True, limit=limit, offset=offset, reverse=reverse)
                    assert [(r.key, r.value) for r in records] == [(k, k.encode()) for k in expected]
        assert await store.list("p/", limit=0) == []
        assert await store.read("p/", prefix=True, limit=0) == []


async def check_history(make_store: StoreFactory) -> None:
    """The agent-memory pattern: append one record per turn, read the last N newest first."""
    store, _ = _open(make_store)
    async with store:
        for i in range(1, 41):
            await store.write(Record(f"agent/bot/history/{i:06d}", f"turn {i}".encode(), {"role": "user"}))
        await store.write(Record("agent/bot/historyx", b"not history"))
        await store.write(Record("agent/bot2/history/000001", b"other agent"))
        last = await store.read("agent/bot/history/", prefix=True, limit=5, reverse=True)
        assert [r.value for r in last] == [f"turn {i}".encode() for i in range(40, 35, -1)]
        assert all(r.metadata == {"role": "user"} for r in last)
        page = await store.read("agent/bot/history/", prefix=True, limit=5, offset=5, reverse=True)
        assert [r.key for r in page] == [f"agent/bot/history/{i:06d}" for i in range(35, 30, -1)]


async def check_ttl(make_store: StoreFactory) -> None:
    """``ttl`` sets ``expiry``; an expired record is gone from read, prefix read and list."""
    store, clock = _open(make_store)
    async with store:
        record = Record("t/short", b"s")
        await store.write(record, ttl=10)
        assert record.expiry is None  # the caller's record is not changed
        await store.write(Record("t/long", b"l"), ttl=1000)
        await store.write(Record("t/never", b"n"))
        await store.write(Record("t/absolute", b"a", expiry=clock.now + 20))  # kept without ttl
        [short] = await store.read("t/short")
        assert short.expiry is not None and math.isclose(short.expiry, clock.now + 10)
        assert (await store.read("t/never"))[0].expiry is None
        assert await store.list("t/") == ["t/absolute", "t/long", "t/never", "t/short"]
        clock.advance(10.5)
        try:
            await store.read("t/short")
            raise AssertionError("an expired record should raise RecordNotFound")
        except RecordNotFound:
            pass
        assert await store.list("t/") == ["t/absolute", "t/long", "t/never"]
        assert [r.key for r in await store.read("t/", prefix=True)] == ["t/absolute", "t/long", "t/never"]
        assert await store.list("t/", limit=1, offset=0) == ["t/absolute"]
        clock.advance(10)
        assert await store.list("t/") == ["t/long", "t/never"]
        assert await store.list("t/", reverse=True, limit=1) == ["t/never"]
        await store.write(Record("t/short", b"back"))  # rewritten without ttl: never expires
        assert (await store.read("t/short"))[0].expiry is None
        await store.write(Record("t/long", b"l2"))  # a rewrite clears the old expiry
        clock.advance(2000)
        assert await store.list("t/") == ["t/long", "t/never", "t/short"]
        for bad in (0, -1, math.nan, math.inf):
            try:
                await store.write(Record("t/bad", b""), ttl=bad)
                raise AssertionError(f"ttl={bad} should raise UsageError")
            except UsageError:
                pass
        for odd in (math.nan, math.inf, -math.inf, True):  # every backend refuses them alike
            try:
                await store.write(Record("t/bad", b"", expiry=odd))
                raise AssertionError(f"expiry={odd} should raise UsageError")
            except UsageError:
                pass


async def check_scope(make_store: StoreFactory) -> None:
    """``scope()`` views are isolated namespaces sharing the store's connection."""
    store, _ = _open(make_store)
    async with store:
        other_db = store.scope(store.database + "-other")
        other_table = store.scope(store.database, "other")
        same = store.scope(store.database, store.table)
        assert (other_db.database, other_db.table) == (store.database + "-other", "default")
        assert (other_table.database, other_table.table) == (store.database, "other")
        await store.write(Record("k", b"root"))
        await other_db.write(Record("k", b"db"))
        await other_table.write(Record("k", b"table"))
        await other_table.write(Record("only-here", b"t"))
        assert await _value(store, "k") == b"root"
        assert await _value(same, "k") == b"root"
        assert await _value(other_db, "k") == b"db"
        assert await _value(other_table, "k") == b"table"
        assert await store.list() == ["k"]
        assert await other_table.list() == ["k", "only-here"]
        await other_db.delete("k")
        assert await _value(store, "k") == b"root"
        nested = other_table.scope(store.database + "-other", "other")
        await nested.write(Record("n", b"nested"))
        assert await other_db.list() == []
        async with nested:  # entering a view is allowed and does not close the store on exit
            assert await nested.list() == ["n"]
        assert await _value(store, "k") == b"root"
    try:
        await other_table.list()
        raise AssertionError("a view of a closed store should raise StoreError")
    except StoreError:
        pass


async def check_copies(make_store: StoreFactory) -> None:
    """The store keeps its own copy: changing a written or returned record changes nothing."""
    store, _ = _open(make_store)
    async with store:
        record = Record("c", b"v", {"a": "1"})
        await store.write(record)
        record.metadata["a"] = "changed"
        [read] = await store.read("c")
        assert read.metadata == {"a": "1"}
        read.metadata["b"] = "2"
        [again] = await store.read("c", prefix=True)
        assert again.metadata == {"a": "1"}


async def check_validation(make_store: StoreFactory) -> None:
    """Bad keys, values and windows raise UsageError; the longest allowed key works."""
    store, _ = _open(make_store)
    async with store:
        bad_writes: list[Record] = [
            Record("", b""),
            Record("nul\x00key", b""),
            Record("x" * (MAX_KEY_BYTES + 1), b""),
            Record("k", "text"),  # type: ignore[arg-type]
            Record("k", b"", {"n": 1}),  # type: ignore[dict-item]
            Record(1, b""),  # type: ignore[arg-type]
        ]
        for bad in bad_writes:
            try:
                await store.write(bad)
                raise AssertionError(f"write({bad!r:.60}) should raise UsageError")
            except UsageError:
                pass
        for call in (
            lambda: store.read(""),
            lambda: store.delete(""),
            lambda: store.list(limit=-1),
            lambda: store.list(offset=-1),
            lambda: store.read("p", prefix=True, offset=-1),
        ):
            try:
                await call()
                raise AssertionError("should raise UsageError")
            except UsageError:
                pass
        longest = ["k" * MAX_KEY_BYTES, "é" * (MAX_KEY_BYTES // 2), "/" * MAX_KEY_BYTES]
        for key in longest:
            await store.write(Record(key, key.encode()[:10]))
            assert await _value(store, key) == key.encode()[:10]
        assert await store.list() == sorted(longest)


async def check_concurrency(make_store: StoreFactory) -> None:
    """Concurrent writes all land; concurrent writes of one key leave one whole value."""
    store, _ = _open(make_store)
    async with store:
        await asyncio.gather(*(store.write(Record(f"c/{i:03d}", bytes([i]) * 100)) for i in range(50)))
        assert await store.list("c/") == [f"c/{i:03d}" for i in range(50)]
        values = {bytes([i]) * 1000 for i in range(20)}
        await asyncio.gather(*(store.write(Record("same", v)) for v in values))
        assert await _value(store, "same") in values
        got = await asyncio.gather(*(store.read(f"c/{i:03d}") for i in range(50)))
        assert [r[0].value for r in got] == [bytes([i]) * 100 for i in range(50)]


async def _conflicts(write: Awaitable[int], key: str, expected: int, current: int | None) -> VersionConflict:
    try:
        await write
    except VersionConflict as exc:
        assert isinstance(exc, Conflict) and isinstance(exc, StoreError), exc
        assert (exc.key, exc.expected) == (key, expected), exc
        assert exc.current in (current, None), (exc.current, current)  # None: the backend does not know
        assert repr(key) in str(exc), exc
        return exc
    raise AssertionError(f"write of {key!r} with if_version={expected} should raise VersionConflict")


async def check_versions(make_store: StoreFactory) -> None:
    """Every write returns the record's new version, reads return it, ``if_version`` checks it."""
    store, clock = _open(make_store)
    async with store:
        first = await store.write(Record("v/k", b"1"))
        assert isinstance(first, int) and not isinstance(first, bool) and first > 0, first
        [read] = await store.read("v/k")
        assert read.version == first
        second = await store.write(Record("v/k", b"2", version=12345))  # a record's own version is ignored
        assert second != first and (await store.read("v/k"))[0].version == second
        assert [r.version for r in await store.read("v/", prefix=True)] == [second]
        # if_version=n: only over version n; a stale version changes nothing
        await _conflicts(store.write(Record("v/k", b"stale"), if_version=first), "v/k", first, second)
        assert await _value(store, "v/k") == b"2"
        third = await store.write(Record("v/k", b"3", {"m": "x"}), if_version=second)
        [read] = await store.read("v/k")
        assert (read.value, read.metadata, read.version) == (b"3", {"m": "x"}, third) and third not in (first, second)
        await _conflicts(store.write(Record("v/none", b""), if_version=third), "v/none", third, 0)
        # if_version=0: create only
        created = await store.write(Record("v/new", b"a"), if_version=0)
        assert (await store.read("v/new"))[0].version == created
        await _conflicts(store.write(Record("v/new", b"b"), if_version=0), "v/new", 0, created)
        assert await _value(store, "v/new") == b"a"
        # deleted, then written again: absent for if_version=0, and never an old version back
        await store.delete("v/new")
        await _conflicts(store.write(Record("v/new", b"c"), if_version=created), "v/new", created, 0)
        again = await store.write(Record("v/new", b"c"), if_version=0)
        assert again != created and await _value(store, "v/new") == b"c"
        # an expired record counts as absent: if_version=0 creates, its old version no longer matches
        short = await store.write(Record("v/ttl", b"old"), ttl=5)
        await _conflicts(store.write(Record("v/ttl", b"x"), if_version=0, ttl=5), "v/ttl", 0, short)
        clock.advance(6)
        await _conflicts(store.write(Record("v/ttl", b"x"), if_version=short), "v/ttl", short, 0)
        fresh = await store.write(Record("v/ttl", b"new"), if_version=0, ttl=50)
        [read] = await store.read("v/ttl")
        assert (read.value, read.version) == (b"new", fresh) and read.expiry is not None
        assert await store.write(Record("v/ttl", b"newer"), if_version=fresh) != fresh
        for bad in (-1, True, 1.0, "1"):
            try:
                await store.write(Record("v/k", b"bad"), if_version=bad)  # type: ignore[arg-type]
                raise AssertionError(f"if_version={bad!r} should raise UsageError")
            except UsageError:
                pass
        assert await _value(store, "v/k") == b"3"


async def check_compare_and_set(make_store: StoreFactory) -> None:
    """Concurrent read-modify-write with ``if_version`` loses no update; one create wins."""
    store, _ = _open(make_store)
    async with store:
        await store.write(Record("cas/counter", b"0"))

        async def increment() -> None:
            while True:
                [rec] = await store.read("cas/counter")
                try:
                    await store.write(Record("cas/counter", b"%d" % (int(rec.value) + 1)), if_version=rec.version)
                    return
                except VersionConflict:
                    continue  # another increment won: read again

        await asyncio.gather(*(increment() for _ in range(50)))
        assert await _value(store, "cas/counter") == b"50"

        async def create(i: int) -> int | None:
            try:
                return await store.write(Record("cas/once", b"%d" % i), if_version=0)
            except VersionConflict:
                return None

        won = [(i, v) for i, v in enumerate(await asyncio.gather(*(create(i) for i in range(20)))) if v is not None]
        assert len(won) == 1, won
        [read] = await store.read("cas/once")
        assert (read.value, read.version) == (b"%d" % won[0][0], won[0][1])


CHECKS: dict[str, Callable[[StoreFactory], Awaitable[None]]] = {
    "lifecycle": check_lifecycle,
    "round_trip": check_round_trip,
    "missing_and_overwrite": check_missing_and_overwrite,
    "delete": check_delete,
    "tricky_keys": check_tricky_keys,
    "prefix": check_prefix,
    "window": check_window,
    "history": check_history,
    "ttl": check_ttl,
    "scope": check_scope,
    "copies": check_copies,
    "validation": check_validation,
    "concurrency": check_concurrency,
    "versions": check_versions,
    "compare_and_set": check_compare_and_set,
}
"""Every check by name; each takes the store factory."""


async def check_store(make_store: StoreFactory) -> None:
    """Run every check in :data:`CHECKS` against the stores ``make_store`` returns.

    Example:
        await check_store(lambda: MemoryStore())
    """
    for name, check in CHECKS.items():
        try:
            await check(make_store)
        except AssertionError as exc:
            raise AssertionError(f"store check {name!r} failed: {exc}") from exc
