"""Machine-wide registry with no server: one small file per node under ``$MICRO_HOME/registry``.

Every process on the machine that shares ``MICRO_HOME`` sees the same services,
so ``micro call`` in one terminal finds a service started by ``micro run`` in
another. A record expires ``ttl`` seconds after its last heartbeat, and at once
when the process that wrote it is gone (same host, pid no longer alive). Files
are replaced atomically, so a reader never sees half a record. ``watch()`` polls
the directory (``poll_interval`` seconds) and reads only files that changed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import socket
import time
import urllib.parse
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from micro.errors import ServiceNotFound
from micro.registry._base import Event, Registry, ServiceRecord, Watcher, merge

_HOST = socket.gethostname()


class _Entry(msgspec.Struct):
    record: ServiceRecord
    expires: float  # wall-clock time
    pid: int
    host: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Entry).decode


def default_home() -> Path:
    """``$MICRO_HOME``, or ``~/.micro``."""
    return Path(os.environ.get("MICRO_HOME") or Path.home() / ".micro")


def _alive(entry: _Entry, now: float) -> bool:
    if entry.expires <= now:
        return False
    if entry.host != _HOST:
        return True
    try:
        os.kill(entry.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_Snapshot = dict[str, tuple[int, _Entry]]


_PART_MAX = 72  # bytes of one percent-encoded part; three parts and the rest stay under 255 (the name limit)


def _part(text: str) -> str:
    """One part of a registry file name: percent-encoded, and when that is long, cut and hashed.

    Percent-encoding makes a CJK character 9 bytes: a 16-character service name and its node id
    (which starts with the name) passed the file system's 255-byte limit, and registering failed.
    """
    quoted = urllib.parse.quote(text, safe="")
    if len(quoted) <= _PART_MAX:
        return quoted
    return f"{quoted[:_PART_MAX - 17].rstrip('%0123456789ABCDEF')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class LocalRegistry(Registry):
    """Registry shared by every process on this machine with the same ``MICRO_HOME``."""

    def __init__(self, url: str = "local://", *, path: str | Path | None = None,
                 poll_interval: float = 0.25) -> None:
        self.url = url
        parsed = urllib.parse.urlsplit(url)
        where = path or (parsed.path if parsed.path not in ("", "/") else None)
        self.path = Path(where) if where else default_home() / "registry"
        self.poll_interval = poll_interval

    async def __aenter__(self) -> LocalRegistry:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @staticmethod
    def _file(record: ServiceRecord, node_id: str) -> str:
        return f"{_part(record.name)}~{_part(record.version)}~{_part(node_id)}.json"

    def _write(self, record: ServiceRecord, ttl: float) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        expires = time.time() + ttl
        for node in record.nodes:
            one = msgspec.structs.replace(record, nodes=[node])
            target = self.path / self._file(record, node.id)
            tmp = self.path / f".{uuid.uuid4().hex}.tmp"
            try:
                tmp.write_bytes(_encode(_Entry(one, expires, os.getpid(), _HOST)))
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
                raise

    def _remove(self, record: ServiceRecord) -> None:
        for node in record.nodes:
            (self.path / self._file(record, node.id)).unlink(missing_ok=True)

    def _scan(self, prefix: str = "", previous: _Snapshot | None = None) -> _Snapshot:
        """Live entries by file name; files unchanged since ``previous`` are not read again."""
        out: _Snapshot = {}
        now = time.time()
        try:
            listing = list(os.scandir(self.path))
        except FileNotFoundError:
            return out
        for de in listing:
            if not de.name.endswith(".json") or not de.name.startswith(prefix):
                continue
            try:
                mtime = de.stat().st_mtime_ns
                seen = previous.get(de.name) if previous else None
                if seen is not None and seen[0] == mtime:
                    entry = seen[1]
                else:
                    entry = _decode(Path(de.path).read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # vanished or being replaced: the next scan sees it
            if _alive(entry, now):
                out[de.name] = (mtime, entry)
            else:
                self._reap(de.path, mtime)
        return out

    @staticmethod
    def _reap(path: str, mtime: int) -> None:
        try:
            if os.stat(path).st_mtime_ns == mtime:  # not refreshed since we read it
                os.unlink(path)
        except OSError:
            pass

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        await anyio.to_thread.run_sync(self._write, record, ttl)

    async def deregister(self, record: ServiceRecord) -> None:
        await anyio.to_thread.run_sync(self._remove, record)

    async def get(self, name: str) -> list[ServiceRecord]:
        prefix = _part(name) + "~"
        snap = await anyio.to_thread.run_sync(self._scan, prefix)
        found = merge([e.record for _, e in snap.values()])
        if not found:
            raise ServiceNotFound(
                f"service {name!r} is not registered in {self.path}: is it running "
                "(with the same MICRO_HOME)? `micro services` lists what is"
            )
        return found

    async def list(self) -> list[ServiceRecord]:
        snap = await anyio.to_thread.run_sync(self._scan)
        return merge([e.record for _, e in snap.values()])

    def watch(self) -> Watcher:
        return _PollWatcher(self, self._scan())


class _PollWatcher(Watcher):
    def __init__(self, registry: LocalRegistry, snapshot: _Snapshot) -> None:
        self._registry = registry
        self._snapshot = snapshot
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = asyncio.Event()

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._closed.is_set():
                raise StopAsyncIteration
            with anyio.move_on_after(self._registry.poll_interval):
                await self._closed.wait()
            if self._closed.is_set():
                raise StopAsyncIteration
            snap = await anyio.to_thread.run_sync(self._registry._scan, "", self._snapshot)
            self._diff(self._snapshot, snap)
            self._snapshot = snap
        return self._pending.popleft()

    def _diff(self, old: _Snapshot, new: _Snapshot) -> None:
        for name, (_, entry) in new.items():
            before = old.get(name)
            if before is None:
                self._pending.append(Event(type="create", service=entry.record))
            elif before[1].record != entry.record:
                self._pending.append(Event(type="update", service=entry.record))
        for name, (_, entry) in old.items():
            if name not in new:
                self._pending.append(Event(type="delete", service=entry.record))

    async def aclose(self) -> None:
        self._closed.set()
