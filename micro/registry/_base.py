"""The registry interface: who exists, where, and which endpoints they serve.

A service registers one record per node (process) with a TTL and refreshes it by
heartbeat; ``get`` merges the nodes of one name and version into one record.
Backends: ``memory`` (one process), ``local`` (machine-wide, no server; the
default) and ``nats`` (many machines). :class:`Registry` is the template every
backend fills in; :class:`PollWatcher` is the one watch loop of backends that poll.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import collections
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, Literal

import anyio
import msgspec

from micro.errors import MicroError, RegistryError, ServiceNotFound, Unavailable, UsageError
from micro.resource import Resource, redact

log = logging.getLogger("micro.registry")


class Node(msgspec.Struct, frozen=True):
    """One running instance of a service."""

    id: str
    address: str
    metadata: dict[str, str] = {}


class Endpoint(msgspec.Struct):
    """One endpoint: its wire path, JSON Schemas and description."""

    name: str
    path: str
    request: dict[str, Any] = {}
    response: dict[str, Any] = {}
    description: str = ""
    streaming: bool = False
    wires: list[str] = msgspec.field(default_factory=lambda: ["json"])
    metadata: dict[str, str] = {}


class ServiceRecord(msgspec.Struct):
    """A service as the registry knows it."""

    name: str
    version: str = "latest"
    metadata: dict[str, str] = {}
    endpoints: list[Endpoint] = []
    nodes: list[Node] = []

    def endpoint(self, name: str) -> Endpoint | None:
        """The endpoint of that name, if the record has it."""
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        return None


class Event(msgspec.Struct):
    """A change seen by ``watch()``: the record carries the nodes that changed."""

    type: Literal["create", "update", "delete"]
    service: ServiceRecord


class Watcher(abc.ABC):
    """An async iterator of registry events; ``aclose()`` stops it (idempotent).

    Use it with ``contextlib.aclosing(registry.watch())`` so it stops with the block.
    """

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Event: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


Snapshot = Mapping[str, ServiceRecord]
"""Live one-node records by a backend's key for the node (what a poll sees)."""


class PollWatcher(Watcher):
    """The watch loop of a registry that cannot push: diff a snapshot every ``interval`` seconds.

    ``poll()`` returns the live one-node records by key. ``first`` is the snapshot at
    the time of ``watch()`` (so a change right after it is reported); without it the
    first poll sets the baseline. A poll that raises ``Unavailable`` is retried on the
    next tick, so a watch survives a server restart.
    """

    def __init__(self, poll: Callable[[], Awaitable[Snapshot]], interval: float, *,
                 first: Snapshot | None = None) -> None:
        self._poll = poll
        self._interval = interval
        self._snapshot = first
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = asyncio.Event()

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._snapshot is not None:
                with anyio.move_on_after(self._interval):
                    await self._closed.wait()
            if self._closed.is_set():
                raise StopAsyncIteration
            try:
                snap = await self._poll()
            except Unavailable as exc:
                log.debug("registry watch: %s (retrying)", exc)
                if self._snapshot is None:
                    self._snapshot = {}
                continue
            if self._snapshot is not None:
                self._pending.extend(diff(self._snapshot, snap))
            self._snapshot = snap
        return self._pending.popleft()

    async def aclose(self) -> None:
        self._closed.set()


def diff(old: Snapshot, new: Snapshot) -> list[Event]:
    """The events that turn snapshot ``old`` into ``new``."""
    events = []
    for key, record in new.items():
        before = old.get(key)
        if before is None:
            events.append(Event(type="create", service=record))
        elif before != record:
            events.append(Event(type="update", service=record))
    events.extend(Event(type="delete", service=record) for key, record in old.items() if key not in new)
    return events


class Registry(Resource, abc.ABC):
    """Service discovery, a :class:`~micro.resource.Resource`: construction does no I/O,
    ``async with`` opens it, and every method needs it open.

    The public methods check their arguments and the state the same way for every
    backend, then call the backend's hooks: ``_register`` / ``_deregister`` (one-node
    records), ``_records`` (the live one-node records, of one name or all) and
    ``_watch``; plus ``_open`` / ``_close`` if it holds a connection.
    """

    kind: ClassVar[str] = "registry"
    error: ClassVar[type[MicroError]] = RegistryError
    url: str = ""

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        """Add or refresh the record's nodes; they expire ``ttl`` seconds after the last call."""
        _check_record(record)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
            raise UsageError(f"registry ttl must be a positive number of seconds, not {ttl!r}")
        self._check_open(f"register {record.name!r}")
        await self._register(record, float(ttl))

    async def deregister(self, record: ServiceRecord) -> None:
        """Remove the record's nodes (a node that is not registered is not an error)."""
        _check_record(record)
        self._check_open(f"deregister {record.name!r}")
        await self._deregister(record)

    async def get(self, name: str) -> builtins.list[ServiceRecord]:
        """Every version of a service, nodes merged; ``ServiceNotFound`` when there is none."""
        _check_name(name)
        self._check_open(f"look up {name!r}")
        found = merge([r for r in await self._records(name) if r.name == name])
        if not found:
            raise ServiceNotFound(f"service {name!r} is not registered in {redact(self.url)}{self._missing_hint()}")
        return found

    async def list(self) -> builtins.list[ServiceRecord]:
        """Every service, nodes merged, sorted by name and version."""
        self._check_open("list services")
        return merge(await self._records(None))

    def watch(self) -> Watcher:
        """Events for every change from now on."""
        self._check_open("watch")
        return self._watch()

    def _missing_hint(self) -> str:
        """What ``ServiceNotFound`` adds after the URL (e.g. what to check)."""
        return ""

    @abc.abstractmethod
    async def _register(self, record: ServiceRecord, ttl: float) -> None:
        """Add or refresh each node of ``record`` (a record per node), expiring ``ttl`` s from now."""

    @abc.abstractmethod
    async def _deregister(self, record: ServiceRecord) -> None:
        """Remove each node of ``record`` if present."""

    @abc.abstractmethod
    async def _records(self, name: str | None) -> builtins.list[ServiceRecord]:
        """The live one-node records (of service ``name``, or of all); the base merges them."""

    @abc.abstractmethod
    def _watch(self) -> Watcher:
        """Events from now on."""


def _check_record(record: ServiceRecord) -> None:
    if not isinstance(record, ServiceRecord):
        raise UsageError(f"the registry takes a ServiceRecord, not {type(record).__name__}")
    _check_name(record.name)
    if not isinstance(record.version, str) or not record.version:
        raise UsageError(f"service {record.name!r}: version must be a non-empty string, not {record.version!r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise UsageError(f"a service name must be a non-empty string, not {name!r}")


def merge(records: list[ServiceRecord]) -> list[ServiceRecord]:
    """Merge per-node records into one record per (name, version), sorted."""
    merged: dict[tuple[str, str], ServiceRecord] = {}
    for rec in records:
        key = (rec.name, rec.version)
        have = merged.get(key)
        if have is None:
            merged[key] = msgspec.structs.replace(rec, nodes=list(rec.nodes))
        else:
            have.nodes.extend(n for n in rec.nodes if n not in have.nodes)
    return [merged[k] for k in sorted(merged)]
