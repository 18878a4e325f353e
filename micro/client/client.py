"""The client: one call path for services in this process and in others.

``call(service, endpoint, request)``:

1. if the runtime hosts that service, the **in-process fast path**: convert the
   request to the endpoint's type, await the handler chain directly (no encoding,
   no sockets) under the call's deadline;
2. otherwise look the service up in a cache kept fresh by the registry's watch
   (no I/O per call), pick a node round-robin, and send over a pooled connection:
   micro's native wire when the node advertises one (its ``native`` metadata) and
   the client's transport allows it (``transport=`` / ``$MICRO_TRANSPORT``: ``auto``,
   the default; ``grpc``; ``native``), over the node's Unix socket when it is on this
   host (:mod:`micro.wire.unix`), gRPC (grpclib) otherwise; protobuf when the
   caller passes a protobuf request and asks for a protobuf response, JSON otherwise.
   What every unary call of an endpoint does alike (its record, wire, retry policy,
   response decoder) is worked out once per cached record: a call plan.

Either way the result is an instance of ``response_type`` when given, and the dict
form of the response otherwise; errors are the same ``micro.errors`` classes.
``response_type=msgspec.Raw`` returns the response's JSON undecoded: the bytes the
native wire or gRPC carried, or the endpoint's own JSON encoding in process (what
the HTTP gateway answers with, never decoding and re-encoding a reply).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import betterproto2
import msgspec

from micro import context, metrics, telemetry
from micro.codec import JSON, PROTO, codec_for, encode_json, is_proto_message
from micro.codec.proto_compiled import compiled
from micro.deadlines import Watchdog
from micro.errors import (
    BadRequest,
    ConfigError,
    EndpointNotFound,
    Error,
    ResourceExhausted,
    ServiceNotFound,
    Timeout,
    Unavailable,
    closest,
)
from micro.middleware import Next, Request, Wrapper, chain
from micro.registry import Endpoint as EndpointRecord
from micro.registry import Node, Registry, ServiceRecord, Watcher
from micro.resource import aclose
from micro.server.grpc import DEFAULT_MAX_MESSAGE_SIZE
from micro.wire import unix

from .native import NativePool
from .pool import NodePool, NodeUnreachable
from .retry import Breakers, RetryPolicy

if TYPE_CHECKING:
    from micro.service.endpoints import Endpoint

_decode_any = msgspec.json.Decoder().decode

log = logging.getLogger("micro.client")


class Client:
    """Calls services by name. Owned by a :class:`micro.Runtime`; use ``service.client``."""

    def __init__(self, registry: Registry, *, local: Mapping[str, Mapping[str, Endpoint]] | None = None,
                 wrappers: Sequence[Wrapper] = (), default_timeout: float | None = 60.0,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, publish: Any = None,
                 tls: ssl.SSLContext | None = None, transport: str | None = None, unix: bool | None = None) -> None:
        self.registry = registry
        self.tls = tls
        self.transport = _transport(transport)
        self.unix = _unix(unix)
        """Whether the native wire takes a node's Unix socket when it is on this host (``unix=`` or
        ``$MICRO_UNIX``: ``1``, the default, or ``0`` for TCP only); read when a node's pool is made."""
        self.retry = RetryPolicy()
        self.breakers = Breakers()
        self.default_timeout = default_timeout
        self.max_message_size = max_message_size
        self._local: Mapping[str, Mapping[str, Endpoint]] = local if local is not None else {}
        self._records: dict[str, list[ServiceRecord]] = {}
        self._plans: dict[tuple[str, str, type, Any], _Plan] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._pools: dict[str, NodePool | NativePool] = {}
        self._retired: list[NodePool | NativePool] = []  # dropped with calls in flight: closed once idle
        self._watchdog = Watchdog()
        self._call: Next = chain([telemetry.call_wrapper, *wrappers], self._dispatch)
        self._remote_call: Next = metrics.remote_wrapper(self._remote)
        self._publish = publish

    # -- public API ---------------------------------------------------------------------------

    async def call(self, service: str, endpoint: str, request: Any = None, *,
                   response_type: type[Any] | None = None, timeout: float | None = None,
                   metadata: Mapping[str, str] | None = None) -> Any:
        """Call ``endpoint`` of ``service`` and return its response.

        Args:
            service: the service name, e.g. ``"task"``.
            endpoint: ``"Handler.Method"``, e.g. ``"Task.ListOverdue"``.
            request: an instance of the request type, a dict, or JSON text/bytes.
            response_type: the type to return; without it, the response's dict form;
                ``msgspec.Raw``: its JSON text undecoded (``bytes(raw)``), as the wire carried it.
            timeout: seconds; the call also never outlives the deadline of the call
                being handled when it is made from inside a handler.
            metadata: string headers sent with the call.

        Raises:
            micro.errors.Error: ``BadRequest``, ``NotFound``, ``EndpointNotFound``,
                ``Timeout``, ``Unavailable``, ``ResourceExhausted``, ``Internal``, …

        Example::

            rsp = await client.call("task", "Task.ListOverdue", {"user_id": "alice"})
        """
        deadline = context.effective_deadline(timeout if timeout is not None else self.default_timeout)
        req = Request(service, endpoint, request, metadata or {}, deadline, False, response_type)
        return await self._call(req)

    async def stream(self, service: str, endpoint: str, request: Any = None, *,
                     response_type: type[Any] | None = None, timeout: float | None = None,
                     metadata: Mapping[str, str] | None = None) -> AsyncIterator[Any]:
        """Call a server-streaming endpoint and iterate over its responses."""
        deadline = context.effective_deadline(timeout if timeout is not None else self.default_timeout)
        req = Request(service, endpoint, request, metadata or {}, deadline, True, response_type)
        items: AsyncIterator[Any] = await self._call(req)
        try:
            async for item in items:
                yield item
        finally:  # a caller that stops early ends the call now (the network stream is reset)
            await aclose(items)

    async def publish(self, topic: str, message: Any, *, headers: Mapping[str, str] | None = None) -> None:
        """Publish a message on the runtime's broker."""
        if self._publish is None:
            raise Unavailable("this client has no broker: create it through a micro.Runtime")
        if not telemetry.enabled():
            await self._publish(topic, message, headers=headers)
            return
        with telemetry.span(f"{topic} publish", "producer", {"messaging.destination.name": topic}):
            carrier = dict(headers or {})
            telemetry.inject(carrier)
            await self._publish(topic, message, headers=carrier)

    # -- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> Awaitable[Any]:
        # a plain function returning the path's coroutine: one coroutine frame less per call
        if req.metadata:  # after the call wrappers, which may add some: both paths alike
            req.metadata = _checked_metadata(req.metadata)
        endpoints = self._local.get(req.service)
        if endpoints is not None:
            ep = endpoints.get(req.endpoint)
            if ep is None:
                raise _no_endpoint(req.service, req.endpoint, list(endpoints))
            if ep.streaming != req.streaming:
                raise _wrong_kind(req, ep.streaming)
            req.wire = "in-process"
            return self._local_stream(ep, req) if req.streaming else self._local_call(ep, req)
        return self._remote_call(req)

    async def _local_call(self, ep: Endpoint, req: Request) -> Any:
        try:
            body = ep.request.convert({} if req.body is None else req.body, ep.where)
        except Error as err:
            metrics.refused(ep.service, ep.name, err.status.name)  # the endpoint counts every other call
            raise
        if req.deadline is None:
            result = await ep.handle(body, req.metadata, None)
        else:
            if req.deadline <= asyncio.get_running_loop().time():
                metrics.refused(ep.service, ep.name, "DEADLINE_EXCEEDED")
                raise Timeout(f"{ep.where}: deadline passed before the call")  # as on the network
            with self._watchdog.watch(req.deadline, ep.where):
                result = await ep.handle(body, req.metadata, req.deadline)
        rt = req.response_type
        if rt is None:
            return ep.response.to_builtins(result)
        if rt is ep.response.type:
            return result
        if rt is msgspec.Raw:
            return msgspec.Raw(ep.response.encode(result, JSON))  # what the network path would carry
        return codec_for(rt).convert(ep.response.to_builtins(result), f"{ep.where} response")

    async def _local_stream(self, ep: Endpoint, req: Request) -> AsyncIterator[Any]:
        body = ep.request.convert({} if req.body is None else req.body, ep.where)
        if req.deadline is not None and req.deadline <= asyncio.get_running_loop().time():
            raise Timeout(f"{ep.where}: deadline passed before the call")  # as on the network, and for calls
        items = await ep.handle(body, req.metadata, req.deadline)
        return self._shape_local(ep, items, req)

    async def _shape_local(self, ep: Endpoint, items: AsyncIterator[Any], req: Request) -> AsyncIterator[Any]:
        rt = req.response_type
        it = aiter(items)
        try:
            while True:
                try:
                    if req.deadline is None:
                        item = await anext(it)
                    else:
                        with self._watchdog.watch(req.deadline, ep.where):
                            item = await anext(it)
                except StopAsyncIteration:
                    return
                if rt is None:
                    yield ep.response.to_builtins(item)
                elif rt is ep.response.type:
                    yield item
                elif rt is msgspec.Raw:
                    yield msgspec.Raw(ep.response.encode(item, JSON))
                else:
                    yield codec_for(rt).convert(ep.response.to_builtins(item), f"{ep.where} response")
        finally:  # stopped early: the handler's generator ends now, not when collected
            await aclose(it)

    # -- network path -------------------------------------------------------------------------

    async def _remote(self, req: Request) -> Any:
        if req.streaming:
            found = self._cached(req.service, req.endpoint)
            record, ep = found if found is not None else await self._resolve(req.service, req.endpoint)
            if not ep.streaming:
                raise _wrong_kind(req, ep.streaming)
            wire = PROTO if _speaks_proto(req, ep) else JSON
            return self._remote_stream(record, ep, req, self._encode(req, wire), wire)
        key = (req.service, req.endpoint, req.body.__class__, req.response_type)
        plan = self._plans.get(key)
        if plan is None or plan.records is not self._records.get(req.service):
            plan = await self._plan(req, key)
        wire = plan.wire
        data = self._encode(req, wire)
        record = plan.record
        nodes = record.nodes
        if not nodes:
            return await self._failover(req, plan, data, None, [], None)
        order = nodes if len(nodes) == 1 else self._nodes(record)
        node = order[0]
        # the usual call: its first node answers; retry and failover state is made only when it does not
        try:
            pool = plan.pools.get(node.id) or plan.pool(node, self._pool)
            req.wire = pool.wire
            reply = await pool.unary(plan.ep.path, data, wire=wire, deadline=req.deadline, metadata=req.metadata)
        except Unavailable as exc:  # NodeUnreachable too; handled outside this block (no exception chained)
            failed = exc
        else:
            if self.breakers._nodes:
                self.breakers.success(node.address)
            return plan.decode(reply, wire, plan.where)
        try:
            return await self._failover(req, plan, data, node, order[1:], failed)
        finally:
            del failed  # no cycle exception -> traceback -> this frame -> exception (keeping data alive)

    async def _failover(self, req: Request, plan: _Plan, data: bytes, node: Node | None, rest: list[Node],
                        failed: Unavailable | None) -> Any:
        """The rest of a unary call whose first node (``node``, ``rest`` the others in order) failed with
        ``failed``: unreachable (nothing was sent) the next node is tried, and when none is left the nodes the
        registry lists now; unavailable (it may have run) only an idempotent endpoint is tried again; then,
        for an idempotent endpoint, further attempts after a pause, never past the deadline.
        ``failed`` ``None``: no node was tried yet."""
        record, ep, wire, idempotent = plan.record, plan.ep, plan.wire, plan.idempotent
        err: Unavailable | None = None
        last: Unavailable | None = None
        try:
            attempts = self.retry.attempts if idempotent else 1
            tried: set[str] = set() if node is None else {node.id}
            nodes = list(rest)
            for attempt in range(1, attempts + 1):
                if failed is None:
                    nodes = list(self._nodes(record))  # a copy: _nodes may return the record's own list
                while nodes or failed is not None:
                    if failed is None:
                        node = nodes.pop(0)
                        tried.add(node.id)
                        try:
                            if record is plan.record:  # the usual case: the plan knows the node's pool
                                pool = plan.pools.get(node.id) or plan.pool(node, self._pool)
                            else:
                                pool = self._pool(node)
                            req.wire = pool.wire
                            reply = await pool.unary(ep.path, data, wire=wire, deadline=req.deadline,
                                                     metadata=req.metadata)
                        except Unavailable as exc:
                            failed = exc
                        else:
                            if self.breakers._nodes:
                                self.breakers.success(node.address)
                            return plan.decode(reply, wire, plan.where)
                    assert node is not None
                    err, failed = failed, None
                    self.breakers.failure(node.address)
                    if isinstance(err, NodeUnreachable):
                        last = err  # nothing was sent: the next node may answer
                        if not nodes:
                            nodes = await self._replaced(req, tried)
                        continue
                    if not idempotent:
                        raise err
                    last = err  # it may have run: only an idempotent endpoint is tried again
                if attempt < attempts:
                    pause = self.retry.delay(attempt)
                    if req.deadline is not None and asyncio.get_running_loop().time() + pause >= req.deadline:
                        break
                    await asyncio.sleep(pause)
                    self._records.pop(req.service, None)
                    record, ep = await self._resolve(req.service, req.endpoint)
            self._records.pop(req.service, None)
            raise Unavailable(f"no node of {req.service!r} answered: {last}")
        finally:
            last = failed = err = None  # no cycles exception -> traceback -> this frame (keeping data alive)

    async def _plan(self, req: Request, key: tuple[str, str, type, Any]) -> _Plan:
        """What every unary call of this endpoint with these types does alike, worked out once per
        registry record (a record the watch replaced makes a new plan)."""
        found = self._cached(req.service, req.endpoint)
        record, ep = found if found is not None else await self._resolve(req.service, req.endpoint)
        if ep.streaming:
            raise _wrong_kind(req, ep.streaming)
        rt = req.response_type
        plan = _Plan(
            records=self._records.get(req.service), record=record, ep=ep,
            wire=PROTO if _speaks_proto(req, ep) else JSON,
            idempotent=ep.metadata.get("idempotent") == "true",
            decode=_any if rt is None else _raw if rt is msgspec.Raw else codec_for(rt).decode,
            where=f"{req.service} {ep.name} response",
        )
        if plan.records is not None:  # a record cached by the watch: the plan holds while it does
            self._plans[key] = plan
        return plan

    async def _replaced(self, req: Request, tried: set[str]) -> list[Node]:
        """Nodes the registry lists now that were not tried, asked for once every cached node refused a call
        before anything was sent (a redeploy, ``micro run --reload``: the nodes were replaced since the cache
        was filled; the registry's watch may not have said so yet)."""
        self._records.pop(req.service, None)
        try:
            record, _ = await self._resolve(req.service, req.endpoint)
        except (ServiceNotFound, EndpointNotFound):
            return []
        return [n for n in self._nodes(record) if n.id not in tried]

    async def _remote_stream(self, record: ServiceRecord, ep: EndpointRecord, req: Request,
                             data: bytes, wire: str) -> AsyncIterator[Any]:
        last: Unavailable | None = None
        nodes = list(self._nodes(record))  # a copy: _nodes may return the record's own list
        tried: set[str] = set()
        while nodes:
            node = nodes.pop(0)
            tried.add(node.id)
            started = False
            try:
                pool = self._pool(node)
            except NodeUnreachable as exc:
                last = exc
                continue
            replies = pool.server_stream(ep.path, data, wire=wire, deadline=req.deadline, metadata=req.metadata)
            try:
                async for reply in replies:
                    started = True
                    yield self._decode(reply, wire, req, ep)
                return
            except NodeUnreachable as exc:
                if started:
                    raise
                last = exc  # nothing was sent: the next node may answer
                if not nodes:
                    nodes = await self._replaced(req, tried)
            finally:
                await replies.aclose()  # stopped early: the network stream and its pool slot go now
        self._records.pop(req.service, None)
        raise Unavailable(f"no node of {req.service!r} answered: {last}")

    def _encode(self, req: Request, wire: str) -> bytes:
        body = req.body
        if body.__class__ is bytes:  # JSON as the gateway passes it on (never a protobuf request)
            data = body
        elif wire == PROTO:
            codec = compiled(body.__class__)  # None: betterproto2's own encoder
            data = bytes(body) if codec is None else codec.encode(body)
        elif body is None:
            data = b"{}"
        elif isinstance(body, (bytes, bytearray, memoryview)):
            data = bytes(body)
        else:
            try:  # a Struct first: the usual request, no other check before it
                data = encode_json(body) if isinstance(body, msgspec.Struct) or not isinstance(body, str) \
                    else body.encode()
            except (TypeError, msgspec.EncodeError, UnicodeEncodeError, RecursionError) as exc:
                # UnicodeEncodeError: a string with lone surrogates; RecursionError: nested too deeply
                raise BadRequest(f"{req.service} {req.endpoint}: request is not JSON-serialisable: {exc}") from None
        if len(data) > self.max_message_size:
            raise ResourceExhausted(
                f"{req.service} {req.endpoint}: request of {len(data)} bytes is over the "
                f"{self.max_message_size}-byte limit"
            )
        return data

    @staticmethod
    def _decode(reply: bytes, wire: str, req: Request, ep: EndpointRecord) -> Any:
        rt = req.response_type
        if rt is None:
            return _decode_any(reply)
        if rt is msgspec.Raw:  # the JSON as it arrived (a raw reply is always asked for as JSON)
            return msgspec.Raw(reply)
        return codec_for(req.response_type).decode(reply, wire, f"{req.service} {ep.name} response")

    async def resolve(self, service: str, endpoint: str) -> tuple[ServiceRecord, EndpointRecord]:
        """The registry record of ``service`` that has ``endpoint``, and that endpoint (from the watched
        cache; ``NotFound`` naming what is missing). ``micro call`` uses it to tell streams from calls."""
        return await self._resolve(service, endpoint)

    def _cached(self, service: str, endpoint: str) -> tuple[ServiceRecord, EndpointRecord] | None:
        """The record and endpoint from the watched cache, without awaiting (the usual case)."""
        for rec in self._records.get(service, ()):
            ep = rec.endpoint(endpoint)
            if ep is not None and rec.nodes:
                return rec, ep
        return None

    async def _resolve(self, service: str, endpoint: str) -> tuple[ServiceRecord, EndpointRecord]:
        records = self._records.get(service)
        cached = records is not None
        for _ in range(2):
            if records is None:
                records = self._records[service] = await self.registry.get(service)
            for rec in records:
                ep = rec.endpoint(endpoint)
                if ep is not None and rec.nodes:
                    return rec, ep
            if not cached:
                break
            records, cached = None, False  # the cache may predate the endpoint: ask once more
        names = sorted({e.name for r in records or () for e in r.endpoints})
        raise _no_endpoint(service, endpoint, names)

    def _nodes(self, record: ServiceRecord) -> list[Node]:
        """Nodes to try in order: round-robin, nodes whose breaker is open last."""
        nodes = record.nodes
        if len(nodes) == 1:
            return nodes
        counter = self._rr.setdefault(record.name, itertools.count())
        start = next(counter) % len(nodes)
        order = nodes[start:] + nodes[:start]
        if self.breakers._nodes:
            order.sort(key=lambda n: self.breakers.is_open(n.address))
        return order

    def channel(self, node: Node) -> NodePool | NativePool:
        """The pooled connection to one node, for a caller that must reach that node (the local broker):
        the native wire when the node has one and this client's transport allows it, else gRPC."""
        return self._pool(node)

    def _pool(self, node: Node) -> NodePool | NativePool:
        """The pool for a node: its native address unless this client speaks only gRPC."""
        native = node.metadata.get(NATIVE) if self.transport != "grpc" else None
        if native is None and self.transport == "native":
            raise NodeUnreachable(
                f"node {node.id} at {node.address} has no native address (an older micro, or a gRPC-only "
                "server) and this client uses the native wire only (transport='native' or MICRO_TRANSPORT=native): "
                "use 'auto' to reach such nodes over gRPC"
            )
        if native is None:
            return self.grpc_channel(node)
        key = _native_key(native, node)
        pool = self._pools.get(key)
        if not isinstance(pool, NativePool):  # none yet, or a gRPC pool on an address now a native one
            if pool is not None:
                pool.close()
            secure = node.metadata.get("tls") == "true"
            md = node.metadata  # a node on this host: its Unix socket, TCP when that is unusable
            # (never for a TLS node: its certificate, not a file's permissions, says who answers)
            # and only a path in this process's own socket directory, not wherever a record points
            path = md.get(unix.UNIX) if self.unix and md.get(unix.HOST) == unix.host_id() and not secure else None
            if path is not None and not unix.ours(path):
                log.info("native wire: node %s's Unix socket %s is not in this process's socket directory "
                         "%s (MICRO_SOCKET_DIR): TCP", node.id, path, unix.socket_dir())
                path = None
            pool = self._pools[key] = NativePool(native, ssl=self._tls_for(node),
                                                 max_message_size=self.max_message_size, unix=path)
        return pool

    def grpc_channel(self, node: Node) -> NodePool:
        """The pooled gRPC connection to a node's gRPC address (with this client's TLS), whatever wire calls
        take: the standard services (``grpc.health.v1``, reflection) are served only there."""
        pool = self._pools.get(node.address)
        if not isinstance(pool, NodePool):  # none yet, or a native pool on an address now a gRPC one
            if pool is not None:
                pool.close()
            pool = self._pools[node.address] = NodePool(node.address, ssl=self._tls_for(node))
        return pool

    def forget_node(self, node: Node) -> None:
        """Drop the pooled connections to a node that left the registry (its gRPC and native addresses), unless
        a cached record still lists the address. An idle pool is closed; one with calls in flight is closed
        once idle (at a later call of this method, or by :meth:`close`), so they finish. The registry watch
        calls it for the nodes a ``delete`` event names, so the pools follow the registry, not grow for ever."""
        listed = {a for records in self._records.values() for rec in records for n in rec.nodes
                  for a in _pool_keys(n)}
        for address in _pool_keys(node):
            if address is None or address in listed:
                continue
            pool = self._pools.pop(address, None)
            if pool is not None:
                self._retired.append(pool)
        busy = []
        for pool in self._retired:  # closed once idle (here, or by close()): never left to the collector
            if pool.places.inflight:
                busy.append(pool)
            else:
                pool.close()
        self._retired = busy

    def _tls_for(self, node: Node) -> ssl.SSLContext | None:
        return (self.tls or _default_tls()) if node.metadata.get("tls") == "true" else None

    async def lookup(self, service: str) -> list[ServiceRecord]:
        """The registry records of a service, from the watched cache (``ServiceNotFound`` if none)."""
        records = self._records.get(service)
        if records is None:
            records = self._records[service] = await self.registry.get(service)
        return records

    # -- cache upkeep -------------------------------------------------------------------------

    async def follow(self, watcher: Watcher) -> None:
        """Drop cached records as the registry reports changes (run by the runtime).

        A new watch starts with an empty cache: changes made while no watch ran are not reported.
        The pools of the nodes a ``delete`` event names are dropped (:meth:`forget_node`), and the call plans
        of its service.
        """
        self._records.clear()
        async for event in watcher:
            name = event.service.name
            cached = self._records.pop(name, None)
            if event.type == "delete":  # the nodes that left: their pools go too, and the service's call plans
                # (made again at its next call): they hold its record and pools, and a churn of services
                # that come and go would grow them for ever
                for key in [k for k in self._plans if k[0] == name]:
                    del self._plans[key]
                gone = {n.id for n in event.service.nodes}
                if cached is None or all(n.id in gone for rec in cached for n in rec.nodes):
                    self._rr.pop(name, None)  # no node left (or none known): its round-robin starts afresh
                for node in event.service.nodes:
                    self.forget_node(node)

    def forget(self, service: str) -> None:
        """Drop the cached records of one service."""
        self._records.pop(service, None)

    def close(self) -> None:
        for pool in self._retired:
            pool.close()
        self._retired.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._plans.clear()  # they hold pools


class _Plan:
    """A unary call's record, endpoint, wire and response decoder, for as long as the record is cached."""

    __slots__ = ("decode", "ep", "idempotent", "pools", "record", "records", "where", "wire")

    def __init__(self, *, records: list[ServiceRecord] | None, record: ServiceRecord, ep: EndpointRecord, wire: str,
                 idempotent: bool, decode: Callable[[bytes, str, str], Any], where: str) -> None:
        self.records, self.record, self.ep, self.wire = records, record, ep, wire
        self.idempotent, self.decode, self.where = idempotent, decode, where
        self.pools: dict[str, NodePool | NativePool] = {}  # by node id: a node's record is fixed with the plan's

    def pool(self, node: Node, find: Callable[[Node], NodePool | NativePool]) -> NodePool | NativePool:
        pool = self.pools[node.id] = find(node)
        return pool


def _any(reply: bytes, wire: str, where: str) -> Any:
    """A reply's dict form (no ``response_type``)."""
    return _decode_any(reply)


def _raw(reply: bytes, wire: str, where: str) -> msgspec.Raw:
    """A reply's JSON as it arrived (``response_type=msgspec.Raw``: always asked for as JSON)."""
    return msgspec.Raw(reply)


NATIVE = "native"
"""The node metadata key of a node's native wire address (``host:port``)."""


def _native_key(native: str, node: Node) -> str:
    """What a node's native pool is kept under: its native address, and the Unix socket its record names (a
    node restarted on the same port with another socket, or none, is not handed the old one's pool)."""
    path = node.metadata.get(unix.UNIX)
    return native if path is None else f"{native} {path}"


def _pool_keys(node: Node) -> tuple[str, str | None]:
    """The keys of a node's gRPC pool and native pool (``None``: it has no native address)."""
    native = node.metadata.get(NATIVE)
    return node.address, None if native is None else _native_key(native, node)


TRANSPORTS = ("auto", "grpc", "native")


def _transport(value: str | None) -> str:
    """The client's wire choice: the argument, else ``$MICRO_TRANSPORT``, else ``auto``."""
    chosen = value if value is not None else (os.environ.get("MICRO_TRANSPORT") or "auto")
    if chosen not in TRANSPORTS:
        where = "transport=" if value is not None else "MICRO_TRANSPORT="
        raise ConfigError(f"{where}{chosen!r} is not a transport: use auto (the native wire to micro nodes, "
                          "gRPC to others), grpc or native")
    return chosen


def _unix(value: bool | None) -> bool:
    """Whether the client uses Unix sockets on this host: the argument, else ``$MICRO_UNIX``, else yes."""
    if value is not None:
        if not isinstance(value, bool):  # "0" would be taken as yes
            raise ConfigError(f"Client(unix={value!r}) is not a setting: use True (the native wire over a node's "
                              "Unix socket when it is on this host), False (TCP only) or None ($MICRO_UNIX)")
        return value
    chosen = os.environ.get("MICRO_UNIX") or "1"
    if chosen not in ("0", "1"):
        raise ConfigError(f"MICRO_UNIX={chosen!r} is not a setting: use 1 (the native wire over a node's Unix "
                          "socket when it is on this host, the default) or 0 (TCP only)")
    return chosen == "1"


_KEY = re.compile(r"[0-9a-z_.\-]+")
_RESERVED = frozenset({"te", "content-type", "user-agent"})
_GOOD_KEYS: dict[str, str] = {}
"""Metadata keys already checked, as callers spell them, and lowercased: a key is checked once, not per call."""
_MAX_GOOD_KEYS = 1024  # callers' header names: past that many, a key is checked each time (never grows for ever)


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata as gRPC carries it (keys lowercased), or ``BadRequest`` on both paths alike."""
    out: dict[str, str] = {}
    good = _GOOD_KEYS
    for key, value in metadata.items():
        k = good.get(key)
        if k is None:
            k = key.lower()
            if k in _RESERVED or k.startswith("grpc-") or k.endswith("-bin") or not _KEY.fullmatch(k):
                raise BadRequest(
                    f"metadata key {key!r} is not allowed: use letters, digits, '-', '_' and '.' "
                    "(not grpc-*, *-bin, te, content-type or user-agent)"
                )
            if len(good) < _MAX_GOOD_KEYS:
                good[key] = k
        # non-empty printable ASCII text (' ' to '~'), as gRPC (grpclib) requires of text metadata
        if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
            raise BadRequest(f"metadata {key!r}: the value must be non-empty printable ASCII text")
        out[k] = value
    return out


def _speaks_proto(req: Request, ep: EndpointRecord) -> bool:
    """Protobuf on the wire only when the caller holds the endpoint's own message types
    (by name: a different message's bytes would parse as garbage, not fail)."""
    rt = req.response_type
    return (
        PROTO in ep.wires
        and isinstance(req.body, betterproto2.Message)
        and is_proto_message(rt)
        and type(req.body).__name__ == ep.request.get("title")
        and getattr(rt, "__name__", None) == ep.response.get("title")
    )


def _default_tls() -> ssl.SSLContext:
    from micro.tls import client_context

    return client_context()


def _no_endpoint(service: str, endpoint: str, have: Sequence[str]) -> EndpointNotFound:
    listing = ", ".join(have) if have else "none"
    guess = closest(endpoint, have)
    hint = f"; did you mean {guess}?" if guess else ""
    return EndpointNotFound(f"service {service!r} has no endpoint {endpoint!r} (it has: {listing}){hint}")


def _wrong_kind(req: Request, streaming: bool) -> BadRequest:
    if streaming:
        return BadRequest(f"{req.service} {req.endpoint} streams its responses: use client.stream()")
    return BadRequest(f"{req.service} {req.endpoint} is not a streaming endpoint: use client.call()")


__all__ = ["Client", "ServiceNotFound"]
