"""``Service``: a named set of endpoints with a gRPC server, a registry record and a heartbeat.

Beside the gRPC server (the node's ``address``, for any gRPC client) a service
listens on micro's native wire (the node's ``native`` metadata; ``docs/wire.md``),
which micro clients in other processes prefer. Both end in the same endpoints.

Lifecycle: constructing does no I/O. ``async with service`` joins the loop's
runtime, binds the server, registers the record and starts the heartbeat, and
returns once the service can be called. Leaving deregisters first, then stops
accepting, lets in-flight calls finish within ``drain_timeout``, cancels the
rest and closes (last in, first out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import msgspec

from micro import eventloop, metrics, telemetry
from micro.broker import Subscription, drain
from micro.client.client import NATIVE
from micro.codec import JSON, codec_for
from micro.codec.proto_file import renumbered
from micro.connections import DEFAULT_IDLE_TIMEOUT, ConnectionLimit
from micro.errors import BadRequest, ServiceNotFound, UsageError
from micro.limits import Limiter
from micro.middleware import Wrapper
from micro.registry import Node, ServiceRecord
from micro.registry.heartbeat import Heartbeat
from micro.runtime import Runtime
from micro.server.grpc import DEFAULT_MAX_MESSAGE_SIZE, GrpcServer
from micro.service.endpoints import Endpoint, endpoints_of
from micro.tasks import BackgroundTasks
from micro.wire import unix
from micro.wire.server import NativeServer

log = logging.getLogger("micro.service")


class ServiceOptions(typing.TypedDict, total=False):
    """The :class:`Service` keyword arguments an :class:`~micro.Agent` or a :class:`~micro.Flow`
    passes on (they take ``metadata`` themselves, a flow its own ``max_concurrency``)."""

    version: str
    address: str | None
    runtime: Runtime | None
    ttl: float
    heartbeat: float | None
    handler_wrappers: Sequence[Wrapper]
    max_message_size: int
    drain_timeout: float
    max_queue: int
    tls: ssl.SSLContext | None
    reflection: bool
    native: bool
    unix_socket: bool
    max_connections: int | None
    idle_timeout: float


class AgentServiceOptions(ServiceOptions, total=False):
    """:class:`ServiceOptions` and the limiter's ``max_concurrency`` (an agent passes it on)."""

    max_concurrency: int | None


class Service:
    """A service: endpoints that handle requests.

    Args:
        name: the service name callers use (``client.call(name, ...)``).
        version: registered with the record; callers see every version.
        address: ``host:port`` to bind (default ``$MICRO_ADDRESS`` or ``127.0.0.1:0``, a free port).
        metadata: string pairs stored in the registry record.
        runtime: the :class:`~micro.Runtime` to join (default: the loop's shared runtime).
        ttl: seconds the registry keeps the record without a heartbeat.
        heartbeat: seconds between heartbeats (default ``ttl / 3``).
        handler_wrappers: middleware around every endpoint of this service.
        max_concurrency: calls in flight at most (default: no limit); beyond it up to
            ``max_queue`` calls wait, and the rest fail at once with RESOURCE_EXHAUSTED.
        tls: serve over TLS with this context (see :mod:`micro.tls`).
        max_message_size: largest request or response in bytes (RESOURCE_EXHAUSTED beyond).
        drain_timeout: seconds in-flight calls get to finish on shutdown.
        reflection: serve gRPC server reflection (v1 and v1alpha) on the port (on by default).
        native: also serve micro's native wire on a free port of the same host (default on;
            ``False`` serves gRPC only).
        unix_socket: serve the native wire on a Unix socket too, for clients on the same host
            (default on; see :mod:`micro.wire.unix`: only this user may connect, other clients use
            TCP; it carries no TLS, so a service with ``tls`` serves none).
        max_connections: client connections open at once on both wires together; past it
            a new one is refused (default: derived from the descriptor limit, leaving
            an eighth of it for the service's own work; see :mod:`micro.connections`).
        idle_timeout: seconds a connection with nothing in flight may stay silent
            before it is closed (300).

    Example::

        async with micro.New("task") as service:
            service.handle(Task())
            await service.wait()
    """

    def __init__(self, name: str, *, version: str = "latest", address: str | None = None,
                 metadata: Mapping[str, str] | None = None, runtime: Runtime | None = None,
                 ttl: float = 15.0, heartbeat: float | None = None,
                 handler_wrappers: Sequence[Wrapper] = (),
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, drain_timeout: float = 10.0,
                 max_concurrency: int | None = None, max_queue: int = 0,
                 tls: ssl.SSLContext | None = None, reflection: bool = True, native: bool = True,
                 unix_socket: bool = True, max_connections: int | None = None,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if not name or any(c.isspace() or c in "/~" for c in name):
            raise UsageError(f"invalid service name {name!r}: use letters, digits, '-', '_' or '.'")
        self.name = name
        self.version = version
        self.metadata = dict(metadata or {})
        self.id = f"{name}-{uuid.uuid4().hex[:12]}"
        self.ttl = ttl
        self.heartbeat = heartbeat if heartbeat is not None else ttl / 3
        self.tls = tls
        self.handler_wrappers = [telemetry.handler_wrapper, *handler_wrappers]
        self.limiter = Limiter(name, max_concurrency, max_queue) if max_concurrency is not None else None
        if self.limiter is not None:  # outermost: a rejected call costs nothing else
            self.handler_wrappers.insert(0, self.limiter)
        self.drain_timeout = drain_timeout
        self._address = address or os.environ.get("MICRO_ADDRESS") or "127.0.0.1:0"
        self._runtime = runtime
        self._endpoints: dict[str, Endpoint] = {}
        self._subscriptions: list[tuple[str, Callable[..., Awaitable[Any]], str | None, str | None, int | None]] = []
        # one bound on connections and one budget of held request bytes for both wires: they are the service's
        self.connections = ConnectionLimit(f"service {name}", max_connections, idle_timeout)
        """The client connections open on both wires: ``open``, ``peak``, ``refused``, ``max_connections``."""
        connection_limit = self.connections
        self._server = GrpcServer(max_message_size=max_message_size, reflection=reflection,
                                  admit=self.limiter.check if self.limiter is not None else None,
                                  connection_limit=connection_limit)
        self._native = NativeServer(max_message_size=max_message_size, budget=self._server.budget,
                                    body_timeout=self._server.body_timeout, admit=self._server.admit,
                                    connection_limit=connection_limit) if native else None
        self._unix_socket = unix_socket and native  # and no TLS: decided at start (tls may be set until then)
        self._stack: contextlib.AsyncExitStack | None = None
        self._beats: Heartbeat | None = None
        self._stopped = anyio.Event()
        self.address = ""

    # -- building -----------------------------------------------------------------------------

    def handle(self, handler: object, *, name: str | None = None) -> list[Endpoint]:
        """Serve the public ``async def`` methods of ``handler`` as ``Handler.Method`` endpoints.

        May be called before or after the service starts; the registry record is
        refreshed at once.
        """
        found = endpoints_of(handler, self.name, name=name)
        for ep in found:
            if ep.name in self._endpoints:
                raise UsageError(f"{self.name}: endpoint {ep.name} is already handled")
        for ep in found:
            ep.wrap(self.handler_wrappers)
            self._endpoints[ep.name] = ep
            self._server.add(ep)
            if self._native is not None:
                self._native.add(ep)
        if self._beats is not None:
            self._beats.beat()
        return found

    def subscribe(self, topic: str, fn: Callable[[Any], Awaitable[Any]], *, queue: str | None = None,
                  durable: str | None = None, prefetch: int | None = None) -> None:
        """Call ``fn`` for each message on ``topic``.

        The message is converted to ``fn``'s annotated type (a msgspec Struct, a
        betterproto2 message, ``dict``, ``bytes`` or :class:`micro.broker.Message`).
        Instances of one service share the messages (queue group = the service
        name) unless ``queue`` says otherwise. ``durable`` names a consumer that
        outlives the process on a durable broker (JetStream): its messages are
        acknowledged only once ``fn`` returns, and redelivered if it raises.
        ``prefetch``: see :meth:`micro.broker.Broker.subscribe`.
        """
        if self._stack is not None:
            raise UsageError(f"{self.name}: subscribe() before the service starts")
        self._subscriptions.append((topic, fn, queue, durable, prefetch))

    # -- properties ---------------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise UsageError(f"service {self.name!r} is not running: use `async with` first")
        return self._runtime

    @property
    def client(self) -> Any:
        """The runtime's :class:`~micro.client.Client`."""
        return self.runtime.client

    @property
    def serving(self) -> bool:
        """Started, registered and not draining: what its gRPC health service reports as SERVING."""
        return self._server.health.serving

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        return dict(self._endpoints)

    @property
    def record(self) -> ServiceRecord:
        """The registry record of this node."""
        proto = self._server.proto_text(self.name)  # its .proto files: the protobuf contract of its endpoints
        return ServiceRecord(
            name=self.name,
            version=self.version,
            metadata=self.metadata,
            endpoints=[ep.record() for ep in self._endpoints.values()],
            nodes=[Node(id=self.id, address=self.address, metadata=self._node_metadata(proto))],
        )

    async def node_ids(self) -> set[str]:
        """The ids of this service's running nodes, in every process, as the registry lists them now."""
        try:
            records = await self.runtime.registry.get(self.name)
        except ServiceNotFound:
            return set()
        return {n.id for r in records for n in r.nodes}

    def _node_metadata(self, proto: str | None) -> dict[str, str]:
        md = {"pid": str(os.getpid())}
        if metrics.exposed is not None:  # this process serves /metrics: where a dashboard reads its call counts
            host, _, port = metrics.exposed.rpartition(":")
            md["metrics"] = f"{_advertise(host.removeprefix('[').removesuffix(']'))}:{port}"
        if self.tls:
            md["tls"] = "true"
        if proto:
            md["proto"] = proto
        if self._native is not None and self._native.port:
            md[NATIVE] = f"{_advertise(self._native.host)}:{self._native.port}"
            if self._native.unix is not None:
                md[unix.UNIX] = self._native.unix
                md[unix.HOST] = unix.host_id()
        return md

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Join the runtime, bind, register, start the heartbeat. Returns once callable."""
        if self._stack is not None:
            raise UsageError(f"service {self.name!r} is already running")
        stack = contextlib.AsyncExitStack()
        try:
            if self._runtime is None:
                self._runtime = Runtime.current()
            rt = self._runtime
            await rt.acquire()
            stack.push_async_callback(rt.release)
            host, _, port = self._address.rpartition(":")
            await self._server.start(host or "127.0.0.1", int(port or 0), ssl=self.tls)
            if self._native is not None:
                # a TLS node's callers authenticate it (and it them, with mutual TLS) by certificates, which a
                # socket file's permissions cannot stand in for: it serves TCP only
                path = unix.listen_path(self.id) if self._unix_socket and self.tls is None else None
                await self._native.start(host or "127.0.0.1", 0, ssl=self.tls, unix=path)
            stack.push_async_callback(self._stop_servers)
            self.address = f"{_advertise(self._server.host)}:{self._server.port}"
            rt.add_local(self.name, self._endpoints)
            stack.callback(rt.remove_local, self.name, self._endpoints)
            subs: list[Subscription] = []
            stack.push_async_callback(drain, subs)  # all at once, then they drain together
            for topic, fn, queue, durable, prefetch in self._subscriptions:
                more = {} if prefetch is None else {"prefetch": prefetch}  # brokers of others may not take it
                subs.append(await rt.broker.subscribe(topic, _subscriber(fn, f"{self.name} {topic}"),
                                                      queue=queue or self.name, durable=durable, **more))
            await _warn_renumbered(rt, self.record)
            await rt.registry.register(self.record, ttl=self.ttl)
            stack.push_async_callback(self._deregister)
            # the heartbeat stops before the record is deregistered (last in, first out): a beat landing
            # after the deregistration put a stopped service's node back in the registry
            background = BackgroundTasks(f"service {self.name}", log)
            await background.start()
            stack.push_async_callback(background.aclose)
            self._beats = Heartbeat(rt.registry, lambda: self.record, ttl=self.ttl, every=self.heartbeat,
                                    what=f"service {self.name}", log=log)
            stack.callback(setattr, self, "_beats", None)
            background.supervise(self._beats.run, name="heartbeat")
            self._server.health.set_serving(True)
            # first thing on the way out: health probes see NOT_SERVING before the node deregisters
            stack.callback(self._server.health.set_serving, False)
            health = self._server.health  # NOT_SERVING while a backend of the runtime does not answer
            health.set_backends(rt.backends.ok)
            rt.backends.listeners.add(health.set_backends)
            stack.callback(rt.backends.listeners.discard, health.set_backends)
        except BaseException:
            await stack.aclose()
            raise
        self._stopped = anyio.Event()
        self._stack = stack
        log.info("service %s listening on %s", self.name, self.address)

    async def _stop_servers(self) -> None:
        """Drain both wires at once (one after the other, a drain would take twice as long)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._server.stop, self.drain_timeout)
            if self._native is not None:
                tg.start_soon(self._native.stop, self.drain_timeout)

    async def _deregister(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.runtime.registry.deregister(self.record)
            except Exception:
                log.warning("service %s: deregistering failed", self.name, exc_info=True)

    async def stop(self) -> None:
        """Deregister, stop accepting, drain in-flight calls, close (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            await stack.aclose()
        finally:
            self._stopped.set()
            log.info("service %s stopped", self.name)

    async def wait(self) -> None:
        """Wait until the service is stopped (by ``stop()``, a signal under ``run()``, or cancellation)."""
        await self._stopped.wait()

    async def serve(self) -> None:
        """Start, run until SIGINT/SIGTERM (when on the main thread) or cancellation, stop."""
        waiting = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            # the handlers go in before the service registers: a SIGTERM that comes as soon
            # as the service is visible must still stop (and deregister) it, not kill it
            await tg.start(stop_on_signals, waiting)
            try:
                async with self:
                    with waiting:  # only the waiting is cancelled: stop() runs in full
                        await self.wait()
            finally:
                tg.cancel_scope.cancel()

    def run(self) -> None:
        """Run the service as a program: ``micro.New("task").run()``. Blocks until a signal.

        Runs on uvloop when it is installed (``micro[fast]``; see :mod:`micro.eventloop`).
        """
        eventloop.run(self.serve())


async def _warn_renumbered(rt: Runtime, record: ServiceRecord) -> None:
    """Warn when running nodes of this service number the protobuf fields of its messages otherwise."""
    mine = record.nodes[0].metadata.get("proto")
    if not mine:
        return
    try:
        others = await rt.registry.get(record.name)
    except ServiceNotFound:
        return
    for rec in others:
        for node in rec.nodes:
            theirs = node.metadata.get("proto")
            for problem in renumbered(mine, theirs) if theirs and node.id != record.nodes[0].id else ():
                log.warning("service %s: the protobuf layout differs from node %s (%s, running): %s; gRPC clients "
                            "built from one version misread the other", record.name, node.id, rec.version, problem)


def _advertise(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def stop_on_signals(scope: anyio.CancelScope, *,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM; ``task_status.started()`` once the handlers are in."""
    try:
        receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        with receiver as signals:
            task_status.started()
            async for _ in signals:
                scope.cancel()
                return
    except (ValueError, NotImplementedError, RuntimeError):
        task_status.started()
        await anyio.sleep_forever()  # not the main thread: cancellation is the way to stop


def _subscriber(fn: Callable[[Any], Awaitable[Any]], where: str) -> Callable[[Any], Awaitable[None]]:
    """Adapt a typed subscriber to the broker's ``Message`` handler."""
    from micro.broker import Message

    hints = typing.get_type_hints(fn)
    params = [h for k, h in hints.items() if k != "return"]
    tp = params[0] if params else Message
    decode_any = msgspec.json.Decoder().decode

    if tp is Message:
        convert: Callable[[Any], Any] = lambda m: m  # noqa: E731
    elif tp is bytes:
        convert = lambda m: m.data  # noqa: E731
    elif tp in (dict, Any) or typing.get_origin(tp) is dict:
        convert = lambda m: decode_any(m.data)  # noqa: E731
    else:
        codec = codec_for(tp)
        convert = lambda m: codec.decode(m.data, JSON, where)  # noqa: E731

    async def handler(message: Any) -> None:
        try:
            value = convert(message)
        except (BadRequest, msgspec.DecodeError) as exc:
            log.warning("%s: dropped a message that does not decode: %s", where, exc)
            return
        if not telemetry.enabled():
            await fn(value)
            return
        with telemetry.span(f"{message.topic} process", "consumer",
                            {"messaging.destination.name": message.topic, "messaging.message.id": message.id},
                            parent=message.headers):
            await fn(value)

    return handler
