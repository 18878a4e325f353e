"""One grpclib server per service, speaking protobuf and JSON on the same port.

grpclib checks the request's content subtype against one codec inside
``request_handler``; its per-connection ``Handler.accept`` is the one place a codec
can be chosen per request. :class:`_Handler` picks ``application/grpc`` (protobuf)
or ``application/grpc+json`` there, with a pass-through :class:`RawCodec`: bytes
are decoded by the endpoint's own codec, once. The standard services every port
serves (``grpc.health.v1.Health``, server reflection v1 and v1alpha) get grpclib's
protobuf codec instead. grpclib is pinned (0.4.9) because this leans on
``Handler.accept`` and the server stream's ``_stream``.

A call's handler is cancelled (the caller's ``RST_STREAM``, a lost connection, a drain past
its grace, the call's ``grpc-timeout``) the way an anyio cancel scope around it would cancel it,
as on the native wire: through :func:`micro.cancel.cancel`, so a section the handler shields
(its clean-up, a store write) runs to its end first. grpclib would ``Task.cancel()`` it, cutting
such a section: :class:`_Handler` overrides grpclib's ``Handler.cancel``/``close``, each call
detaches grpclib's per-stream cancel of the task (``wrapper``), and the deadline is not given to
grpclib (its timer) but watched by the server's :class:`~micro.deadlines.Watchdog`; the caller
still gets ``DEADLINE_EXCEEDED``. The grpclib internals this reads are checked at import
(:data:`_CANCELS`); without them a reset stream, a lost connection and a stop cancel a call as grpclib
does (``Task.cancel()``: a shielded section is cut), while its ``grpc-timeout`` is still taken from
grpclib and enforced by the Watchdog. The standard services keep grpclib's own deadline handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.const import Handler as GrpcHandler
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec as GrpclibProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler as _BaseHandler
from grpclib.server import Server, Stream, request_handler

from micro.cancel import DEFAULT_SHIELD_TIMEOUT, cancel, stop_all
from micro.codec import JSON, PROTO, ProtoCodec, StructCodec
from micro.codec.proto_file import (
    Method,
    NoDescriptor,
    ProtoMethod,
    betterproto_file,
    package_name,
    service_file,
    to_text,
    well_known_files,
)
from micro.connections import ConnectionLimit, quiet_accept_errors
from micro.deadlines import Watchdog
from micro.errors import Error, ResourceExhausted, Timeout
from micro.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONNECTION_BUFFERED_BYTES,
    BodyBudget,
)
from micro.metrics import GRPC
from micro.resource import aclose
from micro.server.health import Health
from micro.server.reflection import Reflection
from micro.tasks import BackgroundTasks

if TYPE_CHECKING:
    from micro.service.endpoints import Endpoint

log = logging.getLogger("micro.server")

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
DEFAULT_KEEPALIVE_TIME = 60.0
"""Seconds between the server's HTTP/2 pings on a connection with calls in flight."""
DEFAULT_KEEPALIVE_TIMEOUT = 20.0
"""Seconds a ping may go unanswered before the server closes the connection."""
REFUSED_LINGER = 1.0
"""Seconds a connection refused at ``max_connections`` stays half-closed for its client to read the GOAWAY."""


class RawCodec(CodecBase):
    """Passes bytes through; the endpoint's codec does the real work."""

    def __init__(self, subtype: str) -> None:
        self._subtype = subtype

    @property
    def __content_subtype__(self) -> str:
        return self._subtype

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


CODECS = {PROTO: RawCodec("proto"), JSON: RawCodec("json")}


DRAINING = "the node is shutting down: call another node"
"""The UNAVAILABLE message of a call refused while draining; the client tries another node."""


async def _refuse(stream: Stream[Any, Any]) -> None:
    raise GRPCError(Status.UNAVAILABLE, DRAINING)


class _Draining(dict[str, GrpcHandler]):
    """The mapping of a closing server: every path refuses, before reading the request."""

    def get(self, key: str, default: Any = None) -> GrpcHandler:
        return GrpcHandler(_refuse, Cardinality.UNARY_UNARY, bytes, bytes)


_DRAINING = _Draining()


class _Mapping(dict[str, GrpcHandler]):
    """Paths to handlers; an unknown path gets a proper UNIMPLEMENTED response.

    grpclib answers an unknown path itself with a bare trailers-only response that
    has no ``content-type``, which grpclib's own client then reports as UNKNOWN
    ("Missing content-type header") instead of UNIMPLEMENTED.
    """

    def __init__(self, wire: str) -> None:
        super().__init__()
        self.wire = wire
        self.others: dict[str, GrpcHandler] = {}  # the other wire's mapping

    def get(self, key: str, default: Any = None) -> GrpcHandler:
        found = super().get(key)
        if found is not None:
            return found
        other = "application/grpc+json" if self.wire == PROTO else "application/grpc (protobuf)"

        async def unimplemented(stream: Stream[Any, Any]) -> None:
            hint = f" (this service serves {key} as {other})" if key in self.others else ""
            raise GRPCError(Status.UNIMPLEMENTED, f"unknown method {key}{hint}")

        return GrpcHandler(unimplemented, Cardinality.UNARY_UNARY, bytes, bytes)


class _Handler(_BaseHandler):
    """grpclib's connection handler, choosing codec and mapping per request."""

    def __init__(self, mappings: dict[str, dict[str, GrpcHandler]], standard: dict[str, GrpcHandler],
                 dispatch: Any) -> None:
        super().__init__(mappings[PROTO], CODECS[PROTO], None, dispatch)
        self._mappings = mappings
        self._standard = standard

    def accept(self, stream: Any, headers: Any, release_stream: Callable[[], Any]) -> None:
        wire = PROTO
        refusal: GRPCError | None = None
        standard = False
        timeout: float | None = None
        deadline: float | None = None
        path = "a call"
        for key, value in headers:
            if key == "content-type":
                if value.endswith("+json"):
                    wire = JSON
            elif key == "grpc-timeout":
                checked = _check_timeout(value)
                if isinstance(checked, GRPCError):
                    refusal = checked
                else:
                    timeout = checked
            elif key == ":path":
                path = value
                standard = value in self._standard
            if not (key.isascii() and value.isascii()):  # decoded as latin-1: see _Server
                refusal = _not_ascii(key)
                headers = [(k, v) for k, v in headers if k.isascii() and v.isascii()]
                break
        # a closing server still sees new calls on connections opened before: refuse
        # them (nothing runs) so the client can go to another node
        if self.closing:
            self.mapping = _DRAINING
        elif standard:
            self.mapping = self._standard
        else:
            self.mapping = self._mappings[wire]
        self.codec = _PROTOBUF if standard else CODECS[wire]
        if refusal is not None:  # grpclib would hang on some of these, or answer UNKNOWN
            headers = [(k, v) for k, v in headers if k != "grpc-timeout"]
            self.mapping = _Refusing(refusal)
        elif timeout is not None and not standard:
            # the call's Watchdog enforces it (see _call), not grpclib's timer: that one cuts shielded sections
            headers = [(k, v) for k, v in headers if k != "grpc-timeout"]
            deadline = self.loop.time() + timeout
        token = _DEADLINE.set(deadline)  # the call's task starts with a copy of it (None: no deadline of its own)
        try:
            release = _Release(release_stream)
            super().accept(stream, headers, release)
            task = getattr(self, "_tasks", _NO_TASKS).get(stream)  # grpclib 0.4's (see _CANCELS)
            if task is not None:
                task.set_name(path)  # a stop past its grace logs it (stop_all)
                task.add_done_callback(release.after)
        finally:
            _DEADLINE.reset(token)

    def cancel(self, stream: H2Stream) -> None:
        """The caller reset the stream: cancel its call (after a shielded section the handler is in)."""
        if not _CANCELS:
            return super().cancel(stream)
        task = self._tasks.pop(stream)
        cancel(task)
        self._cancelled.add(task)
        return None

    def close(self) -> None:
        """The connection is lost, or the server stops past its grace: cancel every call on it, each after a
        shielded section its handler is in (:meth:`Server.wait_closed` waits for them)."""
        if not _CANCELS:
            return super().close()
        for task in self._tasks.values():
            cancel(task)
        self._cancelled.update(self._tasks.values())
        self.closing = True
        return None


_NO_TASKS: dict[Any, asyncio.Task[None]] = {}


class _Release:
    """A stream's ``release_stream`` (grpclib's: the stream leaves the connection's streams and its buffered
    DATA is acknowledged), called by ``request_handler`` when it ends, or by :meth:`after` when the call's task
    ended without running (cancelled before its first step: a reset in the same read as the request), which
    grpclib leaves undone: the stream stayed registered and its DATA unacknowledged, until the connection's
    flow-control window was used up and no call on it got an answer. Called once either way."""

    __slots__ = ("done", "release")

    def __init__(self, release: Callable[[], Any]) -> None:
        self.release = release
        self.done = False

    def __call__(self) -> Any:
        self.done = True
        return self.release()

    def after(self, _task: asyncio.Task[None]) -> None:
        if not self.done:
            self.done = True
            self.release()


def _has_cancel_internals() -> bool:
    """Whether this grpclib cancels a call's task where :class:`_Handler` takes that over (see :data:`_CANCELS`)."""
    def names(func: Any) -> set[str]:
        code = getattr(func, "__code__", None)
        return set(code.co_names) if code is not None else set()

    return ({"_tasks", "_cancelled"} <= names(_BaseHandler.__init__)
            and {"_tasks", "cancel", "_cancelled"} <= names(_BaseHandler.cancel)
            and {"_tasks", "cancel", "_cancelled"} <= names(_BaseHandler.close)
            and "wrapper" in names(getattr(H2Stream, "__terminated__", None))
            and {"wrapper", "Wrapper"} <= names(request_handler))


_CANCELS = _has_cancel_internals()
"""Whether grpclib 0.4.x's internals are there that micro's cancellation of a call replaces: the handler's
tasks (``Handler._tasks``, ``_cancelled``, cancelled in ``Handler.cancel`` on a reset stream and
``Handler.close`` on a lost connection or a stopping server), and the per-stream ``wrapper`` that
``request_handler`` sets and a reset stream cancels too (detached by :func:`_call`). Without them a
reset stream, a lost connection and a stop cancel a call as grpclib does (``Task.cancel()``: a shielded
section is cut); the call's ``grpc-timeout`` is the Watchdog's either way."""

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("micro_grpc_deadline", default=None)
"""The deadline (event-loop time) of the call whose task is being made; the task keeps its copy."""

_NO_WATCH = contextlib.nullcontext()


def _closed() -> asyncio.CancelledError:
    """What a handler's reply meets on a stream the caller reset (or a lost connection closed) while the
    handler finished a shielded section: the call is cancelled there, its next wait, as it would be had the
    handler waited once more (grpclib would log the h2 error as an application error)."""
    return asyncio.CancelledError()


def _call(stream: Stream[Any, Any]) -> float | None:
    """The call's deadline, and its task detached from grpclib's own cancel (see :data:`_CANCELS`)."""
    if _CANCELS:
        stream._stream.wrapper = None  # a reset stream cancels the task in _Handler.cancel alone
    return _DEADLINE.get()


_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")  # the gRPC spec: at most 8 digits and a unit
_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_EXPIRED = 1e-3  # seconds: less than this left on arrival is no time to run anything


def _check_timeout(value: str) -> GRPCError | float:
    """The error to answer a call's ``grpc-timeout`` with, or its seconds if it is a usable deadline."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return GRPCError(Status.INVALID_ARGUMENT, f"malformed grpc-timeout header {value[:24]!r}: "
                         "send at most 8 digits and a unit (H, M, S, m, u or n)")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds < _EXPIRED:
        return GRPCError(Status.DEADLINE_EXCEEDED, f"the call's deadline ({value}) had passed when it arrived")
    return seconds


_PROTOBUF = GrpclibProtoCodec()


def _not_ascii(key: str) -> GRPCError:
    """The per-call answer to a header that is not ASCII (it used to reset the whole connection)."""
    log.debug("refused a call: header %r is not ASCII", key[:64])
    return GRPCError(Status.INVALID_ARGUMENT, f"metadata {key[:64]!r}: gRPC text metadata must be printable "
                     "ASCII (send other bytes base64-encoded under a key ending in -bin)")


class _Refusing(dict[str, GrpcHandler]):
    """The mapping of one call refused before it runs: every path answers ``error``."""

    def __init__(self, error: GRPCError) -> None:
        super().__init__()
        self.error = error

    def get(self, key: str, default: Any = None) -> GrpcHandler:
        async def refuse(stream: Stream[Any, Any]) -> None:
            raise self.error

        return GrpcHandler(refuse, Cardinality.UNARY_UNARY, bytes, bytes)


class _Protocol(H2Protocol):
    """grpclib's connection, counted against the service's :class:`~micro.connections.ConnectionLimit`:
    past the limit it is refused with a GOAWAY that says why, and it is closed when idle."""

    def __init__(self, server: _Server, handler: _Handler, config: Any, h2_config: Any) -> None:
        super().__init__(handler, config, h2_config)
        self._owner = server
        self._transport: asyncio.BaseTransport | None = None
        self._refused = False
        self._linger: asyncio.TimerHandle | None = None
        self._last_seen = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._last_seen = asyncio.get_running_loop().time()
        refusal = self._owner.connection_limit.admit(self)
        if refusal is None:
            super().connection_made(transport)
            return
        self._refused = True
        self.handler.close()
        conn = h2.connection.H2Connection(self.h2_config)
        conn.initiate_connection()
        conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=refusal.encode())
        tcp = cast(asyncio.Transport, transport)
        tcp.write(conn.data_to_send())
        # Closed at once, the socket answered the client's request (already on its way) with a reset, and
        # the client's kernel dropped the GOAWAY unread: the client could not tell "refused, nothing ran"
        # (try another node) from "lost mid-call". So: half-close, read and drop what comes, and close
        # when the client does (it closes on the GOAWAY) or after REFUSED_LINGER seconds. A descriptor each:
        # only max_lingering at once, past that closed at once.
        if not tcp.can_write_eof() or not self._owner.connection_limit.linger():
            transport.close()
            return
        tcp.write_eof()
        self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_seen = asyncio.get_running_loop().time()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._owner.connection_limit.lingered()
        self._owner.protocols.discard(self)
        self._owner.connection_limit.discard(self)
        self._transport = None
        if not self._refused:
            super().connection_lost(exc)

    def idle_since(self) -> float | None:
        handler = cast(_Handler, self.handler)
        if any(not t.done() for t in handler._tasks.values()):
            return None
        return self._last_seen

    def drop(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _Server(Server):
    def __init__(self, mappings: dict[str, dict[str, GrpcHandler]], standard: dict[str, GrpcHandler],
                 connection_limit: ConnectionLimit, config: Configuration) -> None:
        super().__init__([], codec=CODECS[PROTO], config=config)
        self.connection_limit = connection_limit
        # h2 decodes headers as grpclib asks (ASCII) and a non-ASCII byte raised inside the
        # connection's data_received, resetting every call on it. latin-1 decodes any byte;
        # _Handler.accept then refuses the one call whose headers are not ASCII.
        self._h2_config = h2.config.H2Configuration(
            client_side=False, header_encoding="latin-1", validate_inbound_headers=False,
            validate_outbound_headers=False, normalize_inbound_headers=False, normalize_outbound_headers=False)
        self._mappings = mappings
        self._standard = standard
        self.protocols: set[_Protocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = _Handler(self._mappings, self._standard, self.__dispatch__)
        self._handlers.add(handler)
        protocol = _Protocol(self, handler, self._config, self._h2_config)
        self.protocols.add(protocol)
        return protocol

    def drop_connections(self) -> None:
        """Close every client connection (Python 3.11's ``Server.close`` leaves them open)."""
        for protocol in list(self.protocols):
            transport = getattr(protocol, "connection", None)
            if transport is not None:
                transport.close()
            else:
                protocol.drop()  # refused, lingering until its client reads the GOAWAY
        self.protocols.clear()


async def _recv(stream: Stream[Any, Any], limit: int, where: str, budget: BodyBudget, timeout: float,
                decode: Callable[[bytes], Any], watchdog: Watchdog) -> Any:
    """Read one length-prefixed message and decode it, refusing it before reading when it is over
    ``limit`` or ``budget``; a body that does not arrive within ``timeout`` seconds ends the call
    (watched by the server's one deadline timer: no timer of its own per call)."""
    h2 = stream._stream
    try:
        with watchdog.watch(asyncio.get_running_loop().time() + timeout, where):
            meta = await _recv_data(h2, 5, where, "its 5-byte length prefix")
            if not meta:
                raise GRPCError(Status.INVALID_ARGUMENT, f"{where}: empty request")
            if meta[0]:
                raise GRPCError(Status.UNIMPLEMENTED, f"{where}: compressed messages are not supported")
            size = struct.unpack(">I", meta[1:])[0]
            if size > limit:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"{where}: request of {size} bytes is over the service's {limit}-byte limit",
                )
            connection = h2.connection
            budget.reserve(size, connection)
            try:
                return decode(await _recv_data(h2, size, where, f"its {size}-byte message"))
            finally:
                budget.release(size, connection)
    except Timeout:  # the watch's: the body did not arrive in time
        raise GRPCError(Status.DEADLINE_EXCEEDED, f"{where}: the request did not arrive within {timeout:g} s") \
            from None


async def _recv_data(h2: Any, size: int, where: str, what: str) -> bytes:
    try:
        data: bytes = await h2.recv_data(size)
    except AssertionError:  # grpclib's buffer, when the stream ends before `size` bytes came
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"{where}: truncated request: the stream ended inside {what}"
        ) from None
    return data


FILE_MARK = "// file: "
"""The line that starts each file in :meth:`GrpcServer.proto_text` (then the file's name)."""


class GrpcServer:
    """Serves a set of endpoints on one host:port. ``start()`` binds; ``stop()`` drains.

    Every port also serves ``grpc.health.v1.Health`` (:attr:`health`) and, unless
    ``reflection=False``, server reflection (v1 and v1alpha) with the derived
    ``.proto`` of the code-first endpoints.
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, reflection: bool = True,
                 max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
                 max_connection_buffered_bytes: int = DEFAULT_MAX_CONNECTION_BUFFERED_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT, admit: Callable[[], None] | None = None,
                 connection_limit: ConnectionLimit | None = None,
                 keepalive_time: float | None = DEFAULT_KEEPALIVE_TIME,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 shield_timeout: float = DEFAULT_SHIELD_TIMEOUT) -> None:
        self.max_message_size = max_message_size
        self.shield_timeout = shield_timeout
        """Seconds ``stop()`` waits, once it has cancelled the calls left after its grace, for handlers inside a
        shielded section to leave it; then they are cut with ``Task.cancel()`` (logged)."""
        self.connection_limit = connection_limit if connection_limit is not None else ConnectionLimit("server")
        """The open connections: bounded, closed when idle (see :class:`micro.connections.ConnectionLimit`)."""
        self.keepalive_time = keepalive_time
        """Seconds between HTTP/2 pings on a connection with calls in flight (``None``: no pings)."""
        self.keepalive_timeout = keepalive_timeout
        """Seconds a ping may go unanswered before the connection is closed (a half-open peer)."""
        self.budget = BodyBudget("server", max_buffered_bytes, max_connection_buffered_bytes)
        """The request bytes held while bodies arrive (see :class:`micro.limits.BodyBudget`)."""
        self.body_timeout = body_timeout
        self.watchdog = Watchdog()  # the calls' deadlines and the body timeouts
        self.admit = admit
        """Called before a unary call's body is read: raises ``ResourceExhausted`` when overloaded."""
        proto, json = _Mapping(PROTO), _Mapping(JSON)
        proto.others, json.others = json, proto
        self._mappings: dict[str, dict[str, GrpcHandler]] = {PROTO: proto, JSON: json}
        self.health = Health()
        self.reflection = Reflection() if reflection else None
        self._standard: dict[str, GrpcHandler] = dict(self.health.__mapping__())
        if self.reflection is not None:
            self._standard.update(self.reflection.__mapping__())
        self._methods: dict[str, list[Method]] = {}  # service -> its code-first methods
        self._grpc_services: set[str] = set()  # as gRPC clients name them (reflection lists them)
        self._proto_first: dict[str, list[ProtoMethod]] = {}  # package -> its proto-first methods
        self._packages: dict[str, dict[str, None]] = {}  # service -> the packages of its proto-first endpoints
        self._text: tuple[tuple[str, int, int], str] | None = None
        self._server: _Server | None = None
        self._background: BackgroundTasks | None = None
        self.port = 0
        self.host = ""

    def add(self, ep: Endpoint) -> None:
        """Serve ``ep`` (also after start: the mapping is read per request)."""
        card = Cardinality.UNARY_STREAM if ep.streaming else Cardinality.UNARY_UNARY
        grpc_service, method = ep.path[1:].split("/", 1)
        handler = grpc_service.rsplit(".", 1)[-1]
        paths = [ep.path]
        req, rsp = ep.request, ep.response
        if isinstance(req, StructCodec) and isinstance(rsp, StructCodec) and req.layout and rsp.layout:
            self._methods.setdefault(ep.service, []).append(
                Method(handler, method, req.layout, rsp.layout, ep.streaming, ep.description))
            # the derived .proto's package: service `task-api` is called at /task_api.Task/... by gRPC clients
            grpc_service = f"{package_name(ep.service)}.{handler}"
            paths.append(f"/{grpc_service}/{method}")
        elif isinstance(req, ProtoCodec) and isinstance(rsp, ProtoCodec):
            self._proto_first.setdefault(req.package, []).append(
                ProtoMethod(handler, method, req.type, rsp.type, ep.streaming))
            self._packages.setdefault(ep.service, {})[req.package] = None
        for wire in ep.wires:
            func = self._streaming(ep, wire) if ep.streaming else self._unary(ep, wire)
            for path in dict.fromkeys(paths):
                self._mappings[wire][path] = GrpcHandler(func, card, bytes, bytes)
        self.health.add(grpc_service, ep.service)
        self._grpc_services.add(grpc_service)
        if self.reflection is not None:
            self.reflection.update(self._grpc_services, [*well_known_files(), *self._files()])

    def _files(self) -> list[bytes]:
        """The descriptors reflection serves: derived for code-first endpoints, rebuilt for proto-first ones."""
        files = {f.name: f for f in self.proto_files().values()}
        for package, methods in self._proto_first.items():
            try:
                fdp = betterproto_file(package, methods)
            except NoDescriptor as exc:  # listed, but reflection cannot describe it
                log.info("reflection: no descriptor for package %s: %s", package, exc)
                continue
            if fdp.name in files:  # a code-first service named like the package
                fdp.name = fdp.name.removesuffix(".proto") + ".messages.proto"
            files[fdp.name] = fdp
        return [f.SerializeToString() for f in files.values()]

    def proto_files(self) -> dict[str, Any]:
        """The ``FileDescriptorProto`` of each service's code-first endpoints, by service name."""
        return {name: service_file(name, methods) for name, methods in self._methods.items()}

    def proto_text(self, service: str) -> str | None:
        """The ``.proto`` of a service (what ``micro describe --proto`` prints): the one derived for its
        code-first endpoints, and the files of its proto-first ones as rebuilt from their betterproto2
        classes; each file starts with a ``// file: NAME`` line (``micro describe --proto --out`` splits them)."""
        methods = self._methods.get(service, [])
        packages = list(self._packages.get(service, ()))
        key = (service, len(methods), sum(len(self._proto_first[p]) for p in packages))
        if self._text is None or self._text[0] != key:
            files: list[tuple[str, str]] = []
            if methods:
                comments = {f"{m.handler}.{m.name}": m.description for m in methods}
                fdp = service_file(service, methods)
                files.append((fdp.name, to_text(fdp, comments)))
            for package in packages:
                try:
                    fdp = betterproto_file(package, self._proto_first[package])
                except NoDescriptor:  # listed by describe from the JSON Schemas instead
                    continue
                files.append((fdp.name, to_text(fdp)))
            text = "\n".join(f"{FILE_MARK}{n}\n{t}" for n, t in files)
            self._text = (key, text)
        return self._text[1] or None

    def _unary(self, ep: Endpoint, wire: str) -> Callable[[Stream[Any, Any]], Any]:
        limit = self.max_message_size

        async def serve(stream: Stream[Any, Any]) -> None:
            deadline = _call(stream)
            try:
                with _NO_WATCH if deadline is None else self.watchdog.watch(deadline, ep.where):
                    if self.admit is not None:
                        self.admit()  # the overload check, before the body is read
                    body = await _recv(stream, limit, ep.where, self.budget, self.body_timeout,
                                       lambda data: ep.request.decode(data, wire, ep.where), self.watchdog)
                    result = await ep.handle(body, _metadata(stream), deadline, GRPC)
                    reply = ep.response.encode(result, wire)
                    if len(reply) > limit:
                        raise GRPCError(
                            Status.RESOURCE_EXHAUSTED,
                            f"{ep.where}: response of {len(reply)} bytes is over the {limit}-byte limit",
                        )
                    try:
                        await stream.send_message(reply)
                    except h2.exceptions.StreamClosedError:
                        raise _closed() from None
            except Error as err:  # a Timeout too: the call's deadline passed (DEADLINE_EXCEEDED)
                raise GRPCError(err.status, err.message) from None

        return serve

    def _streaming(self, ep: Endpoint, wire: str) -> Callable[[Stream[Any, Any]], Any]:
        limit = self.max_message_size

        async def serve(stream: Stream[Any, Any]) -> None:
            deadline = _call(stream)
            try:
                with _NO_WATCH if deadline is None else self.watchdog.watch(deadline, ep.where):
                    body = await _recv(stream, limit, ep.where, self.budget, self.body_timeout,
                                       lambda data: ep.request.decode(data, wire, ep.where), self.watchdog)
                    items = await ep.handle(body, _metadata(stream), deadline, GRPC)
                    try:
                        sent = 0
                        async for item in items:
                            reply = ep.response.encode(item, wire)
                            if len(reply) > limit:  # what went before was delivered; the stream ends here
                                raise ResourceExhausted(
                                    f"{ep.where}: reply {sent + 1} of {len(reply)} bytes is over the "
                                    f"{limit}-byte limit"
                                )
                            try:
                                await stream.send_message(reply)
                            except h2.exceptions.StreamClosedError:
                                raise _closed() from None
                            sent += 1
                    finally:
                        await aclose(items)  # the handler's generator runs its cleanup now
            except Error as err:  # a Timeout too: the call's deadline passed (DEADLINE_EXCEEDED)
                raise GRPCError(err.status, err.message) from None

        return serve

    async def start(self, host: str, port: int, *, ssl: Any = None) -> None:
        quiet_accept_errors()
        config = Configuration(_keepalive_time=self.keepalive_time, _keepalive_timeout=self.keepalive_timeout)
        self._server = _Server(self._mappings, self._standard, self.connection_limit, config)
        await self._server.start(host, port, ssl=ssl, reuse_address=True)
        sock = self._server._server.sockets[0]  # type: ignore[union-attr]
        self.host, self.port = sock.getsockname()[:2]
        background = BackgroundTasks("grpc server", log)
        tg = await background.start()
        self._background = background
        tg.start_soon(self.connection_limit.sweep)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish within ``grace``, cancel the rest (each after a
        section its handler shields, which this waits for)."""
        server, self._server = self._server, None
        if server is None:
            return
        background, self._background = self._background, None
        if background is not None:
            await background.aclose()
        self.health.close()  # NOT_SERVING, and open Watch streams end: they are not in-flight work
        assert server._server is not None
        server._server.close()  # no new connections
        for h in server._handlers:
            h.closing = True  # no new calls on the open ones
        pending = [t for h in server._handlers for t in h._tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        server.close()  # cancels the calls left, each after a section its handler shields (_Handler.close)
        left = {t: t.get_name() for h in server._handlers for t in h._cancelled if not t.done()}  # its path
        if left and await stop_all(left, self.shield_timeout, "gRPC server"):
            server.drop_connections()  # a handler that went on after Task.cancel(): stop without it (logged)
            return
        await server.wait_closed()
        server.drop_connections()


def _metadata(stream: Stream[Any, Any]) -> dict[str, str]:
    md = stream.metadata
    if not md:
        return {}
    return {k: v for k, v in md.items() if isinstance(v, str)}

