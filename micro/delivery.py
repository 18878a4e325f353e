"""The delivery transport a runtime gives the ``local://`` broker.

The local broker (:mod:`micro.broker.local`) keeps subscriptions in-process and
hands messages to other processes' subscriptions. What it needs for that — the
registry, a cached lookup, one small served endpoint and a way to reach one node —
belongs to the runtime, which holds the registry, the client and the servers. The
broker gets it through :meth:`micro.broker.Broker.attach` as a
:class:`~micro.broker.local.Delivery` and builds no server and touches no client of
its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from micro.client.client import NATIVE
from micro.registry import Node, Registry, ServiceRecord
from micro.server.grpc import GrpcServer
from micro.service.endpoints import endpoints_of
from micro.wire import unix
from micro.wire.server import NativeServer

if TYPE_CHECKING:
    from micro.client import Client
    from micro.health import Backends

__all__ = ["RuntimeDelivery"]


class _Served:
    """The broker's endpoint on both wires: gRPC at ``address`` for any client, and micro's
    native wire (TCP, and a Unix socket for the processes of this host), advertised in ``metadata``
    the way a service node advertises it."""

    def __init__(self, grpc: GrpcServer, native: NativeServer, backends: Backends | None = None) -> None:
        self._grpc = grpc
        self._native = native
        self._backends = backends
        self.address = f"127.0.0.1:{grpc.port}"
        metadata = {NATIVE: f"127.0.0.1:{native.port}"}
        if native.unix is not None:
            metadata[unix.UNIX] = native.unix
            metadata[unix.HOST] = unix.host_id()
        self.metadata: Mapping[str, str] = metadata

    async def stop(self, grace: float) -> None:
        if self._backends is not None:
            self._backends.listeners.discard(self._grpc.health.set_backends)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._grpc.stop, grace)
            tg.start_soon(self._native.stop, grace)


class RuntimeDelivery:
    """A runtime's registry, client and servers, as the local broker uses them."""

    def __init__(self, registry: Registry, client: Client, backends: Backends | None = None) -> None:
        self.registry = registry
        self._client = client
        self._backends = backends  # the runtime's: its health check says NOT_SERVING while one does not answer

    async def lookup(self, service: str) -> list[ServiceRecord]:
        """The records of ``service`` from the client's watched cache (``NotFound`` if none)."""
        return await self._client.lookup(service)

    def forget(self, service: str) -> None:
        """Drop the cached records of ``service`` (a node did not answer)."""
        self._client.forget(service)

    async def serve(self, service: str, handler: object, name: str, *, node_id: str | None = None) -> _Served:
        """Serve ``handler``'s endpoints as ``service`` (handler ``name``) on loopback ports, over gRPC and
        over the native wire, and on a Unix socket named after ``node_id`` (its last twelve hex digits; a
        fresh id when not given) for the processes of this host (the client picks as for any service node:
        by its transport, the socket when on this host, TCP when that is unusable)."""
        grpc = GrpcServer()
        native = NativeServer(max_message_size=self._client.max_message_size)
        for ep in endpoints_of(handler, service, name=name):
            grpc.add(ep)
            native.add(ep)
        await grpc.start("127.0.0.1", 0)
        try:
            await native.start("127.0.0.1", 0, unix=unix.listen_path(node_id or f"{service}-{uuid.uuid4().hex[:12]}"))
        except BaseException:
            await grpc.stop(0)
            raise
        health = grpc.health
        health.set_serving(True)  # its grpc.health.v1 check says so (NOT_SERVING again once it stops)
        if self._backends is not None:  # and NOT_SERVING while a backend does not answer, as a service's
            health.set_backends(self._backends.ok)
            self._backends.listeners.add(health.set_backends)
        return _Served(grpc, native, self._backends)

    async def send(self, node: Node, path: str, payload: bytes, *, timeout: float) -> None:
        """One unary JSON call to ``path`` on that node, on the wire its record and the client's transport
        choose (``micro.errors.Error`` when it fails)."""
        await self._client.channel(node).unary(path, payload, deadline=anyio.current_time() + timeout)
