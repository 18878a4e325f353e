"""The machine-wide broker: processes on one machine exchange messages with no extra server.

Subscriptions live in the process that made them, with the memory broker's
buffers and workers (a slow subscriber never blocks a publisher). A process
that subscribes also serves one small endpoint, ``Broker.Deliver`` (gRPC and the native wire, over a
Unix socket for the processes of its host), and
registers it in the runtime's registry as a node of ``micro-broker`` whose
metadata lists its subscriptions. A publisher reads those nodes (from the
client's watched cache: no I/O per publish), applies NATS rules — every plain
subscriber gets the message, each queue group one member, round-robin across
processes — and sends each remote process one ``Deliver`` with the ids of its
subscriptions that take the message. Delivery is at most once, like core NATS:
a process that is unreachable misses the message (and its record expires), and
a subscriber in another process may miss what is published in the first second
after it subscribes if, just before, no process had subscribed at all.

The broker needs a runtime: :class:`micro.Runtime` attaches itself, and the broker takes
from it a :class:`Delivery` (the registry, the watched lookup, serving its endpoint,
reaching one node; :mod:`micro.delivery`) — it builds no server and touches no client
itself. With the ``local`` registry this spans the machine; with ``memory`` it is one process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec

from micro.broker._base import (
    ID_HEADER,
    Message,
    MessageHandler,
    new_message_id,
)
from micro.broker.memory import DEFAULT_QUEUE_SIZE, MemoryBroker, MemorySubscription, topic_matches
from micro.errors import BrokerError, Error, NotFound
from micro.registry import Node, Registry, ServiceRecord
from micro.registry.heartbeat import Heartbeat
from micro.tasks import BackgroundTasks

if TYPE_CHECKING:
    from micro.runtime import Runtime

log = logging.getLogger("micro.broker.local")

SERVICE = "micro-broker"
ABSENT_CACHE = 1.0
"""Seconds a publisher trusts "no process subscribes" before asking the registry again."""


class _Sub(msgspec.Struct, frozen=True):
    id: str
    topic: str
    queue: str = ""


class DeliverRequest(msgspec.Struct):
    topic: str
    data: bytes
    headers: dict[str, str] = {}
    id: str = ""
    subs: list[str] = []


class DeliverResponse(msgspec.Struct):
    delivered: int = 0


_subs_decoder = msgspec.json.Decoder(list[_Sub])


class Served(Protocol):
    """An endpoint a :class:`Delivery` serves: where, what its node record advertises beside the
    address (e.g. another wire's address), and how to stop it."""

    address: str
    metadata: Mapping[str, str]

    async def stop(self, grace: float) -> None: ...


class Delivery(Protocol):
    """What the local broker needs from the runtime that holds it (:class:`micro.delivery.RuntimeDelivery`):
    the registry, the watched lookup, serving its one endpoint, and reaching one node."""

    registry: Registry

    async def lookup(self, service: str) -> list[ServiceRecord]: ...

    def forget(self, service: str) -> None: ...

    async def serve(self, service: str, handler: object, name: str, *, node_id: str | None = None) -> Served: ...

    async def send(self, node: Node, path: str, payload: bytes, *, timeout: float) -> None: ...


class _Target(msgspec.Struct, frozen=True):
    node: Node  # its registry record, less the subscription list (how to reach it: address, wires)
    sub: _Sub


class LocalBroker(MemoryBroker):
    """Topics across the processes that share a registry (``local://``)."""

    def __init__(self, url: str = "local://", *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 drain_timeout: float = 5.0) -> None:
        super().__init__(queue_size=queue_size, drain_timeout=drain_timeout)
        self.url = url
        self.node_id = f"{SERVICE}-{uuid.uuid4().hex[:12]}"
        self._delivery: Delivery | None = None
        self._ids: dict[MemorySubscription, _Sub] = {}
        self._by_id: dict[str, MemorySubscription] = {}
        self._server: Served | None = None
        self._node = Node(self.node_id, "")
        self._beats: BackgroundTasks | None = None
        self._heartbeat: Heartbeat | None = None
        self._parsed: dict[int, tuple[list[ServiceRecord], list[_Target]]] = {}
        self._turns = itertools.count()
        self._absent_until = 0.0

    @classmethod
    def from_url(cls, url: str) -> LocalBroker:
        """``local://`` (options as for ``memory://``)."""
        inner = MemoryBroker.from_url(url.replace("local://", "memory://", 1))
        return cls(url, queue_size=inner.queue_size, drain_timeout=inner.drain_timeout)

    def attach(self, runtime: Runtime) -> None:
        """Deliver through this runtime's :class:`Delivery` (called by ``Runtime``)."""
        self._delivery = runtime.delivery

    # -- subscribing --------------------------------------------------------------------------

    async def _subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None,
                         durable: str | None, prefetch: int | None) -> MemorySubscription:
        if self._delivery is None:
            raise BrokerError(f"broker {self.url} needs a runtime: create it through micro.Runtime")
        sub = await super()._subscribe(topic, handler, queue=queue, durable=durable, prefetch=prefetch)
        entry = _Sub(uuid.uuid4().hex[:16], topic, queue or "")
        self._ids[sub] = entry
        self._by_id[entry.id] = sub
        await self._serve()
        await self._register()
        return sub

    def _remove(self, sub: MemorySubscription) -> None:
        super()._remove(sub)
        entry = self._ids.pop(sub, None)
        if entry is not None:
            self._by_id.pop(entry.id, None)
            if self._heartbeat is not None:
                self._heartbeat.beat()  # registers the record without it

    async def _serve(self) -> None:
        if self._server is not None:
            return
        assert self._delivery is not None
        server = await self._delivery.serve(SERVICE, _Deliverer(self), "Broker", node_id=self.node_id)
        self._server = server
        self._node = Node(self.node_id, server.address, dict(server.metadata))
        beats = BackgroundTasks(f"broker {self.url} heartbeat", log)
        await beats.start()
        self._beats = beats
        self._heartbeat = Heartbeat(self._delivery.registry, self._record, ttl=15.0, every=5.0,
                                    what=f"broker {self.url}", log=log)
        beats.supervise(self._heartbeat.run, name="heartbeat")

    def _record(self) -> ServiceRecord:
        subs = msgspec.json.encode(list(self._ids.values())).decode()
        return ServiceRecord(SERVICE, metadata={"type": "internal"},
                             nodes=[Node(self.node_id, self._node.address,
                                         {**self._node.metadata, "subs": subs, "pid": str(os.getpid())})])

    async def _register(self) -> None:
        assert self._delivery is not None
        await self._delivery.registry.register(self._record(), ttl=15.0)

    async def _close(self) -> None:
        delivery, server, beats = self._delivery, self._server, self._beats
        self._server = self._beats = self._heartbeat = None
        try:
            if beats is not None:
                await beats.aclose()
            if server is not None and delivery is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await delivery.registry.deregister(self._record())
                    except Exception:
                        log.warning("broker %s: deregistering failed", self.url, exc_info=True)
            await super()._close()
        finally:  # whatever failed above: the server (its ports, its Unix socket file) goes, bounded by its grace
            if server is not None:
                with anyio.CancelScope(shield=True):
                    await server.stop(1.0)

    # -- publishing ---------------------------------------------------------------------------

    async def _publish(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        if self._delivery is None:
            raise BrokerError(f"broker {self.url} needs a runtime: create it through micro.Runtime")
        message_id = new_message_id(headers)
        hdrs = {**(headers or {}), ID_HEADER: message_id}
        targets = [t for t in await self._targets() if topic_matches(t.sub.topic, topic)]
        chosen: list[_Target] = [t for t in targets if not t.sub.queue]
        groups: dict[tuple[str, str], list[_Target]] = {}
        for t in targets:
            if t.sub.queue:
                groups.setdefault((t.sub.topic, t.sub.queue), []).append(t)
        turn = next(self._turns)
        for members in groups.values():
            members.sort(key=lambda t: (t.node.id, t.sub.id))
            chosen.append(members[turn % len(members)])
        by_node: dict[str, tuple[Node, list[str]]] = {}
        for t in chosen:
            by_node.setdefault(t.node.id, (t.node, []))[1].append(t.sub.id)
        msg = Message(topic=topic, data=data, headers=hdrs, id=message_id)
        own = by_node.pop(self.node_id, (self._node, None))[1]
        crowded = False
        if own:
            crowded = self._push(own, msg)[1]
        if by_node:
            async with anyio.create_task_group() as tg:
                for node, ids in by_node.values():
                    tg.start_soon(self._send, node, DeliverRequest(topic, data, hdrs, message_id, ids))
        elif crowded:
            await asyncio.sleep(0)  # as the memory broker: let consumers run before their buffers fill

    def _push(self, ids: list[str], msg: Message) -> tuple[int, bool]:
        """Buffer ``msg`` for these subscriptions: how many took it, and whether a buffer is past half full."""
        n, crowded = 0, False
        for sid in ids:
            sub = self._by_id.get(sid)
            if sub is not None:
                crowded = sub._push(msg) or crowded
                n += 1
        return n, crowded

    async def _targets(self) -> list[_Target]:
        own = [_Target(self._node, e) for e in self._ids.values()]
        assert self._delivery is not None
        now = anyio.current_time()
        if now < self._absent_until:
            return own
        try:
            records = await self._delivery.lookup(SERVICE)
        except NotFound:
            self._absent_until = now + ABSENT_CACHE  # nobody subscribes anywhere: do not ask on every publish
            return own
        cached = self._parsed.get(id(records))
        if cached is None or cached[0] is not records:
            remote: list[_Target] = []
            for rec in records:
                for node in rec.nodes:
                    if node.id == self.node_id:
                        continue
                    try:
                        subs = _subs_decoder.decode(node.metadata.get("subs", "[]"))
                    except msgspec.DecodeError:
                        continue
                    reach = Node(node.id, node.address, {k: v for k, v in node.metadata.items() if k != "subs"})
                    remote += [_Target(reach, s) for s in subs]
            self._parsed = {id(records): (records, remote)}
            cached = self._parsed[id(records)]
        return own + cached[1]

    async def _send(self, node: Node, req: DeliverRequest) -> None:
        assert self._delivery is not None
        try:
            await self._delivery.send(node, f"/{SERVICE}.Broker/Deliver", msgspec.json.encode(req), timeout=5.0)
        except Error as exc:
            log.warning("broker %s: %s at %s missed %r (%s)", self.url, node.id, node.address, req.topic, exc)
            self._delivery.forget(SERVICE)


class _Deliverer:
    """The ``Broker`` handler each subscribing process serves."""

    def __init__(self, broker: LocalBroker) -> None:
        self._broker = broker

    async def Deliver(self, req: DeliverRequest) -> DeliverResponse:
        """Hand a message to this process's subscriptions (by id)."""
        msg = Message(topic=req.topic, data=req.data, headers=req.headers, id=req.id)
        delivered, crowded = self._broker._push(req.subs, msg)
        if crowded:
            await asyncio.sleep(0)
        return DeliverResponse(delivered)
