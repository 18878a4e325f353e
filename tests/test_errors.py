"""Every error row of the service runtime, on the in-process path and over gRPC.

malformed request -> BadRequest (INVALID_ARGUMENT, naming the field); unknown service
-> ServiceNotFound (NOT_FOUND); unknown endpoint -> EndpointNotFound (UNIMPLEMENTED);
timeout -> Timeout (DEADLINE_EXCEEDED); no reachable node -> Unavailable; handler
exception -> Internal with nothing of the exception on the wire (logged on the server);
oversize message -> ResourceExhausted. Raw grpclib calls check the statuses on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from _proto.greeter import GreeterStub, HelloReply, HelloRequest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

import micro
from micro import errors
from micro.errors import (
    BadRequest,
    EndpointNotFound,
    Error,
    Internal,
    NotFound,
    ResourceExhausted,
    ServiceNotFound,
    Timeout,
    Unavailable,
)
from micro.registry.memory import MemoryRegistry

PATHS = ["in-process", "network"]
SECRET = "db-password=hunter2"


class Req(msgspec.Struct):
    user_id: str
    pad: str = ""
    size: int = 0


class Rsp(msgspec.Struct):
    user_id: str
    blob: str = ""


class Tasks:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.growing_closed = False

    async def Get(self, req: Req) -> Rsp:
        return Rsp(req.user_id, "x" * req.size)

    async def Boom(self, req: Req) -> Rsp:
        raise ValueError(f"cannot connect: {SECRET}")

    async def BoomLater(self, req: Req) -> AsyncIterator[Rsp]:
        yield Rsp(req.user_id)
        raise RuntimeError(f"stream broke: {SECRET}")

    async def Growing(self, req: Req) -> AsyncIterator[Rsp]:
        """A small reply, then one of ``size`` bytes, then another small one."""
        try:
            yield Rsp(req.user_id)
            yield Rsp(req.user_id, "x" * req.size)
            yield Rsp(req.user_id)
        finally:
            self.growing_closed = True

    async def Missing(self, req: Req) -> Rsp:
        raise NotFound(f"no task for {req.user_id!r}")

    async def WrongType(self, req: Req) -> Rsp:
        return 42  # type: ignore[return-value]

    async def Slow(self, req: Req) -> Rsp:
        self.started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        if req.name == "boom":
            raise KeyError(SECRET)
        return HelloReply(message=f"hi {req.name}")


class System:
    def __init__(self, home: micro.Runtime, away: micro.Runtime, service: micro.Service,
                 tasks: Tasks) -> None:
        self.home, self.away, self.service, self.tasks = home, away, service, tasks

    def client(self, path: str) -> micro.Client:
        client: micro.Client = (self.home if path == "in-process" else self.away).client
        return client

    def channel(self, subtype: str = "json") -> Channel:
        host, _, port = self.service.address.rpartition(":")
        if subtype == "json":
            return Channel(host, int(port), codec=_JsonBytes())
        return Channel(host, int(port))  # grpclib's protobuf codec


class _JsonBytes(CodecBase):
    """grpclib codec that passes bytes through, for raw application/grpc+json calls."""

    __content_subtype__ = "json"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def raw_call(channel: Channel, path: str, data: bytes) -> bytes:
    try:
        async with channel.request(path, Cardinality.UNARY_UNARY, bytes, bytes) as stream:
            await stream.send_message(data, end=True)
            reply: bytes = await stream.recv_message()  # type: ignore[assignment]
            return reply
    finally:
        channel.close()


@pytest.fixture
async def system() -> AsyncIterator[System]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        tasks = Tasks()
        service = micro.Service("task", runtime=home, max_message_size=64 * 1024)
        service.handle(tasks)
        service.handle(Greeter())
        async with service:
            yield System(home, away, service, tasks)


# -- the mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.BadRequest, Status.INVALID_ARGUMENT),
        (errors.NotFound, Status.NOT_FOUND),
        (errors.EndpointNotFound, Status.UNIMPLEMENTED),
        (errors.Conflict, Status.ABORTED),
        (errors.Timeout, Status.DEADLINE_EXCEEDED),
        (errors.Unavailable, Status.UNAVAILABLE),
        (errors.ResourceExhausted, Status.RESOURCE_EXHAUSTED),
        (errors.Unauthenticated, Status.UNAUTHENTICATED),
        (errors.PermissionDenied, Status.PERMISSION_DENIED),
        (errors.Cancelled, Status.CANCELLED),
        (errors.Internal, Status.INTERNAL),
        (errors.Unknown, Status.UNKNOWN),
    ],
)
def test_each_error_maps_to_its_status_and_back(cls: type[Error], status: Status) -> None:
    assert cls.status is status
    back = Error.from_status(status, "what happened")
    assert type(back) is cls
    assert back.message == "what happened"
    assert back.code == status.name


def test_unmapped_status_and_empty_message() -> None:
    err = Error.from_status(Status.DATA_LOSS, None)
    assert type(err) is errors.Unknown
    assert err.message == "DATA_LOSS"


def test_the_tree() -> None:
    assert issubclass(ServiceNotFound, NotFound) and issubclass(ServiceNotFound, errors.RegistryError)
    assert ServiceNotFound.status is Status.NOT_FOUND
    assert issubclass(EndpointNotFound, NotFound)
    assert issubclass(errors.RecordNotFound, errors.StoreError)
    assert issubclass(errors.VersionConflict, errors.Conflict) and issubclass(errors.VersionConflict, errors.StoreError)
    assert errors.VersionConflict.status is Status.ABORTED
    lost = errors.VersionConflict("lost", store="memory://", key="k", expected=3, current=4)
    assert (lost.store, lost.key, lost.expected, lost.current, lost.message) == ("memory://", "k", 3, 4, "lost")
    assert issubclass(errors.ConfigError, errors.UsageError)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.MicroError), name
    assert str(errors.RecordNotFound("no key 'a'")) == "no key 'a'"


# -- BadRequest -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        ({"user_id": 5}, "`$.user_id`"),
        ('{"user_id": 5}', "`$.user_id`"),
        ({"user_id": "a", "size": "big"}, "`$.size`"),
        ({}, "missing required field `user_id`"),
        ('{"user_id": ', "malformed JSON"),
        ("[1, 2]", "Expected `object`"),
    ],
)
async def test_malformed_request_is_bad_request(system: System, path: str, request_: Any,
                                                needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        await system.client(path).call("task", "Tasks.Get", request_)
    assert needle in info.value.message
    assert info.value.code == "INVALID_ARGUMENT"
    assert "task Tasks.Get" in info.value.message  # where it failed


@pytest.mark.parametrize("path", PATHS)
async def test_malformed_proto_json_is_bad_request(system: System, path: str) -> None:
    with pytest.raises(BadRequest, match=r"at `\$\.name`"):
        await system.client(path).call("task", "Greeter.SayHello", {"name": ["not", "a", "string"]})


async def test_malformed_request_on_the_wire_is_invalid_argument(system: System) -> None:
    with pytest.raises(GRPCError) as info:
        await raw_call(system.channel(), "/task.Tasks/Get", b'{"user_id": 5}')
    assert info.value.status is Status.INVALID_ARGUMENT
    assert info.value.message is not None and "$.user_id" in info.value.message


# -- NotFound ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_unknown_service_is_service_not_found(system: System, path: str) -> None:
    with pytest.raises(ServiceNotFound) as info:
        await system.client(path).call("nope", "Nope.Get", {})
    assert isinstance(info.value, NotFound)
    assert info.value.code == "NOT_FOUND"
    assert "'nope'" in info.value.message
    with pytest.raises(ServiceNotFound):
        [x async for x in system.client(path).stream("nope", "Nope.List", {})]


@pytest.mark.parametrize("path", PATHS)
async def test_unknown_endpoint_is_endpoint_not_found(system: System, path: str) -> None:
    with pytest.raises(EndpointNotFound) as info:
        await system.client(path).call("task", "Tasks.Nope", {"user_id": "a"})
    assert info.value.code == "UNIMPLEMENTED"
    assert "Tasks.Get" in info.value.message  # it lists what there is


async def test_unknown_path_on_the_wire_is_unimplemented(system: System) -> None:
    for path in ("/task.Tasks/Nope", "/nope.Nope/Get"):
        with pytest.raises(GRPCError) as info:
            await raw_call(system.channel(), path, b"{}")
        assert info.value.status is Status.UNIMPLEMENTED
    # a code-first endpoint speaks protobuf too, by the .proto derived from its types: field 1 of
    # HelloRequest lands in Req.user_id, and Rsp.user_id comes back as field 1 of HelloReply
    channel = system.channel("proto")
    try:
        async with channel.request("/task.Tasks/Get", Cardinality.UNARY_UNARY, HelloRequest, HelloReply) as stream:
            await stream.send_message(HelloRequest(name="x"), end=True)
            reply = await stream.recv_message()
        assert reply is not None and reply.message == "x"
    finally:
        channel.close()


async def test_a_stale_record_naming_a_gone_endpoint_is_endpoint_not_found(system: System) -> None:
    """The registry says the node serves an endpoint it does not (an older record)."""
    record = system.service.record
    extra = msgspec.structs.replace(record.endpoints[0], name="Tasks.Gone", path="/task.Tasks/Gone")
    record.endpoints.append(extra)
    registry = system.home.registry
    await registry.register(record, ttl=60)
    await anyio.wait_all_tasks_blocked()
    with pytest.raises(EndpointNotFound) as info:
        await system.client("network").call("task", "Tasks.Gone", {"user_id": "a"})
    assert info.value.code == "UNIMPLEMENTED"
    assert "/task.Tasks/Gone" in info.value.message


# -- Timeout, Unavailable ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_timeout_is_deadline_exceeded(system: System, path: str) -> None:
    with anyio.fail_after(10), pytest.raises(Timeout) as info:
        await system.client(path).call("task", "Tasks.Slow", {"user_id": "a"}, timeout=0.2)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert system.tasks.started.is_set()


@pytest.mark.parametrize("path", PATHS)
async def test_streams_time_out_too(system: System, path: str) -> None:
    class Stalls:
        async def Feed(self, req: Req) -> AsyncIterator[Rsp]:
            yield Rsp(req.user_id)
            await anyio.sleep_forever()

    system.service.handle(Stalls())
    await anyio.wait_all_tasks_blocked()  # the heartbeat re-registers with the new endpoint
    got: list[Any] = []
    with anyio.fail_after(10), pytest.raises(Timeout):
        async for item in system.client(path).stream("task", "Stalls.Feed", {"user_id": "a"},
                                                    timeout=0.3):
            got.append(item)
    assert got == [{"user_id": "a", "blob": ""}]


async def test_no_reachable_node_is_unavailable() -> None:
    registry = MemoryRegistry()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        service = micro.Service("task", runtime=rt)
        service.handle(Tasks())
        record = service.record
        record.nodes = [micro.registry.Node(id="gone", address=f"127.0.0.1:{port}")]
        await registry.register(record, ttl=60)
        with pytest.raises(Unavailable) as info:
            await rt.client.call("task", "Tasks.Get", {"user_id": "a"})
    assert info.value.code == "UNAVAILABLE"
    assert f"127.0.0.1:{port}" in info.value.message


# -- Internal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_handler_exception_is_internal_without_details(
    system: System, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="micro")
    with pytest.raises(Internal) as info:
        await system.client(path).call("task", "Tasks.Boom", {"user_id": "a"})
    message = info.value.message
    assert info.value.code == "INTERNAL"
    assert "task Tasks.Boom" in message
    for leak in (SECRET, "hunter2", "ValueError", "Traceback", "cannot connect"):
        assert leak not in message
    # the details are in the service's log
    logged = [r for r in caplog.records if r.name.startswith("micro") and r.exc_info]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and SECRET in str(logged[0].exc_info[1])
    assert "Tasks.Boom" in logged[0].getMessage()


@pytest.mark.parametrize("path", PATHS)
async def test_exception_mid_stream_is_internal_without_details(
    system: System, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="micro")
    got: list[Any] = []
    with pytest.raises(Internal) as info:
        async for item in system.client(path).stream("task", "Tasks.BoomLater", {"user_id": "a"}):
            got.append(item)
    assert got == [{"user_id": "a", "blob": ""}]
    assert SECRET not in info.value.message and "RuntimeError" not in info.value.message
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


async def test_handler_exception_on_the_wire(system: System, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="micro")
    with pytest.raises(GRPCError) as info:
        await raw_call(system.channel(), "/task.Tasks/Boom", b'{"user_id": "a"}')
    assert info.value.status is Status.INTERNAL
    assert info.value.message is not None and SECRET not in info.value.message
    assert info.value.details is None
    # protobuf clients (betterproto2's own grpclib stub) see the same
    channel = system.channel("proto")
    try:
        with pytest.raises(GRPCError) as info:
            await GreeterStub(channel).say_hello(HelloRequest(name="boom"))
        assert info.value.status is Status.INTERNAL
        assert info.value.message is not None and SECRET not in info.value.message
        assert (await GreeterStub(channel).say_hello(HelloRequest(name="ann"))).message == "hi ann"
    finally:
        channel.close()


@pytest.mark.parametrize("path", PATHS)
async def test_handler_returning_the_wrong_type_is_internal(system: System, path: str) -> None:
    with pytest.raises(Internal, match="returned int, not Rsp"):
        await system.client(path).call("task", "Tasks.WrongType", {"user_id": "a"})


@pytest.mark.parametrize("path", PATHS)
async def test_micro_errors_raised_by_a_handler_keep_their_class_and_message(
    system: System, path: str
) -> None:
    with pytest.raises(NotFound) as info:
        await system.client(path).call("task", "Tasks.Missing", {"user_id": "zed"})
    assert type(info.value) is NotFound
    assert info.value.message == "no task for 'zed'"


# -- ResourceExhausted ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [70 * 1024, 2 * 1024 * 1024])  # under and over the h2 window
async def test_oversize_request_is_resource_exhausted(system: System, size: int) -> None:
    with anyio.fail_after(10), pytest.raises(ResourceExhausted) as info:
        await system.client("network").call("task", "Tasks.Get", {"user_id": "a", "pad": "x" * size})
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "65536-byte limit" in info.value.message
    # the service is fine afterwards
    assert (await system.client("network").call("task", "Tasks.Get", {"user_id": "b"}))["user_id"] == "b"


async def test_oversize_response_is_resource_exhausted(system: System) -> None:
    with pytest.raises(ResourceExhausted, match="response of"):
        await system.client("network").call("task", "Tasks.Get", {"user_id": "a", "size": 100_000})


async def test_oversize_reply_mid_stream_is_resource_exhausted(system: System) -> None:
    got: list[Any] = []
    with anyio.fail_after(10), pytest.raises(ResourceExhausted) as info:
        async for item in system.client("network").stream("task", "Tasks.Growing",
                                                           {"user_id": "a", "size": 100_000}):
            got.append(item)
    assert got == [{"user_id": "a", "blob": ""}]  # what came before the oversize reply arrived
    size = len(msgspec.json.encode(Rsp("a", "x" * 100_000)))
    assert info.value.message == f"task Tasks.Growing: reply 2 of {size} bytes is over the 65536-byte limit"
    assert system.tasks.growing_closed  # the handler's generator was closed, not left suspended
    replies = [r async for r in system.client("network").stream("task", "Tasks.Growing", {"user_id": "b"})]
    assert len(replies) == 3  # under the limit every reply goes out


async def test_oversize_request_on_the_wire(system: System) -> None:
    with pytest.raises(GRPCError) as info:
        await raw_call(system.channel(), "/task.Tasks/Get",
                       msgspec.json.encode({"user_id": "a", "pad": "x" * 100_000}))
    assert info.value.status is Status.RESOURCE_EXHAUSTED


async def test_the_client_refuses_to_send_over_its_own_limit() -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        service = micro.Service("task", runtime=home)
        service.handle(Tasks())
        async with service:
            away.client.max_message_size = 1000
            with pytest.raises(ResourceExhausted, match="1000-byte limit"):
                await away.client.call("task", "Tasks.Get", {"user_id": "a", "pad": "x" * 2000})


# -- hostile grpc-timeout headers (raw HTTP/2: no gRPC client sends these) -----------------------


async def _raw_h2_call(address: str, path: str, timeout_header: str) -> dict[str, str]:
    """One call with ``grpc-timeout: timeout_header``; the response's headers and trailers, merged."""
    import h2.config
    import h2.connection
    import h2.events

    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", host),
                            ("content-type", "application/grpc+json"), ("te", "trailers"),
                            ("grpc-timeout", timeout_header)])
    body = b'{"user_id": "a"}'
    conn.send_data(sid, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
    writer.write(conn.data_to_send())
    got: dict[str, str] = {}
    try:
        with anyio.fail_after(10):  # before the fix a 400-digit timeout got no answer at all
            while True:
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        got.update(dict(ev.headers))
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        return got
                writer.write(conn.data_to_send())
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("header", "status", "needle"),
    [
        ("9" * 400 + "S", "3", "malformed grpc-timeout header"),  # grpclib overflowed and never answered
        ("-5S", "3", "at most 8 digits and a unit"),
        ("12X", "3", "malformed grpc-timeout header"),
        ("0n", "4", "had passed when it arrived"),  # grpclib answered UNKNOWN "Internal Server Error"
        ("999u", "4", "had passed when it arrived"),
        ("99999999H", "0", ""),  # the longest valid one runs
    ],
)
async def test_hostile_grpc_timeout_headers_get_a_clear_status(system: System, header: str, status: str,
                                                               needle: str) -> None:
    got = await _raw_h2_call(system.service.address, "/task.Tasks/Get", header)
    assert got.get("grpc-status") == status, got
    assert needle in got.get("grpc-message", "")
    # the service is fine afterwards
    assert (await system.client("network").call("task", "Tasks.Get", {"user_id": "b"}))["user_id"] == "b"
