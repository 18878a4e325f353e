"""In-process registry: a dict with TTLs, and watchers fed through queues."""

from __future__ import annotations

import asyncio
import time

import msgspec

from micro.errors import ServiceNotFound
from micro.registry._base import Event, Registry, ServiceRecord, Watcher, merge


class _QueueWatcher(Watcher):
    def __init__(self, owner: MemoryRegistry) -> None:
        self._owner = owner
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def __anext__(self) -> Event:
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self._owner._watchers.discard(self)
        self.queue.put_nowait(None)


class MemoryRegistry(Registry):
    """Registry for one process (tests, single-process apps)."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        # (name, version, node id) -> (record with that one node, expiry)
        self._nodes: dict[tuple[str, str, str], tuple[ServiceRecord, float]] = {}
        self._watchers: set[_QueueWatcher] = set()

    def _emit(self, type_: str, record: ServiceRecord) -> None:
        event = Event(type=type_, service=record)  # type: ignore[arg-type]
        for w in self._watchers:
            w.queue.put_nowait(event)

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        expires = time.monotonic() + ttl
        for node in record.nodes:
            key = (record.name, record.version, node.id)
            one = msgspec.structs.replace(record, nodes=[node])
            old = self._nodes.get(key)
            self._nodes[key] = (one, expires)
            if old is None or old[0] != one:
                self._emit("create" if old is None else "update", one)

    async def deregister(self, record: ServiceRecord) -> None:
        for node in record.nodes:
            old = self._nodes.pop((record.name, record.version, node.id), None)
            if old is not None:
                self._emit("delete", old[0])

    def _live(self) -> list[ServiceRecord]:
        now = time.monotonic()
        for key in [k for k, (_, exp) in self._nodes.items() if exp <= now]:
            rec, _ = self._nodes.pop(key)
            self._emit("delete", rec)
        return [rec for rec, _ in self._nodes.values()]

    async def get(self, name: str) -> list[ServiceRecord]:
        found = merge([r for r in self._live() if r.name == name])
        if not found:
            raise ServiceNotFound(f"service {name!r} is not registered ({self.url})")
        return found

    async def list(self) -> list[ServiceRecord]:
        return merge(self._live())

    def watch(self) -> Watcher:
        w = _QueueWatcher(self)
        self._watchers.add(w)
        return w

    async def aclose(self) -> None:
        for w in list(self._watchers):
            await w.aclose()
