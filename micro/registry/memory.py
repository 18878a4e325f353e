"""In-process registry: a dict with TTLs, and watchers fed through queues.

One instance may be shared by several Runtimes of one process (tests do this to
take the network path between two "processes"): each ``async with`` takes a
reference and only the last ``aclose()`` ends the watchers. A record that stops
heart-beating is dropped when its TTL runs out, and watchers see the ``delete``
then, not only at the next ``get()``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Self

import msgspec

from micro.errors import ServiceNotFound
from micro.registry._base import Event, Registry, ServiceRecord, Watcher, merge

_Key = tuple[str, str, str]


class _QueueWatcher(Watcher):
    def __init__(self, owner: MemoryRegistry) -> None:
        self._owner = owner
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def __anext__(self) -> Event:
        event = await self.queue.get()
        if event is None:
            self.queue.put_nowait(None)  # stay closed for every later __anext__
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        if self in self._owner._watchers:
            self._owner._watchers.discard(self)
            self.queue.put_nowait(None)


class MemoryRegistry(Registry):
    """Registry for one process (tests, single-process apps)."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        # (name, version, node id) -> (record with that one node, expiry on the monotonic clock)
        self._nodes: dict[_Key, tuple[ServiceRecord, float]] = {}
        self._timers: dict[_Key, asyncio.TimerHandle] = {}
        self._watchers: set[_QueueWatcher] = set()
        self._users = 0

    async def __aenter__(self) -> Self:
        self._users += 1
        return self

    def _emit(self, type_: str, record: ServiceRecord) -> None:
        event = Event(type=type_, service=record)  # type: ignore[arg-type]
        for w in self._watchers:
            w.queue.put_nowait(event)

    def _arm(self, key: _Key, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(max(delay, 0.0), self._expire, key)

    def _expire(self, key: _Key) -> None:
        self._timers.pop(key, None)
        entry = self._nodes.get(key)
        if entry is None:
            return
        left = entry[1] - time.monotonic()
        if left > 0:  # refreshed meanwhile, or the timer fired a hair early
            self._arm(key, left)
            return
        del self._nodes[key]
        self._emit("delete", entry[0])

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        expires = time.monotonic() + ttl
        for node in record.nodes:
            key = (record.name, record.version, node.id)
            one = msgspec.structs.replace(record, nodes=[node])
            old = self._nodes.get(key)
            self._nodes[key] = (one, expires)
            self._arm(key, ttl)
            if old is None or old[0] != one:
                self._emit("create" if old is None else "update", one)

    async def deregister(self, record: ServiceRecord) -> None:
        for node in record.nodes:
            key = (record.name, record.version, node.id)
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            old = self._nodes.pop(key, None)
            if old is not None:
                self._emit("delete", old[0])

    def _live(self) -> list[ServiceRecord]:
        now = time.monotonic()
        for key in [k for k, (_, exp) in self._nodes.items() if exp <= now]:
            self._expire(key)
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
        """Drop one reference; the last one ends every watcher and expiry timer."""
        if self._users > 1:
            self._users -= 1
            return
        self._users = 0
        for w in list(self._watchers):
            await w.aclose()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
