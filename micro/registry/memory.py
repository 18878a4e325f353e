"""In-process registry: a dict with TTLs, and watchers fed through queues.

One instance may be shared by several Runtimes of one process (tests do this to
take the network path between two "processes"): each ``async with`` takes a
reference (see :mod:`micro.resource`) and the last one to leave ends the watchers. A record that stops
heart-beating is dropped when its TTL runs out, and watchers see the ``delete``
then, not only at the next ``get()``.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from micro.registry._base import Event, Registry, ServiceRecord, Watcher

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

    async def _register(self, record: ServiceRecord, ttl: float) -> None:
        expires = time.monotonic() + ttl
        for node in record.nodes:
            key = (record.name, record.version, node.id)
            one = msgspec.structs.replace(record, nodes=[node])
            old = self._nodes.get(key)
            self._nodes[key] = (one, expires)
            self._arm(key, ttl)
            if old is None or old[0] != one:
                self._emit("create" if old is None else "update", one)

    async def _deregister(self, record: ServiceRecord) -> None:
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

    async def _records(self, name: str | None) -> list[ServiceRecord]:
        return self._live()

    def _watch(self) -> Watcher:
        w = _QueueWatcher(self)
        self._watchers.add(w)
        return w

    async def _close(self) -> None:
        """The last user left: end every watcher and expiry timer."""
        for w in list(self._watchers):
            await w.aclose()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
