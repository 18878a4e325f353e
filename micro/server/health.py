"""The standard gRPC health service (``grpc.health.v1.Health``) of a micro server.

Kubernetes gRPC probes, grpc-health-probe and load balancers ask ``Check`` (or
keep a ``Watch`` open) for the overall status (service ``""``), a gRPC service
(``task.Task``) or a micro service name (``task``). A node is SERVING once it is
started and registered, and NOT_SERVING from the moment it starts draining,
before it deregisters, so a balancer takes it out before its calls are refused;
also NOT_SERVING while one of its runtime's backends (registry, store, broker)
does not answer (:mod:`micro.health`).

grpclib has a ``grpclib.health`` service, but it is built around polled checks,
its ``Watch`` never ends (a draining server would wait its whole grace period
for every open one), and its messages are registered in protobuf's default pool
under the names grpcio-health-checking registers too (the two cannot be imported
into one process). This one keeps its messages in a private pool
(:mod:`micro.server.standard`); every open ``Watch`` sees NOT_SERVING at a drain
and ends when the server stops.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream

from micro.server.standard import message

__all__ = ["Health"]

Request = message("grpc.health.v1.HealthCheckRequest")
Response = message("grpc.health.v1.HealthCheckResponse")
ListRequest = message("grpc.health.v1.HealthListRequest")
ListResponse = message("grpc.health.v1.HealthListResponse")
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


class Health:
    """Serving status by name; ``set_serving`` flips all of them at once (one node, one state)."""

    def __init__(self) -> None:
        self.names: set[str] = {""}
        self.serving = False
        self.backends_ok = True
        self._changed = asyncio.Event()
        self._closed = False

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/grpc.health.v1.Health/Check": Handler(self.Check, Cardinality.UNARY_UNARY, Request, Response),
            "/grpc.health.v1.Health/List": Handler(self.List, Cardinality.UNARY_UNARY, ListRequest, ListResponse),
            "/grpc.health.v1.Health/Watch": Handler(self.Watch, Cardinality.UNARY_STREAM, Request, Response),
        }

    def add(self, *names: str) -> None:
        """Answer for these names too (gRPC services, a micro service name)."""
        self.names.update(names)
        self._notify()

    def set_serving(self, serving: bool) -> None:
        """SERVING (started, registered) or NOT_SERVING (draining, stopped)."""
        if serving != self.serving:
            self.serving = serving
            self._notify()

    def set_backends(self, ok: bool) -> None:
        """Whether the runtime's backends answer (:attr:`micro.health.Backends.listeners`)."""
        if ok != self.backends_ok:
            self.backends_ok = ok
            self._notify()

    def close(self) -> None:
        """NOT_SERVING, and every open ``Watch`` ends (the server is stopping)."""
        self.serving = False
        self._closed = True
        self._notify()

    def status(self, name: str) -> int:
        if name not in self.names:
            return SERVICE_UNKNOWN
        return SERVING if self.serving and self.backends_ok else NOT_SERVING

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None  # grpclib answers a call without a message itself
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await stream.send_trailing_metadata(status=Status.NOT_FOUND,
                                                status_message=f"unknown service {request.service!r}")
            return
        await stream.send_message(Response(status=status))

    async def List(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        reply = ListResponse()
        for name in sorted(self.names):
            reply.statuses[name].status = self.status(name)
        await stream.send_message(reply)

    async def Watch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        sent = None
        while True:
            changed = self._changed
            status = self.status(request.service)
            if status != sent:
                await stream.send_message(Response(status=status))
                sent = status
            if self._closed:
                return
            await changed.wait()
