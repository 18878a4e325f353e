"""The file store, micro's default: one file per record, crash-safe, no server.

Layout: ``<root>/<database>/<table>/<key>``, each name encoded into a portable
filename (see ``encode_name``), so keys may hold ``/``, spaces or any Unicode and
``list()`` gets them back from the directory listing. The root is
``$MICRO_HOME/store`` (``~/.micro/store``) unless the URL names one
(``file:///var/lib/app/store``).

A write goes to a fresh temporary file in the same directory, is fsynced, renamed
over the record (``os.replace`` is atomic) and the directory is fsynced: a reader
sees the old record or the new one, never a torn one, even when the writer is
killed mid-write, and a write that returned survives a power cut. Each file starts
with a header (magic, CRC-32, expiry, version) so damage is reported, not returned
(files written before versions existed have no version field and read as version 1).

Writes and deletes of a key hold an exclusive lock on that key while they check the
version, write and rename: an open-file-description lock (``fcntl``) on one byte of
``<table>/.lock`` chosen by the key's hash, so writers in other processes on this
machine and in other threads of this one wait for each other, and writers of other
keys do not (platforms without OFD locks lock the whole file). A conditional write
is therefore atomic across processes. A new version is the larger of the old one + 1
and the time in microseconds, so a key deleted and written again gets a new number.

Each operation runs as one call in a worker thread (``asyncio.to_thread``): that is
a third of the executor round trips that aiofiles' per-call wrappers would cost,
and a cancelled caller cannot leave a half-done write sequence behind.

Expired records are hidden at once; their files stay until the key is written or
deleted again (removing them on read could race a concurrent writer and lose its
record). Temporary files left by a killed writer are hidden, and removed by
``list()`` / prefix reads once they are older than ``STALE_TEMP`` (15 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import math
import os
import re
import stat
import struct
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from micro.errors import ConfigError, StoreError, VersionConflict
from micro.resource import redact
from micro.store._base import Record, Store, window

__all__ = ["FileStore", "decode_name", "encode_name"]

_MAGIC = b"MSR2"
_HEAD = struct.Struct("<4sIdQ")  # magic, CRC-32 of everything after it, expiry (NaN: never), version
_MAGIC_V1 = b"MSR1"
_HEAD_V1 = struct.Struct("<4sId")  # before versions: read as version 1
_LOCK = ".lock"  # starts with a dot, so no key's file can have this name
_TEMP = ".tmp-"  # temporary files start with a dot, which no encoded name does
_HASHED = "#"  # a name too long for the filesystem is stored under "#<sha256>"
_MAX_NAME = 200
STALE_TEMP = 900.0
"""Seconds after which a scan removes a temporary file left by a writer that was killed."""


class _Body(msgspec.Struct, array_like=True):
    key: str
    value: bytes
    metadata: dict[str, str]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Body)
_UNSAFE = re.compile(r"[^a-z0-9._-]|^\.")
_NAME = re.compile(r"(?:[a-z0-9._-]|\^[a-z]|%[0-9A-F]{2})+")
_CARET = re.compile(r"\^([a-z])")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if "A" <= ch <= "Z":
        return "^" + ch.lower()
    return "".join(f"%{b:02X}" for b in ch.encode())


@functools.lru_cache(maxsize=65536)
def encode_name(text: str) -> str:
    """``text`` as a filename: ``[a-z0-9._-]`` kept (but a leading dot), ``A`` -> ``^a``,
    anything else -> ``%XX`` per UTF-8 byte. Distinct texts stay distinct even on
    case-insensitive filesystems; ``decode_name`` reverses it."""
    return _UNSAFE.sub(_escape, text)


@functools.lru_cache(maxsize=65536)  # listing a table decodes every name in it
def decode_name(name: str) -> str | None:
    """The text ``encode_name`` made ``name`` from; None for a name it cannot have made."""
    if not _NAME.fullmatch(name) or name.startswith("."):
        return None
    try:
        return urllib.parse.unquote(_CARET.sub(lambda m: m.group(1).upper(), name), errors="strict")
    except UnicodeDecodeError:
        return None


def _filename(text: str) -> str:
    name = encode_name(text)
    if len(name) > _MAX_NAME:
        return _HASHED + hashlib.sha256(text.encode()).hexdigest()
    return name


def default_root() -> Path:
    """``$MICRO_HOME/store``, ``~/.micro/store`` when ``MICRO_HOME`` is unset."""
    return Path(os.environ.get("MICRO_HOME") or "~/.micro").expanduser() / "store"


def _root_from_url(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"file store URL {redact(url)!r}: use file:///absolute/path (three slashes), "
            "or file:// for $MICRO_HOME/store"
        )
    if not parts.path:
        return default_root()
    return Path(urllib.parse.unquote(parts.path))


class FileStore(Store):
    """One file per record under ``root`` (from ``file:///path``; ``file://`` = default).

    Example:
        async with FileStore("file:///tmp/demo-store") as store:
            await store.write(Record("notes/1", b"hello"))
    """

    def __init__(
        self,
        url: str = "file://",
        *,
        database: str = "micro",
        table: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(url, database=database, table=table, clock=clock)
        self.root = _root_from_url(url)

    def _dir(self) -> Path:
        return self.root / _filename(self.database) / _filename(self.table)

    async def _get(self, key: str, now: float) -> Record | None:
        return await asyncio.to_thread(_get, self._dir(), key, now)

    async def _put(self, record: Record, if_version: int | None) -> int:
        try:
            return await asyncio.to_thread(_put, self._dir(), record, if_version, self.clock())
        except VersionConflict as exc:  # raised in the thread without the store's name
            raise self._conflict(record.key, if_version or 0, exc.current) from None

    async def _delete(self, key: str) -> None:
        await asyncio.to_thread(_delete, self._dir(), key)

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        found = await asyncio.to_thread(_scan, self._dir(), prefix, now, limit, offset, reverse, False)
        return [r.key for r in found]

    async def _read_prefix(
        self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool
    ) -> list[Record]:
        return await asyncio.to_thread(_scan, self._dir(), prefix, now, limit, offset, reverse, True)


# The functions below run in a worker thread.


def _failed(action: str, path: Path, exc: OSError) -> StoreError:
    return StoreError(f"file store: cannot {action} {str(path)!r}: {exc.strerror or exc}")


def _header(path: Path, data: bytes) -> tuple[float | None, int, int]:
    """``(expiry, version, header size)`` from the start of a record file."""
    if data[:4] == _MAGIC and len(data) >= _HEAD.size:
        _, _, expiry, version = _HEAD.unpack_from(data)
        size = _HEAD.size
    elif data[:4] == _MAGIC_V1 and len(data) >= _HEAD_V1.size:
        _, _, expiry = _HEAD_V1.unpack_from(data)
        version, size = 1, _HEAD_V1.size
    else:
        raise StoreError(f"file store: record file {str(path)!r} is damaged (bad header or truncated)")
    return (None if math.isnan(expiry) else expiry), version, size


def _decode(path: Path, data: bytes) -> Record:
    expiry, version, size = _header(path, data)
    if zlib.crc32(memoryview(data)[8:]) != struct.unpack_from("<I", data, 4)[0]:  # after magic, both formats
        raise StoreError(f"file store: record file {str(path)!r} is damaged (bad header or checksum)")
    try:
        body = _DECODER.decode(memoryview(data)[size:])
    except msgspec.DecodeError as exc:
        raise StoreError(f"file store: record file {str(path)!r} is damaged: {exc}") from None
    return Record(body.key, body.value, body.metadata, expiry, version)


def _read(path: Path, size: int = -1) -> bytes | None:
    """A record file's bytes (the first ``size`` of them), or None if it is gone."""
    try:
        # O_NONBLOCK: a FIFO in a record's place must not block the open forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _failed("read", path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device (/dev/zero never ends), a directory
            raise StoreError(f"file store: {str(path)!r} is damaged: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read(size)
    except OSError as exc:
        raise _failed("read", path, exc) from None
    finally:
        os.close(fd)


def _expiry(path: Path) -> float | None:
    """The expiry in a record file's header (None: never), or NaN if the file is gone."""
    head = _read(path, _HEAD.size)
    if head is None:
        return math.nan
    return _header(path, head)[0]


def _live(record: Record, now: float) -> bool:
    return record.expiry is None or record.expiry > now


def _get(directory: Path, key: str, now: float) -> Record | None:
    path = directory / _filename(key)
    data = _read(path)
    if data is None:
        return None
    record = _decode(path, data)
    return record if record.key == key and _live(record, now) else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    for path in missing:  # make the new entries durable too
        _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(directory: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock of record file ``name`` (see the module docstring)."""
    lock = directory / _LOCK
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            _make_dirs(directory)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _failed("lock", lock, exc) from None
    try:
        if _OFD_LOCK is not None:  # one byte per key: fcntl.lockf's process-wide locks would not stop threads
            byte = zlib.crc32(name.encode())
            fcntl.fcntl(fd, _OFD_LOCK, struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        else:  # pragma: no cover - platforms without OFD locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield  # closing the descriptor releases the lock
    finally:
        os.close(fd)


_OFD_LOCK: int | None = getattr(fcntl, "F_OFD_SETLKW", None)


def _stored(path: Path, now: float) -> tuple[int, int]:
    """``(live version or 0, last version written or 0)`` of the record file at ``path``."""
    head = _read(path, _HEAD.size)
    if head is None:
        return 0, 0
    expiry, version, _ = _header(path, head)
    return (version if expiry is None or expiry > now else 0), version


def _put(directory: Path, record: Record, if_version: int | None, now: float) -> int:
    body = _ENCODER.encode(_Body(record.key, record.value, record.metadata))
    name = _filename(record.key)
    path = directory / name
    temp = directory / f"{_TEMP}{uuid.uuid4().hex}"
    with _locked(directory, name):
        try:
            live, last = _stored(path, now)
        except StoreError:
            if if_version is not None:
                raise  # a damaged record has no version to compare
            live = last = 0  # an unconditional write replaces it, as before versions
        if if_version is not None and live != if_version:
            raise VersionConflict("", key=record.key, expected=if_version, current=live)
        version = max(last + 1, time.time_ns() // 1000)
        tail = struct.pack("<dQ", math.nan if record.expiry is None else record.expiry, version)
        data = b"".join((_MAGIC, struct.pack("<I", zlib.crc32(body, zlib.crc32(tail))), tail, body))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise _failed("write", path, exc) from None
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise _failed("write", path, exc) from None
    return version


def _delete(directory: Path, key: str) -> None:
    name = _filename(key)
    path = directory / name
    try:
        if not path.exists():
            return
        with _locked(directory, name):
            path.unlink()
        _fsync_dir(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _failed("delete", path, exc) from None


def _remove_stale(temp: Path) -> None:
    """Remove a temporary file a killed writer left behind (a live write takes seconds at most)."""
    try:
        if temp.stat().st_mtime < time.time() - STALE_TEMP:
            temp.unlink()
    except OSError:
        pass  # gone already, or not ours to remove: it stays hidden either way


def _scan(
    directory: Path, prefix: str, now: float, limit: int | None, offset: int, reverse: bool, values: bool
) -> list[Record]:
    """Live records under ``prefix``, sorted and windowed. Without ``values`` only the
    keys are filled in and only the file headers are read."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _failed("list", directory, exc) from None
    keyed: list[tuple[str, str]] = []
    for name in names:
        if name.startswith(_TEMP):
            _remove_stale(directory / name)
            continue
        if name.startswith(_HASHED):
            data = _read(directory / name)  # the key is too long for a filename: it is inside
            key = None if data is None else _decode(directory / name, data).key
        else:
            key = decode_name(name)
        if key is not None and key.startswith(prefix):
            keyed.append((key, name))
    keyed.sort()
    # Walk in the requested order, reading files only until the window is full.
    found: list[Record] = []
    skip = offset
    for key, name in window(keyed, None, 0, reverse):
        if limit is not None and len(found) == limit:
            break
        path = directory / name
        if values:
            data = _read(path)
            if data is None:
                continue
            record = _decode(path, data)
            if not _live(record, now) or (record.key != key and not name.startswith(_HASHED)):
                continue  # expired, or another key's record under this name: hidden, as _get hides it
        else:
            expiry = _expiry(path)
            if expiry is not None and (math.isnan(expiry) or expiry <= now):
                continue
            record = Record(key, b"")
        if skip:
            skip -= 1
        else:
            found.append(record)
    return found
