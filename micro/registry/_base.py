"""The registry interface: who exists, where, and which endpoints they serve.

A service registers one record per node (process) with a TTL and refreshes it by
heartbeat; ``get`` merges the nodes of one name and version into one record.
Backends: ``memory`` (one process), ``local`` (machine-wide, no server; the
default) and ``nats`` (many machines).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Literal, Self

import msgspec


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
    """An async iterator of registry events; ``aclose()`` stops it."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Event: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class Registry(abc.ABC):
    """Service discovery. Construction does no I/O; ``async with`` opens it."""

    url: str = ""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # noqa: B027 - optional for backends with nothing to close
        """Release the backend's resources (idempotent)."""

    @abc.abstractmethod
    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        """Add or refresh the record's nodes; they expire ``ttl`` seconds after the last call."""

    @abc.abstractmethod
    async def deregister(self, record: ServiceRecord) -> None:
        """Remove the record's nodes."""

    @abc.abstractmethod
    async def get(self, name: str) -> list[ServiceRecord]:
        """Every version of a service, nodes merged; ``ServiceNotFound`` when there is none."""

    @abc.abstractmethod
    async def list(self) -> list[ServiceRecord]:
        """Every service, nodes merged, sorted by name and version."""

    @abc.abstractmethod
    def watch(self) -> Watcher:
        """Events for every change from now on."""


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
