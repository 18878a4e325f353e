"""Machine-wide registry with no server: one small file per node under ``$MICRO_HOME/registry``.

Every process on the machine that shares ``MICRO_HOME`` sees the same services,
so ``micro call`` in one terminal finds a service started by ``micro run`` in
another. A record expires ``ttl`` seconds after its last heartbeat, and at once
when the process that wrote it is gone (same host, pid no longer alive). Files
are replaced atomically, so a reader never sees half a record. ``watch()`` polls
the directory (``poll_interval`` seconds) and reads only files that changed.
"""

from __future__ import annotations

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

from micro.registry._base import PollWatcher, Registry, ServiceRecord, Snapshot, Watcher

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

    async def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

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

    async def _register(self, record: ServiceRecord, ttl: float) -> None:
        await anyio.to_thread.run_sync(self._write, record, ttl)

    async def _deregister(self, record: ServiceRecord) -> None:
        await anyio.to_thread.run_sync(self._remove, record)

    async def _records(self, name: str | None) -> list[ServiceRecord]:
        snap = await anyio.to_thread.run_sync(self._scan, "" if name is None else _part(name) + "~")
        return [e.record for _, e in snap.values()]

    def _missing_hint(self) -> str:
        return f" ({self.path}): is it running (with the same MICRO_HOME)? `micro services` lists what is"

    def _watch(self) -> Watcher:
        state = self._scan()

        async def poll() -> Snapshot:
            nonlocal state  # files unchanged since the last poll are not read again
            state = await anyio.to_thread.run_sync(self._scan, "", state)
            return {name: entry.record for name, (_, entry) in state.items()}

        return PollWatcher(poll, self.poll_interval, first={name: e.record for name, (_, e) in state.items()})
