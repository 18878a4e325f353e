"""The client: one call path whether the service runs in this Runtime or in another process.

Runtimes share one MemoryRegistry: the service lives in ``home``; ``home.client``
takes the in-process fast path, and the other runtimes' clients the network path,
over gRPC or over micro's native wire (``transport=``). Most tests run on all three
(``path`` parameter) and must see the same values and the same errors; tests of the
network path alone run on both wires (``wire`` parameter).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest, Person, Tone

import micro
from micro import context
from micro.client import Client
from micro.client.native import NativePool
from micro.client.pool import NodePool
from micro.errors import BadRequest, Timeout, Unavailable
from micro.middleware import Next, Request
from micro.registry import Event, Registry, Watcher
from micro.registry.memory import MemoryRegistry

WIRES = ["grpc", "native"]
PATHS = ["in-process", *WIRES]


class Req(msgspec.Struct):
    user_id: str
    n: int = 0


class Item(msgspec.Struct):
    id: str
    labels: dict[int, str] = {}


class Rsp(msgspec.Struct):
    user_id: str
    items: list[Item]
    total: int


class Seen(msgspec.Struct):
    remaining: float | None = None
    deadline: float | None = None
    metadata: dict[str, str] = {}
    inner: Seen | None = None


class Users:
    """A code-first handler."""

    def __init__(self) -> None:
        self.calls = 0

    async def Get(self, req: Req) -> Rsp:
        """One user's items."""
        self.calls += 1
        items = [Item(f"{req.user_id}-{i}", {i: "x"}) for i in range(req.n)]
        return Rsp(req.user_id, items, len(items))

    async def List(self, req: Req) -> AsyncIterator[Item]:
        """Stream a user's items."""
        for i in range(req.n):
            yield Item(f"{req.user_id}-{i}", {i: "y"})

    async def Context(self, req: Req) -> Seen:
        """What the handler sees of its call."""
        return Seen(context.time_remaining(), context.deadline(), dict(context.metadata()))


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        sender = req.sender.name if req.sender else "nobody"
        return HelloReply(message=f"hello {req.name} from {sender} ({req.tone.name})",
                          index=req.times)

    async def SayMany(self, req: HelloRequest) -> AsyncIterator[HelloReply]:
        for i in range(req.times):
            yield HelloReply(message=f"hello {req.name}", index=i)


def memory_runtime(registry: Registry, **kwargs: Any) -> micro.Runtime:
    return micro.Runtime(registry=registry, store="memory://", broker="memory://", **kwargs)


class Pair:
    def __init__(self, runtimes: dict[str, micro.Runtime], registry: MemoryRegistry) -> None:
        self.runtimes, self.registry = runtimes, registry

    def client(self, path: str) -> Client:
        client: Client = self.runtimes[path].client
        return client


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry, transport="grpc") as grpc, \
            memory_runtime(registry, transport="native") as native:
        service = micro.Service("users", runtime=home)
        service.handle(Users())
        service.handle(Greeter())
        async with service:
            yield Pair({"in-process": home, "grpc": grpc, "native": native}, registry)


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_dict_in_dict_out(pair: Pair, path: str) -> None:
    got = await pair.client(path).call("users", "Users.Get", {"user_id": "alice", "n": 2})
    assert got == {"user_id": "alice", "total": 2,
                   "items": [{"id": "alice-0", "labels": {"0": "x"}},
                             {"id": "alice-1", "labels": {"1": "x"}}]}


@pytest.mark.parametrize("path", PATHS)
async def test_typed_in_typed_out(pair: Pair, path: str) -> None:
    got = await pair.client(path).call("users", "Users.Get", Req("bob", 1), response_type=Rsp)
    assert got == Rsp("bob", [Item("bob-0", {0: "x"})], 1)


class Loose(msgspec.Struct):
    user_id: Any
    n: int = 1


@pytest.mark.parametrize("path", ["grpc", "native"])
async def test_a_struct_request_that_cannot_be_encoded_is_a_bad_request(pair: Pair, path: str) -> None:
    bodies = [(Loose(object()), "unsupported"), (Loose("\ud800"), "surrogate"), (Req("\ud800", 1), "surrogate")]
    for body, why in bodies:
        with pytest.raises(BadRequest, match=r"users Users.Get: request is not JSON-serialisable") as err:
            await pair.client(path).call("users", "Users.Get", body, timeout=5)
        assert why in str(err.value)


async def test_both_paths_return_the_same_values(pair: Pair) -> None:
    class MyRsp(msgspec.Struct):  # the caller's own type for the response
        total: int
        user_id: str

    cases: list[tuple[str, Any, Any]] = [
        ("Users.Get", {"user_id": "a", "n": 3}, None),
        ("Users.Get", '{"user_id": "a", "n": 1}', None),
        ("Users.Get", b'{"user_id": "a"}', None),
        ("Users.Get", Req("a", 2), None),
        ("Users.Get", Req("a", 2), Rsp),
        ("Users.Get", {"user_id": "a", "n": 2}, MyRsp),
        ("Greeter.SayHello", {"name": "ann", "tone": "TONE_WARM", "sender": {"name": "bo"}}, None),
        ("Greeter.SayHello", HelloRequest(name="ann", times=3), HelloReply),
        ("Greeter.SayHello", HelloRequest(name="ann", tone=Tone.FORMAL), None),
        ("Greeter.SayHello", {"name": "ann"}, HelloReply),
        ("Greeter.SayHello", None, None),
    ]
    for endpoint, request, response_type in cases:
        here = await pair.client("in-process").call("users", endpoint, request,
                                                    response_type=response_type)
        for wire in WIRES:
            there = await pair.client(wire).call("users", endpoint, request, response_type=response_type)
            assert here == there, (wire, endpoint, request, response_type)
            assert type(here) is type(there)
        if response_type is not None:
            assert isinstance(here, response_type)


@pytest.mark.parametrize("path", PATHS)
async def test_a_raw_reply_is_the_json_the_endpoint_encoded(pair: Pair, path: str) -> None:
    # what the HTTP gateway asks for: the reply's JSON as the wire carried it, never decoded
    client = pair.client(path)
    raw = await client.call("users", "Users.Get", {"user_id": "ann", "n": 2}, response_type=msgspec.Raw)
    assert isinstance(raw, msgspec.Raw)
    typed = await client.call("users", "Users.Get", {"user_id": "ann", "n": 2}, response_type=Rsp)
    assert bytes(raw) == msgspec.json.encode(typed)
    hello = await client.call("users", "Greeter.SayHello", HelloRequest(name="ann", times=2),
                              response_type=msgspec.Raw)  # a proto-first endpoint: its JSON, not protobuf
    assert msgspec.json.decode(hello) == {"message": "hello ann from nobody (UNSPECIFIED)", "index": 2}
    items = [bytes(i) async for i in client.stream("users", "Users.List", {"user_id": "c", "n": 2},
                                                     response_type=msgspec.Raw)]
    assert items == [b'{"id":"c-0","labels":{"0":"y"}}', b'{"id":"c-1","labels":{"1":"y"}}']


@pytest.mark.parametrize("path", PATHS)
async def test_proto_endpoint_typed_and_dict(pair: Pair, path: str) -> None:
    client = pair.client(path)
    typed = await client.call("users", "Greeter.SayHello",
                              HelloRequest(name="ann", sender=Person(name="bo"), tone=Tone.WARM),
                              response_type=HelloReply)
    assert typed == HelloReply(message="hello ann from bo (WARM)")
    as_dict = await client.call("users", "Greeter.SayHello", {"name": "ann", "times": 2})
    assert as_dict == {"message": "hello ann from nobody (UNSPECIFIED)", "index": 2}


@pytest.mark.parametrize("path", PATHS)
async def test_stream(pair: Pair, path: str) -> None:
    client = pair.client(path)
    dicts = [i async for i in client.stream("users", "Users.List", {"user_id": "c", "n": 3})]
    assert dicts == [{"id": f"c-{i}", "labels": {str(i): "y"}} for i in range(3)]
    typed = [i async for i in client.stream("users", "Users.List", Req("c", 2), response_type=Item)]
    assert typed == [Item("c-0", {0: "y"}), Item("c-1", {1: "y"})]
    replies = [r async for r in client.stream("users", "Greeter.SayMany",
                                              HelloRequest(name="d", times=3),
                                              response_type=HelloReply)]
    assert [r.index for r in replies] == [0, 1, 2]
    assert [r async for r in client.stream("users", "Users.List", {"user_id": "c"})] == []


@pytest.mark.parametrize("path", PATHS)
async def test_stream_and_call_are_not_interchangeable(pair: Pair, path: str) -> None:
    client = pair.client(path)
    with pytest.raises(BadRequest, match=r"use client\.stream"):
        await client.call("users", "Users.List", {"user_id": "c"})
    with pytest.raises(BadRequest, match=r"use client\.call"):
        [i async for i in client.stream("users", "Users.Get", {"user_id": "c"})]


@pytest.mark.parametrize("path", PATHS)
async def test_a_caller_may_stop_a_stream_early(pair: Pair, path: str) -> None:
    client = pair.client(path)
    items = client.stream("users", "Users.List", {"user_id": "e", "n": 1000})
    async for item in items:
        assert item["id"] == "e-0"
        break
    await items.aclose()  # type: ignore[attr-defined]
    # the connection is fine afterwards
    assert (await client.call("users", "Users.Get", {"user_id": "e"}))["total"] == 0


@pytest.mark.parametrize("path", PATHS)
async def test_metadata_reaches_the_handler(pair: Pair, path: str) -> None:
    seen = await pair.client(path).call("users", "Users.Context", {"user_id": "a"},
                                        metadata={"x-trace": "abc", "tenant": "t1"},
                                        response_type=Seen)
    assert seen.metadata == {"x-trace": "abc", "tenant": "t1"}


@pytest.mark.parametrize("path", PATHS)
async def test_metadata_keys_are_lowercased_and_checked_on_both_paths(pair: Pair, path: str) -> None:
    client = pair.client(path)
    seen = await client.call("users", "Users.Context", {"user_id": "a"},
                             metadata={"X-Request-Id": "r1"}, response_type=Seen)
    assert seen.metadata == {"x-request-id": "r1"}
    for bad in ({"grpc-status": "0"}, {"content-type": "x"}, {"sp ace": "x"}, {"x-bin": "x"},
                {"x-value": "caf\u00e9"}, {"x-empty": ""}):
        with pytest.raises(BadRequest, match="metadata"):
            await client.call("users", "Users.Context", {"user_id": "a"}, metadata=bad)


# -- deadlines --------------------------------------------------------------------------------


class Front:
    """Calls the back service from inside a handler."""

    def __init__(self, client: Callable[[], Client]) -> None:
        self.client = client

    async def Relay(self, req: Req) -> Seen:
        inner = await self.client().call("back", "Back.Context", {"user_id": req.user_id},
                                         response_type=Seen)
        return Seen(context.time_remaining(), context.deadline(), {}, inner)

    async def RelaySlow(self, req: Req) -> Seen:
        await self.client().call("back", "Back.Slow", {"user_id": req.user_id})
        return Seen()


class Back:
    def __init__(self) -> None:
        self.slow_started = anyio.Event()

    async def Context(self, req: Req) -> Seen:
        return Seen(context.time_remaining(), context.deadline(), dict(context.metadata()))

    async def Slow(self, req: Req) -> Seen:
        self.slow_started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.fixture(params=PATHS)
async def chain(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Client, Back]]:
    """front -> back: in one Runtime (fast path all the way) or in three (one wire all the way)."""
    registry = MemoryRegistry()
    wire = None if request.param == "in-process" else request.param
    async with memory_runtime(registry, transport=wire) as a, memory_runtime(registry, transport=wire) as b, \
            memory_runtime(registry, transport=wire) as c:
        network = wire is not None
        front_rt, back_rt, caller = (a, b, c) if network else (a, a, a)
        back = Back()
        front = micro.Service("front", runtime=front_rt)
        front.handle(Front(lambda: front_rt.client))
        back_service = micro.Service("back", runtime=back_rt)
        back_service.handle(back)
        async with back_service, front:
            yield caller.client, back


async def test_deadline_propagates_to_inner_calls(
    chain: tuple[Client, Back], request: pytest.FixtureRequest
) -> None:
    client, _ = chain
    seen = await client.call("front", "Front.Relay", {"user_id": "a"}, timeout=5,
                             response_type=Seen)
    assert seen.remaining is not None and seen.inner is not None
    assert seen.inner.remaining is not None  # without propagation: the 60 s default
    assert 0 < seen.inner.remaining <= 5
    assert 0 < seen.remaining <= 5
    assert seen.deadline is not None and seen.inner.deadline is not None
    if "in-process" in request.node.name:
        assert seen.inner.deadline == seen.deadline  # the very same deadline, inherited
    # (over a network a deadline travels as a relative timeout, so it is re-based per hop)


async def test_no_deadline_outside_a_call() -> None:
    assert context.time_remaining() is None
    assert context.deadline() is None
    assert dict(context.metadata()) == {}


async def test_a_slow_inner_handler_times_out_the_outer_call(chain: tuple[Client, Back]) -> None:
    client, back = chain
    with anyio.fail_after(10), pytest.raises(Timeout) as info:
        await client.call("front", "Front.RelaySlow", {"user_id": "a"}, timeout=0.5)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert back.slow_started.is_set()
    # the caller's task is healthy afterwards: its own scopes still work
    with anyio.fail_after(10):
        seen = await client.call("front", "Front.Relay", {"user_id": "b"}, response_type=Seen)
    assert seen.inner is not None


@pytest.mark.parametrize("wire", WIRES)
async def test_a_call_that_timed_out_leaves_the_task_able_to_stop_services(wire: str) -> None:
    """grpclib cancels the waiting task on a deadline and never uncancels it: the pool
    must take that back, or the next ``async with`` exit in the task raises CancelledError."""
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry, transport=wire) as away:
        back = Back()
        service = micro.Service("back", runtime=home)
        service.handle(back)
        async with service:
            with pytest.raises(Timeout):
                await away.client.call("back", "Back.Slow", {"user_id": "a"}, timeout=0.2)
            with anyio.fail_after(5):
                await anyio.lowlevel.checkpoint()  # a fresh cancel scope in the same task behaves
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        # leaving the service (task group, drain) worked: we are here


# -- middleware -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_call_and_handler_wrappers_run_on_both_paths(path: str) -> None:
    log: list[str] = []

    def call_wrapper(next_: Next) -> Next:
        async def wrapped(req: Request) -> Any:
            log.append(f"call {req.service} {req.endpoint} {type(req.body).__name__}")
            req.metadata = {**req.metadata, "via": "call-wrapper"}
            return await next_(req)
        return wrapped

    def handler_wrapper(next_: Next) -> Next:
        async def wrapped(req: Request) -> Any:
            log.append(f"handle {req.service} {req.endpoint} {type(req.body).__name__} "
                       f"{req.metadata.get('via')}")
            rsp = await next_(req)
            if isinstance(rsp, Rsp):
                rsp.total += 100
            return rsp
        return wrapped

    registry = MemoryRegistry()
    async with memory_runtime(registry, call_wrappers=[call_wrapper]) as home, \
            memory_runtime(registry, call_wrappers=[call_wrapper], transport=path if path in WIRES else None) as away:
        service = micro.Service("users", runtime=home, handler_wrappers=[handler_wrapper])
        service.handle(Users())
        async with service:
            client = home.client if path == "in-process" else away.client
            got = await client.call("users", "Users.Get", {"user_id": "a", "n": 1})
            items = [i async for i in client.stream("users", "Users.List", {"user_id": "a", "n": 2})]
    assert got["total"] == 101
    assert len(items) == 2
    assert log == [
        "call users Users.Get dict",
        "handle users Users.Get Req call-wrapper",
        "call users Users.List dict",
        "handle users Users.List Req call-wrapper",
    ]


# -- selection, dead nodes, concurrency -------------------------------------------------------


async def wait_for(watcher: Watcher, type_: str, name: str) -> Event:
    with anyio.fail_after(5):
        async for event in watcher:
            if event.type == type_ and event.service.name == name:
                return event
    raise AssertionError("watcher ended")


@pytest.mark.parametrize("wire", WIRES)
async def test_round_robin_over_two_nodes(wire: str) -> None:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as a, memory_runtime(registry) as b, \
            memory_runtime(registry, transport=wire) as caller:
        users_a, users_b = Users(), Users()
        one = micro.Service("users", runtime=a)
        one.handle(users_a)
        two = micro.Service("users", runtime=b)
        two.handle(users_b)
        async with one, two:
            for _ in range(20):
                await caller.client.call("users", "Users.Get", {"user_id": "a"})
            assert (users_a.calls, users_b.calls) == (10, 10)
            # streams are spread too, and each node is a different address
            assert one.address != two.address


@pytest.mark.parametrize("wire", WIRES)
async def test_a_dead_node_is_skipped(wire: str) -> None:
    """A node whose process died without deregistering: the call reaches the live node."""
    registry = MemoryRegistry()
    async with memory_runtime(registry) as a, memory_runtime(registry) as b, \
            memory_runtime(registry, transport=wire) as caller:
        live, doomed = Users(), Users()
        one = micro.Service("users", runtime=a)
        one.handle(live)
        two = micro.Service("users", runtime=b)
        two.handle(doomed)
        watcher = registry.watch()
        async with one:
            async with two:
                for _ in range(4):  # both nodes have a pooled connection now
                    await caller.client.call("users", "Users.Get", {"user_id": "a"})
                assert doomed.calls == 2
                ghost = two.record
            # the process "died": its server is gone, but its record is back in the registry
            await registry.register(ghost, ttl=60)
            await wait_for(watcher, "create", "users")
            (rec,) = await registry.get("users")
            assert len(rec.nodes) == 2
            for _ in range(10):
                got = await caller.client.call("users", "Users.Get", {"user_id": "a"})
                assert got["user_id"] == "a"
            streamed = [i async for i in caller.client.stream("users", "Users.List",
                                                              {"user_id": "s", "n": 1})]
            assert len(streamed) == 1
        await watcher.aclose()
    assert (live.calls, doomed.calls) == (12, 2)


@pytest.mark.parametrize("wire", WIRES)
async def test_a_node_at_its_connection_limit_is_skipped_even_for_a_call_that_is_not_idempotent(wire: str) -> None:
    """The full node refuses the connection before any call on it is processed (gRPC: a GOAWAY whose last
    stream id is 0; native: an ERROR frame), so the call goes to the other node although it may not be
    retried once sent."""
    registry = MemoryRegistry()
    async with memory_runtime(registry) as a, memory_runtime(registry) as b, \
            memory_runtime(registry, transport=wire) as caller:
        live, full = Users(), Users()
        one = micro.Service("users", runtime=a)
        one.handle(live)
        two = micro.Service("users", runtime=b, max_connections=1)
        two.handle(full)
        async with one, two:
            _, held = await asyncio.open_connection(*two.address.rsplit(":", 1))  # its one connection
            try:
                with anyio.fail_after(10):
                    while two.connections.open < 1:
                        await anyio.wait_all_tasks_blocked()
                for i in range(6):  # round robin: half of them try the full node first
                    got = await caller.client.call("users", "Users.Get", {"user_id": str(i)})
                    assert got["user_id"] == str(i)
                streamed = [i async for i in caller.client.stream("users", "Users.List", {"user_id": "s", "n": 2})]
                assert len(streamed) == 2
                assert two.connections.refused >= 1
            finally:
                held.close()
    assert (live.calls, full.calls) == (6, 0)


class _Deaf(Watcher):
    """A watch that reports nothing until closed: the caller's cache goes stale, as behind a slow poll."""

    def __init__(self) -> None:
        self._closed = anyio.Event()

    async def __anext__(self) -> Event:
        await self._closed.wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed.set()


class _DeafRegistry(MemoryRegistry):
    def _watch(self) -> Watcher:
        return _Deaf()


@pytest.mark.parametrize("wire", WIRES)
async def test_a_replaced_node_is_found_in_the_registry_when_the_cached_one_refuses(wire: str) -> None:
    """A redeploy (micro run --reload): the cached node is gone and the registry has a new one; nothing was
    sent to the old, so the call asks the registry again and reaches the new node, unary and streaming."""
    registry = _DeafRegistry()
    async with memory_runtime(registry) as a, memory_runtime(registry) as b, \
            memory_runtime(registry, transport=wire) as caller:
        old, new = Users(), Users()
        one = micro.Service("users", runtime=a)
        one.handle(old)
        async with one:
            for _ in range(2):
                await caller.client.call("users", "Users.Get", {"user_id": "a"})
            (cached,) = await caller.client.lookup("users")
            assert len(cached.nodes) == 1  # calls leave the cached record's nodes alone
        two = micro.Service("users", runtime=b)
        two.handle(new)
        async with two:
            assert (await caller.client.call("users", "Users.Get", {"user_id": "b"}))["user_id"] == "b"
            streamed = [i async for i in caller.client.stream("users", "Users.List", {"user_id": "s", "n": 1})]
            assert len(streamed) == 1
    assert (old.calls, new.calls) == (2, 1)


@pytest.mark.parametrize("wire", WIRES)
async def test_no_reachable_node_is_unavailable(wire: str) -> None:
    registry = MemoryRegistry()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with memory_runtime(registry) as a, memory_runtime(registry) as caller:
        service = micro.Service("users", runtime=a)
        service.handle(Users())
        record = service.record
    node = record.nodes[0]
    record.nodes = [msgspec.structs.replace(node, id="gone", address=f"127.0.0.1:{port}",
                                            metadata={**node.metadata, "native": f"127.0.0.1:{port}"})]
    async with memory_runtime(registry, transport=wire) as caller:
        await registry.register(record, ttl=60)
        with pytest.raises(Unavailable) as info:
            await caller.client.call("users", "Users.Get", {"user_id": "a"})
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(Unavailable):
            [i async for i in caller.client.stream("users", "Users.List", {"user_id": "a"})]


class Gate:
    """Every call waits until ``expected`` calls have arrived: all are in flight at once."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_in = anyio.Event()

    async def Wait(self, req: Req) -> Req:
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_in.set()
        await self.all_in.wait()
        return req


@pytest.mark.parametrize("wire", WIRES)
async def test_more_than_100_calls_in_flight_on_one_node(wire: str) -> None:
    registry = MemoryRegistry()
    gate = Gate(300)
    async with memory_runtime(registry) as home, memory_runtime(registry, transport=wire) as away:
        service = micro.Service("gate", runtime=home)
        service.handle(gate)
        async with service:
            results: list[Any] = [None] * 300

            async def one(i: int) -> None:
                results[i] = await away.client.call("gate", "Gate.Wait", {"user_id": str(i), "n": i})

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        tg.start_soon(one, i)
    assert gate.arrived == 300
    assert [r["n"] for r in results] == list(range(300))


@pytest.mark.parametrize("wire", WIRES)
async def test_registry_changes_reach_the_client_cache(wire: str) -> None:
    """A service that appears after a failed lookup, and one that leaves, are seen at once."""
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry, transport=wire) as away:
        with pytest.raises(micro.errors.ServiceNotFound):
            await away.client.call("users", "Users.Get", {"user_id": "a"})
        service = micro.Service("users", runtime=home)
        service.handle(Users())
        async with service:
            assert (await away.client.call("users", "Users.Get", {"user_id": "a"}))["total"] == 0
        # the delete event reaches away's cache through its watch (on away's own task):
        # the next call finds no service, rather than trying the node that left
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(micro.errors.ServiceNotFound):
            await away.client.call("users", "Users.Get", {"user_id": "a"})


class CountingRegistry(MemoryRegistry):
    """The real memory registry, counting lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, name: str) -> list[Any]:
        self.gets += 1
        return await super().get(name)


async def test_lookups_come_from_the_watched_cache() -> None:
    registry = CountingRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry) as away, \
            memory_runtime(registry) as third:
        service = micro.Service("users", runtime=home)
        service.handle(Users())
        async with service:
            await anyio.wait_all_tasks_blocked()  # the registration event has reached away's cache
            before = registry.gets
            for _ in range(20):
                await away.client.call("users", "Users.Get", {"user_id": "a"})
            assert registry.gets == before + 1  # one lookup, then no registry I/O per call
            # a change in the registry (a second node) empties the cache: one more lookup
            other = micro.Service("users", runtime=third)
            other.handle(Users())
            async with other:  # (starting, it reads the running nodes' records once: its protobuf layout check)
                await anyio.wait_all_tasks_blocked()
                before = registry.gets
                for _ in range(4):
                    await away.client.call("users", "Users.Get", {"user_id": "a"})
                assert registry.gets == before + 1


# -- streams stopped early; waiting for a place in flight (found in review) ------------------------


class Feed:
    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.release = asyncio.Event()

    async def Items(self, req: Req) -> AsyncIterator[Item]:
        """Many items."""
        try:
            for i in range(1000):
                yield Item(str(i))
        finally:
            self.closed.set()

    async def Hang(self, req: Req) -> Item:
        """Answer when released."""
        await self.release.wait()
        return Item("late")


async def _feed_system(wire: str | None = None) -> tuple[micro.Runtime, micro.Runtime, micro.Service, Feed]:
    registry = MemoryRegistry()
    home = micro.Runtime(registry=registry, store="memory://", broker="memory://")
    away = micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire)
    feed = Feed()
    svc = micro.New("feed", runtime=home)
    svc.handle(feed)
    return home, away, svc, feed


async def test_an_in_process_stream_keeps_its_context_out_of_the_consumers() -> None:
    # the stream's deadline and metadata were entered in the consumer's task across yields: after an
    # early stop they stayed there, and the consumer's later calls timed out at once
    home, _, svc, feed = await _feed_system()
    async with home, svc:
        agen = home.client.stream("feed", "Feed.Items", {"user_id": "a"}, timeout=30, metadata={"tenant": "t1"})
        async for _ in agen:
            assert context.deadline() is None and "tenant" not in context.metadata()  # the consumer's own
            break
        await agen.aclose()
        assert feed.closed.is_set()  # stopping ended the handler's generator, not the garbage collector
        assert context.deadline() is None


@pytest.mark.parametrize("wire", WIRES)
async def test_closing_a_network_stream_gives_its_place_back_at_once(wire: str) -> None:
    home, away, svc, feed = await _feed_system(wire)
    async with home, away, svc:
        agen = away.client.stream("feed", "Feed.Items", {"user_id": "a"}, timeout=30)
        async for _ in agen:
            break
        await agen.aclose()
        (pool,) = away.client._pools.values()
        # the pool slot and the HTTP/2 stream (or the native call) are released now
        if isinstance(pool, NativePool):
            assert [len(c.calls) for c in pool._conns] == [0]
        else:
            assert [c.inflight for c in pool._conns] == [0]
        assert pool.places.inflight == 0
        with anyio.fail_after(10):
            await feed.closed.wait()  # and the server ends the handler's generator


@pytest.mark.parametrize("wire", WIRES)
async def test_waiting_for_a_place_in_flight_ends_at_the_deadline(wire: str) -> None:
    home, _, svc, feed = await _feed_system()
    async with home, svc:
        pool: NodePool | NativePool = (
            NodePool(svc.address, max_streams=1, max_connections=1) if wire == "grpc"
            else NativePool(svc.record.nodes[0].metadata["native"], max_streams=1, max_connections=1))
        try:
            hung = asyncio.create_task(pool.unary("/feed.Feed/Hang", b'{"user_id": "a"}'))
            await anyio.wait_all_tasks_blocked()
            loop = asyncio.get_running_loop()
            with anyio.fail_after(10), pytest.raises(Timeout, match="waited for one of the 1 places"):
                await pool.unary("/feed.Feed/Hang", b'{"user_id": "b"}', deadline=loop.time() + 0.2)
            feed.release.set()
            assert msgspec.json.decode(await hung)["id"] == "late"  # the call that held the place was unharmed
        finally:
            pool.close()


@pytest.mark.parametrize("wire", WIRES)
async def test_a_stream_whose_deadline_has_passed_is_refused_on_both_paths(wire: str) -> None:
    # in-process it used to run (a generator that yields without awaiting never noticed the deadline)
    home, away, svc, _ = await _feed_system(wire)
    async with home, away, svc:
        for rt in (home, away):
            with pytest.raises(Timeout, match="deadline passed before"):
                async for _ in rt.client.stream("feed", "Feed.Items", {"user_id": "a"}, timeout=0):
                    raise AssertionError("no item should come")


class Named:
    """Answers with the name of the node it runs on."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def Who(self, req: Req) -> Req:
        """Who answers."""
        return Req(self.name, req.n)


@pytest.mark.parametrize("wire", WIRES)
async def test_a_replaced_node_is_called_once_the_watch_says_so(wire: str) -> None:
    """The client's call plan (record, wire, decoder, pool per node) lasts as long as its cached record:
    once the watch reports a node gone and another come, the next calls go to the new one at once,
    with no attempt on the old one (the breakers saw no failure)."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as away, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as home:
        async def who(**kw: Any) -> Any:
            with anyio.fail_after(10):
                return await away.client.call("named", "Named.Who", Req("x", 1), **kw)

        first = micro.Service("named", runtime=home)
        first.handle(Named("first"))
        async with first:
            assert await who(response_type=Req) == Req("first", 1)
            assert await who() == {"user_id": "first", "n": 1}
            second = micro.Service("named", runtime=home)
            second.handle(Named("second"))
            await second.start()
        try:
            with anyio.fail_after(10):
                while "named" in away.client._records:  # the watch dropped the record that lists the first
                    await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                assert await who(response_type=Req) == Req("second", 1)
                assert await who() == {"user_id": "second", "n": 1}  # another plan: dict out
                assert await who(response_type=msgspec.Raw) == msgspec.Raw(b'{"user_id":"second","n":1}')
            assert not away.client.breakers._nodes  # no call was tried on the node that left
        finally:
            await second.stop()


class _Events(Watcher):
    """A watch fed by the test: the events given, then the end."""

    def __init__(self, events: list[Event], first: Callable[[], None] = lambda: None) -> None:
        self.events = iter(events)
        self.first: Callable[[], None] | None = first

    async def __anext__(self) -> Event:
        await anyio.lowlevel.checkpoint()
        if self.first is not None:  # the watch has started (and emptied the cache)
            self.first, first = None, self.first
            first()
        try:
            return next(self.events)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        pass


async def test_the_pools_of_nodes_that_left_the_registry_are_closed_and_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the dashboard's health checks open a pool per node (grpc_channel): kept for ever, they grew with
    # every node that ever registered
    closed: list[str] = []
    monkeypatch.setattr(NodePool, "close", lambda self: closed.append(self.address))
    monkeypatch.setattr(NativePool, "close", lambda self: closed.append(self.address))
    gone = micro.registry.Node("n1", "127.0.0.1:7001", {"native": "127.0.0.1:7101"})
    kept = micro.registry.Node("n2", "127.0.0.1:7002", {"native": "127.0.0.1:7102"})
    shared = micro.registry.Node("n3", "127.0.0.1:7003")  # the same process serves "other" too
    client = Client(MemoryRegistry(), transport="auto")
    for node in (gone, kept, shared):
        client.grpc_channel(node)
        client.channel(node)
    busy = client.grpc_channel(kept)
    assert busy.places.take_now()  # a call in flight to it
    left = micro.registry.ServiceRecord("svc", nodes=[gone, shared])
    other = [micro.registry.ServiceRecord("other", nodes=[shared])]
    await client.follow(_Events([Event("delete", left), Event("delete", micro.registry.ServiceRecord(
        "svc", nodes=[kept]))], first=lambda: client._records.update(other=other)))
    assert sorted(closed) == ["127.0.0.1:7001", "127.0.0.1:7101", "127.0.0.1:7102"]  # the busy one: only dropped
    assert set(client._pools) == {"127.0.0.1:7003"}  # still listed by a cached record of "other"


async def test_a_reused_address_gets_a_pool_of_its_new_kind_and_the_old_one_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    monkeypatch.setattr(NodePool, "close", lambda self: closed.append(f"grpc {self.address}"))
    monkeypatch.setattr(NativePool, "close", lambda self: closed.append(f"native {self.address}"))
    client = Client(MemoryRegistry(), transport="auto")
    old = micro.registry.Node("old", "127.0.0.1:7201")  # its gRPC address is now another node's native one
    new = micro.registry.Node("new", "127.0.0.1:7202", {"native": "127.0.0.1:7201"})
    client.grpc_channel(old)
    assert isinstance(client.channel(new), NativePool)  # not the NodePool kept under that address
    assert isinstance(client.grpc_channel(old), NodePool)
    assert closed == ["grpc 127.0.0.1:7201", "native 127.0.0.1:7201"]


async def test_a_long_churn_of_services_leaves_no_call_plans_behind() -> None:
    """Each unary call's plan (record, wire, decoder, pools) is kept per service and types; a service whose
    node left the registry loses its plans with its pools, so services that come and go do not grow them."""
    with socket.socket() as s:  # a port nobody listens on: the call fails at once, after making its plan
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    async with MemoryRegistry() as registry:
        client = Client(registry, transport="auto")
        try:
            for i in range(60):
                node = micro.registry.Node(f"n{i}", closed, {"native": closed})
                record = micro.registry.ServiceRecord(
                    f"churn{i}", endpoints=[micro.registry.Endpoint("H.M", f"/churn{i}.H/M")], nodes=[node])
                await registry.register(record, ttl=60)
                with pytest.raises(Unavailable):
                    await client.call(f"churn{i}", "H.M", {})
                assert len(client._plans) == 1
                await registry.deregister(record)
                await client.follow(_Events([Event("delete", record)]))
            assert client._plans == {}
            assert client._rr == {} and client._pools == {}
        finally:
            client.close()


async def test_a_node_leaving_keeps_its_service_s_round_robin_going() -> None:
    """A delete event for one node of a service that has others keeps the service's round-robin counter (a
    rolling restart does not send every next call to the first node); the last node leaving drops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    nodes = [micro.registry.Node(f"n{i}", closed, {}) for i in range(3)]
    record = micro.registry.ServiceRecord("rr", endpoints=[micro.registry.Endpoint("H.M", "/rr.H/M")], nodes=nodes)
    async with MemoryRegistry() as registry:
        client = Client(registry, transport="grpc")
        try:
            await registry.register(record, ttl=60)
            with pytest.raises(Unavailable):
                await client.call("rr", "H.M", {}, timeout=10)
            counter = client._rr["rr"]
            cached = await registry.get("rr")  # what the next call caches

            def cache() -> None:  # as calls made since the watch began would have
                client._records["rr"] = cached

            left = micro.registry.ServiceRecord("rr", endpoints=record.endpoints, nodes=nodes[:1])
            await client.follow(_Events([Event("delete", left)], first=cache))
            assert client._rr["rr"] is counter  # n1 and n2 are still there
            await client.follow(_Events([Event("delete", record)], first=cache))
            assert "rr" not in client._rr  # all three left
        finally:
            client.close()


class _Refusing:
    """A pool whose calls all fail with ``Unavailable`` (the node may have run them)."""

    wire = "native"

    async def unary(self, path: str, data: bytes, **kw: Any) -> bytes:
        await asyncio.sleep(0)
        raise Unavailable("n0: unavailable")


@pytest.mark.parametrize("idempotent", [False, True])
async def test_failed_calls_leave_no_reference_cycles(idempotent: bool) -> None:
    """A call that fails (an outage: every call does) leaves nothing for the cyclic collector: no cycle
    exception -> traceback -> the client's frame -> exception keeping each request's body alive until a GC."""
    from micro.client.retry import RetryPolicy
    from micro.registry import Endpoint as RegistryEndpoint
    from micro.registry import Node, ServiceRecord

    class OneRecord(MemoryRegistry):
        async def get(self, name: str) -> list[ServiceRecord]:
            return [ServiceRecord(name="s", nodes=[Node(id="n0", address="addr-n0")], endpoints=[
                RegistryEndpoint(name="H.M", path="/s.H/M",
                                 metadata={"idempotent": "true"} if idempotent else {})])]

    client = Client(OneRecord(), transport="auto", default_timeout=None)
    client.retry = RetryPolicy(attempts=3, base=0.0, cap=0.0)
    client._pool = lambda node: _Refusing()  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(Unavailable):  # warm: the plan and caches exist before counting
        await client.call("s", "H.M", b"x")
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            with pytest.raises(Unavailable):
                await client.call("s", "H.M", b"x" * 10_000)
        assert gc.collect() == 0
    finally:
        gc.enable()
