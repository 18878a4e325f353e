"""Fuzzing the file store's records on disk: damage written straight into its files, then read back.

The file store (micro/store/file.py) keeps one file per record: a header (magic, CRC-32,
expiry) and a msgpack body. Two records are written through the store; then each case damages
one file in the table's directory: random bytes, a truncated or bit-flipped record, a correct
checksum over a garbage or mistyped body, another key's record, an expired one, an empty file,
a directory, a FIFO, a symlink to /dev/zero or to nowhere, a stale temporary file, a file whose
name no key encodes to. Then it reads every key, reads and lists by prefix (with limits,
offsets, both orders), and puts the files back.

The property: every operation ends (a FIFO must not block, /dev/zero must not be read
forever), returning records that are what was asked for or raising ``StoreError``; the record
no case touches always reads back intact; and afterwards a write and read still work.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import strategies as st
from test_fuzz_kit import CASES, ErrorLog, Host, error_log, fuzz, json_from, mutate

from micro.errors import StoreError
from micro.store import Record
from micro.store.file import FileStore
from micro.store.file import _filename as filename

pytestmark = pytest.mark.fuzz

ONE, TWO, NEW = "a/1", "a/2", "a/3"
LONG = "a/" + "k" * 300  # too long for a filename: stored under "#<sha256>", its key inside
RECORDS = {ONE: Record(ONE, b"one", {"m": "1"}), TWO: Record(TWO, b"two"), LONG: Record(LONG, b"long")}
MAGIC = b"MSR1"


def record_bytes(key: str, value: bytes, metadata: dict[str, str], expiry: float | None) -> bytes:
    """A record file as the store writes it."""
    body = msgspec.msgpack.encode([key, value, metadata])
    return with_header(body, math.nan if expiry is None else expiry)


def with_header(body: bytes, expiry: float, magic: bytes = MAGIC) -> bytes:
    packed = struct.pack("<d", expiry)
    return magic + struct.pack("<I", zlib.crc32(body, zlib.crc32(packed))) + packed + body


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Damage:
    target: str  # ONE, NEW or LONG (a record's file), "name": a file under `name`, or "temp"
    kind: str
    data: bytes = b""
    name: str = ""


@dataclass(frozen=True)
class Ops:
    prefix: str
    limit: int | None
    offset: int
    reverse: bool
    keys_only: bool  # list() the keys rather than read(prefix=True) the records


@dataclass(frozen=True)
class Case:
    damage: Damage
    ops: Ops


def msgpack(value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:  # msgpack has no integers beyond 64 bits
        return msgspec.msgpack.encode(repr(value))


# Cases are read off two integers and a seed (three draws: 10,000 of them stay fast); shrinking
# goes towards the first damage of each kind on ONE's file, with empty data.
KEYS = [ONE, TWO, NEW, LONG, "", "zz", "a/\x00", 7, None]
EXPIRIES = [None, math.nan, math.inf, -math.inf, 0.0, 1.0, 4e9, -1.0]
MAGICS = [b"MSR0", b"\x00\x00\x00\x00", b"msr1", b"MSR"]
NAMES = ["%ZZ", "^A", "A", ".hidden", "%C3", "a%2F9", "#", "#00", "a%2f1", "a%2F1", "-", "%"]
WHERE = [ONE, NEW, LONG, "name", "temp"]
SPECIAL = ["dir", "fifo", "devzero", "dangling", "to_dir"]
PREFIXES = ["", "a", "a/", "a/1", "a/k", "#", "%", "b"]
NAME_CHARS = "abcdefghijklmnopqrstuvwxyz%^#._-0123456789AZ"


def file_bytes(how: int, seed: bytes) -> bytes:
    """Damaged file content, one of eight ways, read off ``seed``."""
    n = seed[0] if seed else 0
    rest = seed[1:]
    record = record_bytes(ONE, b"one", {"m": "1"}, None)
    expiry = EXPIRIES[n % len(EXPIRIES)]
    if how == 0:
        return seed  # garbage
    if how == 1:
        return record[: n % (len(record) + 1)]  # truncated
    if how == 2:
        return mutate(record, "flip", int.from_bytes(rest[:2], "little"), n)  # a flipped bit
    if how == 3:
        return with_header(rest, math.nan if expiry is None else expiry)  # a correct checksum over garbage
    if how == 4:  # a correct checksum over msgpack of the wrong shape, or of the right shape with wrong types
        shaped = [KEYS[n % len(KEYS)], rest[:4], {"m": n} if n % 3 else {}]
        body = msgpack(json_from(rest) if n % 2 else shaped)
        return with_header(body, math.nan)
    if how == 5:
        return with_header(rest, math.nan, MAGICS[n % len(MAGICS)])  # a header that is not one
    if how == 6:
        return b""
    key = KEYS[n % 6]  # a whole record: maybe another key's, maybe expired
    return record_bytes(key if isinstance(key, str) else "zz", rest[:8], {}, expiry)


def file_name(how: int, seed: bytes) -> str:
    """A file name in the table's directory: one that no key encodes to, or any bytes."""
    if how == 0:
        name = NAMES[(seed[0] if seed else 0) % len(NAMES)]
    elif how == 1:
        name = "".join(NAME_CHARS[b % len(NAME_CHARS)] for b in seed[-12:])
    else:
        name = os.fsdecode(seed[-12:].replace(b"/", b"_").replace(b"\x00", b"_"))
    if name in ("", ".", "..", filename(TWO)) or name.startswith(".tmp-"):
        name = f"x{name}x"
    return name


def make_case(selector: int, seed: bytes, ops: int) -> Case:
    where, what, naming = WHERE[selector % 5], (selector // 5) % 13, selector // 65
    if where == "temp":
        damage = Damage("temp", "stale_temp", file_bytes(what % 8, seed))
    else:
        kind = "bytes" if what < 8 else SPECIAL[what - 8]
        data = file_bytes(what, seed) if what < 8 else b""
        damage = Damage(where, kind, data, file_name(naming, seed) if where == "name" else "")
    limit = ops // 32 % 6
    return Case(damage, Ops(PREFIXES[ops % 8], None if limit == 5 else limit, ops // 8 % 4, ops // 192 % 2 == 1,
                            ops >= 384))


cases = st.builds(make_case, st.integers(0, 5 * 13 * 3 - 1), st.binary(max_size=48), st.integers(0, 767))


# -- driving it --------------------------------------------------------------------------------


@dataclass
class Outcome:
    results: dict[str, Any]  # op -> its value, or the exception it raised
    errors: list[str]


class Target:
    def __init__(self, store: FileStore, log: ErrorLog) -> None:
        self.store, self.log = store, log
        self.dir: Path = store._dir()
        self.originals = {key: (self.dir / filename(key)).read_bytes() for key in (ONE, LONG)}

    def damage(self, d: Damage) -> Path:
        if d.kind == "stale_temp":  # a temporary file a killed writer left, 20 minutes ago
            path = self.dir / f".tmp-{d.data.hex()[:16]}"
            path.write_bytes(d.data)
            os.utime(path, (1.0, 1.0))
            return path
        path = self.dir / (d.name if d.target == "name" else filename(d.target))
        self.remove(path)
        if d.kind == "bytes":
            path.write_bytes(d.data)
        elif d.kind == "dir":
            path.mkdir()
        elif d.kind == "fifo":
            os.mkfifo(path)
        elif d.kind == "devzero":
            path.symlink_to("/dev/zero")
        elif d.kind == "dangling":
            path.symlink_to(self.dir / "nowhere")
        else:  # "to_dir"
            path.symlink_to(self.dir.parent)
        return path

    @staticmethod
    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def repair(self, path: Path) -> None:
        self.remove(path)
        for key, data in self.originals.items():
            if path.name == filename(key):
                path.write_bytes(data)

    async def send(self, case: Case) -> Outcome:
        seen = len(self.log.records)
        path = self.damage(case.damage)
        o = case.ops
        damaged = case.damage.target if case.damage.target in RECORDS or case.damage.target == NEW else ONE
        calls = {
            "read damaged": lambda: self.store.read(damaged),
            "read TWO": lambda: self.store.read(TWO),
        }
        if o.keys_only:
            calls["list prefix"] = lambda: self.store.list(o.prefix, limit=o.limit, offset=o.offset, reverse=o.reverse)
        else:
            calls["read prefix"] = lambda: self.store.read(o.prefix, prefix=True, limit=o.limit, offset=o.offset,
                                                           reverse=o.reverse)
        results: dict[str, Any] = {}
        try:
            for op, call in calls.items():
                try:
                    results[op] = await call()
                except StoreError as exc:
                    results[op] = exc
        finally:
            self.repair(path)
        return Outcome(results, self.log.records[seen:])

    async def still_works(self) -> list[Record]:
        await self.store.write(Record("a/still", b"ok"))
        return await self.store.read("a/still")


@asynccontextmanager
async def serving(root: Path, log: ErrorLog) -> AsyncIterator[Target]:
    async with FileStore(f"file://{root}") as store:
        for record in RECORDS.values():
            await store.write(record)
        yield Target(store, log)


def check(case: Case, got: Outcome) -> None:
    assert not got.errors, f"the store logged errors: {got.errors}"
    r = got.results
    if not isinstance(r["read damaged"], StoreError):
        (record,) = r["read damaged"]
        assert record.key in (case.damage.target, ONE), record  # the key asked for, never another
    assert [(x.key, x.value, x.metadata, x.expiry) for x in r["read TWO"]] == [(TWO, b"two", {}, None)], r["read TWO"]
    o = case.ops
    for op in ("read prefix", "list prefix"):
        if op not in r:
            continue
        if isinstance(r[op], StoreError):
            assert str(r[op]).startswith("file store: "), r[op]
            continue
        keys = [x.key for x in r[op]] if op == "read prefix" else r[op]
        assert all(k.startswith(o.prefix) for k in keys), (op, keys)
        assert keys == sorted(keys, reverse=o.reverse), (op, keys)
        assert o.limit is None or len(keys) <= o.limit, (op, keys)
    for op, value in r.items():
        if isinstance(value, StoreError):
            assert "\n" not in str(value) and str(value), (op, value)


def test_fuzz_file_store_records_on_disk(tmp_path: Path) -> None:
    """Damaged record files: every read and list ends with records or StoreError, never a hang."""
    with error_log() as log, Host(serving(tmp_path / "store", log)) as host:
        ran = fuzz(cases, lambda case: check(case, host.run(host.system.send(case))))
        [still] = host.run(host.system.still_works())
        assert (still.key, still.value, still.version > 0) == ("a/still", b"ok", True)
    assert not log.records
    assert ran >= CASES
