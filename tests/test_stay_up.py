"""Staying up (issue 22): outages, failing background work.

**NATS outage longer than a client's give-up window.** nats-py closes a client for
good after ``max_reconnect`` attempts; the shared NATS connection then starts over
with fresh clients (capped backoff, jitter) for as long as it is open, and the brokers
re-create their subscriptions on them. The test shortens the give-up window to two
attempts 50 ms apart (the default is unbounded), keeps the server down past it, and
checks that a flow handles every event after the restart.

**Supervised background work.** A registry watch, a heartbeat or a keep-alive loop
that fails is started again (``BackgroundTasks.supervise``) and logged once per streak.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import msgspec
import pytest

import micro
from micro.client.pool import NodePool
from micro.connections import ConnectionLimit
from micro.errors import ResourceExhausted, Status, Unavailable
from micro.flow import FlowRun
from micro.registry import Event as RegistryEvent
from micro.registry import Watcher
from micro.registry.memory import MemoryRegistry
from micro.server.grpc import GrpcServer
from micro.service import endpoints_of
from micro.tasks import BackgroundTasks
from micro.wire import frames as wire
from micro.wire.server import NativeServer
from tests._servers import NatsServer


class Watch(logging.Handler):
    """Collects a logger's records and wakes a waiter when one contains a phrase."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._waiting: list[tuple[str, anyio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for phrase, event in self._waiting:
            if phrase in record.getMessage():
                event.set()

    def seen(self, phrase: str) -> list[str]:
        return [r.getMessage() for r in self.records if phrase in r.getMessage()]

    async def wait_for(self, phrase: str, timeout: float = 30) -> None:
        event = anyio.Event()
        self._waiting.append((phrase, event))
        if self.seen(phrase):
            return
        with anyio.fail_after(timeout):
            await event.wait()


def watching(name: str) -> Iterator[Watch]:
    watch = Watch()
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


@pytest.fixture
def nats_log() -> Iterator[Watch]:
    yield from watching("micro.nats")


@pytest.fixture
def runtime_log() -> Iterator[Watch]:
    yield from watching("micro.runtime")


@pytest.fixture
def connections_log() -> Iterator[Watch]:
    yield from watching("micro.connections")


async def publish(rt: micro.Runtime, n: int) -> None:
    """Publish event ``n``; JetStream answers ``Unavailable`` for a moment after a restart."""
    with anyio.fail_after(30):
        while True:
            try:
                await rt.broker.publish("jobs.created", {"n": n}, headers={"Micro-Id": f"job-{n}"})
                return
            except Unavailable:
                await anyio.sleep(0.05)  # pacing retries while JetStream elects itself, not synchronisation


async def test_flow_consumes_again_after_an_outage_longer_than_the_give_up_window(
        own_nats_server: NatsServer, nats_log: Watch) -> None:
    server = own_nats_server
    url = server.url.replace("nats://", "nats+js://") + (
        "?max_reconnect=2&reconnect_wait=0.05&max_reconnect_wait=0.2&ack_wait=2&backoff=0.05")
    handled: dict[int, int] = {}
    changed = anyio.Event()

    async def step(event: dict[str, Any], run: FlowRun) -> int:
        nonlocal changed
        n = int(event["n"])
        handled[n] = handled.get(n, 0) + 1
        changed.set()
        changed = anyio.Event()
        return n

    async def handled_all(count: int) -> None:
        with anyio.fail_after(60):
            while set(handled) != set(range(count)):
                await changed.wait()

    async with micro.Runtime(registry="memory://", store="memory://", broker=url) as rt:
        flow = micro.NewFlow("jobs", trigger="jobs.created", steps=[step], runtime=rt)
        async with flow:
            for n in range(5):
                await publish(rt, n)
            await handled_all(5)

            await anyio.to_thread.run_sync(server.stop)
            await nats_log.wait_for("starting over with a fresh connection")  # nats-py gave up
            await nats_log.wait_for("a fresh connection failed")  # and micro keeps trying
            with pytest.raises(Unavailable, match="broker"):
                await rt.broker.publish("jobs.created", {"n": -1})

            await anyio.to_thread.run_sync(server.start)
            await nats_log.wait_for("connected again")
            for n in range(5, 10):
                await publish(rt, n)
            await handled_all(10)

    assert set(handled) == set(range(10))  # nothing lost, before or after the outage
    # one line per change of state, at warning or above: not one per attempt or operation
    loud = [r.getMessage() for r in nats_log.records if r.levelno >= logging.WARNING]
    assert len(nats_log.seen("reconnecting")) == 1, loud
    assert len(nats_log.seen("starting over with a fresh connection")) == 1, loud
    assert len(nats_log.seen("connected again")) == 1, loud
    assert len(loud) == 3, loud


async def test_a_failing_background_task_is_started_again_and_logged_once_per_streak() -> None:
    logger = logging.getLogger("tests.supervise")
    log = Watch()
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    runs = 0
    running_again = anyio.Event()
    sibling_ran = anyio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"failure {runs}")
        running_again.set()
        await anyio.sleep_forever()

    async def sibling() -> None:
        await running_again.wait()
        sibling_ran.set()  # a failing task does not end the others in the group

    tasks = BackgroundTasks("owner", logger)
    try:
        await tasks.start()
        tasks.start_soon(sibling)
        tasks.supervise(work, name="work", first_wait=0.001, max_wait=0.05)
        with anyio.fail_after(10):
            await running_again.wait()
            await sibling_ran.wait()
        (name, failing), = tasks.failing.items()
        assert (name, failing.failures, failing.error) == ("work", 3, "RuntimeError('failure 3')")
        await log.wait_for("recovered")  # the streak ends once a run lasts max_wait
        assert tasks.failing == {}
    finally:
        await tasks.aclose()
        logger.removeHandler(log)
        logger.setLevel(logging.NOTSET)
    errors = [r for r in log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failure 1" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the first failure carries its traceback
    assert len(log.seen("in a row")) == 2  # the other two at debug level
    assert runs == 4


class _BrokenWatcher(Watcher):
    async def __anext__(self) -> RegistryEvent:
        raise OSError(errno.EMFILE, "Too many open files")

    async def aclose(self) -> None:
        pass


class FlakyWatchRegistry(MemoryRegistry):
    """The watch number ``broken`` (the first by default) fails as a watch did when the process ran
    out of descriptors."""

    def __init__(self, broken: int = 1) -> None:
        super().__init__()
        self.watches = 0
        self.broken = broken

    def _watch(self) -> Watcher:
        self.watches += 1
        return _BrokenWatcher() if self.watches == self.broken else super()._watch()


class PingRequest(msgspec.Struct):
    text: str = ""


class Echo:
    async def Ping(self, req: PingRequest) -> PingRequest:
        """Answer with the request."""
        return req


async def test_a_failed_registry_watch_starts_again_and_still_delivers_changes(runtime_log: Watch) -> None:
    registry = FlakyWatchRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        await runtime_log.wait_for("registry watch failed")
        with anyio.fail_after(10):
            while registry.watches < 2:  # started again after its backoff
                await anyio.wait_all_tasks_blocked()
        first = micro.Service("echo", runtime=rt)
        first.handle(Echo())
        async with first:
            record, _ = await rt.client.resolve("echo", "Echo.Ping")
            assert [n.id for n in record.nodes] == [first.id]
        second = micro.Service("echo", runtime=rt)
        second.handle(Echo())
        async with second:
            with anyio.fail_after(10):  # the watch drops the cached record: no call has to fail first
                while [n.id for n in (await rt.client.resolve("echo", "Echo.Ping"))[0].nodes] != [second.id]:
                    await anyio.wait_all_tasks_blocked()
    assert len(runtime_log.seen("registry watch failed")) == 1


# -- held request bodies (raw HTTP/2: a client that announces a body and never finishes it) ----


class HeldBodies:
    """One HTTP/2 connection whose calls announce ``size``-byte messages and send one byte of them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.answers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()

    @classmethod
    async def open(cls, address: str) -> HeldBodies:
        host, _, port = address.rpartition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def start(self, calls: int, size: int) -> None:
        for _ in range(calls):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/echo.Echo/Ping"),
                                         (":authority", "x"), ("content-type", "application/grpc+json"),
                                         ("te", "trailers")])
            self.conn.send_data(sid, b"\0" + size.to_bytes(4, "big") + b"{")  # and never the rest
        self.writer.write(self.conn.data_to_send())

    async def read_until(self, done: Callable[[], bool]) -> None:
        while not done():
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    self.answers.setdefault(ev.stream_id, {}).update(dict(ev.headers))
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended.add(ev.stream_id)
            self.writer.write(self.conn.data_to_send())

    def statuses(self) -> list[str]:
        return [self.answers.get(sid, {}).get("grpc-status", "reset") for sid in sorted(self.ended)]

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def echo_server(**options: Any) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(**options)
    for ep in endpoints_of(Echo(), "echo"):
        server.add(ep)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop(grace=0)


async def wait_until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not check():
            await anyio.wait_all_tasks_blocked()


async def test_200_held_bodies_are_bounded_by_the_buffered_bytes_accounting() -> None:
    """Four connections, 50 calls each, every one announcing 4 MiB and sending 1 byte: the
    server holds at most its bounds (16 MiB a connection, 64 MiB in all) and refuses the
    rest at once with RESOURCE_EXHAUSTED; when the clients go, nothing stays held."""
    size = 4 * 1024 * 1024
    async with echo_server() as server:
        budget = server.budget
        assert (budget.max_bytes, budget.max_connection_bytes) == (64 * 1024 * 1024, 16 * 1024 * 1024)
        clients = [await HeldBodies.open(f"127.0.0.1:{server.port}") for _ in range(4)]
        try:
            for client in clients:
                client.start(50, size)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for client in clients:  # 46 refused on each: 4 of 4 MiB fit in a connection's 16 MiB
                        tg.start_soon(client.read_until, lambda c=client: len(c.ended) >= 46)
            statuses = [s for client in clients for s in client.statuses()]
            assert statuses == ["8"] * 184  # RESOURCE_EXHAUSTED, answered, not reset
            assert budget.buffered == budget.peak == 64 * 1024 * 1024
            assert budget.refused == 184
        finally:
            for client in clients:
                client.close()
        await wait_until(lambda: budget.buffered == 0)


async def test_a_body_that_does_not_arrive_ends_its_call_and_is_released() -> None:
    async with echo_server(body_timeout=0.2) as server:
        client = await HeldBodies.open(f"127.0.0.1:{server.port}")
        try:
            client.start(1, 1000)
            with anyio.fail_after(10):
                await client.read_until(lambda: len(client.ended) == 1)
        finally:
            client.close()
        assert client.statuses() == ["4"]  # DEADLINE_EXCEEDED
        assert "did not arrive within 0.2 s" in next(iter(client.answers.values()))["grpc-message"]
        assert server.budget.buffered == 0 and server.budget.peak == 1000


async def test_an_overloaded_server_refuses_before_reading_the_body() -> None:
    def full() -> None:
        raise ResourceExhausted("echo is at its limit")

    async with echo_server(admit=full) as server:
        client = await HeldBodies.open(f"127.0.0.1:{server.port}")
        try:
            client.start(3, 1_000_000)
            with anyio.fail_after(10):
                await client.read_until(lambda: len(client.ended) == 3)
        finally:
            client.close()
        assert client.statuses() == ["8"] * 3
        assert server.budget.peak == 0  # nothing was held for them


# -- held request bodies on the native wire (one frame arrives at a time per connection) -----


@contextlib.asynccontextmanager
async def native_echo_server(**options: Any) -> AsyncIterator[NativeServer]:
    server = NativeServer(max_message_size=4 * 1024 * 1024, **options)
    for ep in endpoints_of(Echo(), "echo"):
        server.add(ep)
    await server.start("127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(grace=0)


class HeldFrame:
    """A native-wire connection that sends a REQUEST's header, head and first payload byte only."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = wire.FrameReader(1 << 22)

    @classmethod
    async def open(cls, server: NativeServer) -> HeldFrame:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(wire.preface())
        assert wire.read_preface(await reader.readexactly(wire.PREFACE_SIZE)) == wire.VERSION
        return cls(reader, writer)

    def start(self, rid: int, size: int) -> None:
        whole = wire.request(rid, "/echo.Echo/Ping", None, None, b"{", 0)
        head = whole[wire.HEADER_SIZE:-1]
        self.writer.write(wire.HEADER.pack(len(head) + size, rid, wire.REQUEST, 0, len(head)) + head + b"{")

    async def answer(self) -> wire.Frame:
        while True:
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            got = self.frames.feed(data)
            if got:
                return got[0]

    def close(self) -> None:
        self.writer.close()


async def test_200_held_frames_on_the_native_wire_are_bounded_by_the_same_accounting() -> None:
    """200 native connections each announcing a 4 MiB request and sending 1 byte: 15 are held
    (each frame is 4 MiB and its header and head: 16 would pass 64 MiB), 185 are refused at once
    with RESOURCE_EXHAUSTED; a refused connection goes on (its body is skipped, its next call
    answered), and nothing stays held when the clients go."""
    size = 4 * 1024 * 1024
    frame = size + len(wire.request(1, "/echo.Echo/Ping", None, None, b"", 0))
    assert (64 * 1024 * 1024) // frame == 15
    async with native_echo_server() as server:
        budget = server.budget
        clients = [await HeldFrame.open(server) for _ in range(200)]
        refused: list[HeldFrame] = []
        try:
            for client in clients:
                client.start(1, size)

            async def answered(client: HeldFrame) -> None:
                kind, rid, _, _, body, _ = await client.answer()
                assert (kind, rid, wire.read_error(body)[0]) == (wire.ERROR, 1, Status.RESOURCE_EXHAUSTED.value)
                refused.append(client)
                if len(refused) == 185:
                    tg.cancel_scope.cancel()  # the other 15 are held: they will not answer

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for client in clients:
                        tg.start_soon(answered, client)
            assert len(refused) == 185 and budget.refused == 185
            assert budget.buffered == budget.peak == 15 * frame
            # the refused request's remaining bytes are skipped; the connection's next call is answered
            client = refused[0]
            client.writer.write(b" " * (size - 1) + wire.request(2, "/echo.Echo/Ping", None, None, b'{"text":"on"}', 0))
            with anyio.fail_after(10):
                kind, rid, _, _, body, _ = await client.answer()
            assert (kind, rid, msgspec.json.decode(body)) == (wire.RESPONSE, 2, {"text": "on"})
        finally:
            for client in clients:
                client.close()
        await wait_until(lambda: budget.buffered == 0)


async def test_a_native_request_that_does_not_arrive_ends_its_call_and_is_released() -> None:
    async with native_echo_server(body_timeout=0.2) as server:
        client = await HeldFrame.open(server)
        try:
            client.start(7, 1000)
            with anyio.fail_after(10):
                kind, rid, _, _, body, _ = await client.answer()
        finally:
            client.close()
        assert (kind, rid) == (wire.ERROR, 7)
        assert wire.read_error(body) == (Status.DEADLINE_EXCEEDED.value,
                                         "request 7: the request did not arrive within 0.2 s")
        assert server.budget.buffered == 0 and server.budget.peak > 1000


async def test_an_overloaded_native_server_refuses_before_reading_the_body() -> None:
    def full() -> None:
        raise ResourceExhausted("echo is at its limit")

    async with native_echo_server(admit=full) as server:
        client = await HeldFrame.open(server)
        try:
            client.start(3, 1_000_000)
            with anyio.fail_after(10):
                kind, rid, _, _, body, _ = await client.answer()
        finally:
            client.close()
        assert (kind, rid, wire.read_error(body)) == (wire.ERROR, 3, (Status.RESOURCE_EXHAUSTED.value,
                                                                      "echo is at its limit"))
        assert server.budget.peak == 0  # nothing was held for it


# -- connections: a bound, an idle timeout, keepalive pings --------------------------------------


class RawH2:
    """A raw HTTP/2 client connection that reads frames as events and never answers anything."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        writer.write(self.conn.data_to_send())
        self.events: list[h2.events.Event] = []

    @classmethod
    async def open(cls, port: int) -> RawH2:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def until_closed(self) -> list[h2.events.Event]:
        """Every event until the server closes the connection (nothing is sent back: no PING ack)."""
        with anyio.fail_after(10):
            while data := await self.reader.read(65536):
                self.events += self.conn.receive_data(data)
        return self.events

    def close(self) -> None:
        self.writer.close()


async def test_past_max_connections_a_connection_is_refused_with_a_goaway_that_says_why(
        connections_log: Watch) -> None:
    limit = ConnectionLimit("service echo", max_connections=2)
    async with echo_server(connection_limit=limit) as server:
        held = [await RawH2.open(server.port) for _ in range(2)]
        refused: list[RawH2] = []
        try:
            await wait_until(lambda: limit.open == 2)
            refused += [await RawH2.open(server.port) for _ in range(3)]
            for client in refused:
                (goaway,) = [e for e in await client.until_closed() if isinstance(e, h2.events.ConnectionTerminated)]
                assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
                assert goaway.additional_data == (b"service echo has 2 connections open, its limit "
                                                  b"(max_connections): try another node or later")
            assert (limit.open, limit.refused, limit.peak) == (2, 3, 2)
            assert len(connections_log.seen("refusing new connections")) == 1  # once per episode
            held[0].close()
            await wait_until(lambda: limit.open == 1)
            pool = NodePool(f"127.0.0.1:{server.port}")
            try:
                assert await pool.unary("/echo.Echo/Ping", b'{"text":"again"}') == b'{"text":"again"}'
            finally:
                pool.close()
            assert connections_log.seen("accepting connections again (3 refused)")
        finally:
            for client in held + refused:
                client.close()


async def test_a_goaway_is_reported_only_for_calls_on_the_connection_that_got_it() -> None:
    """A call refused by a GOAWAY is NodeUnreachable saying why; the next call on the same channel whose
    reconnect fails reports that failure, not the old connection's GOAWAY (which turned a connect
    timeout into "refused before processing")."""
    from micro.client.pool import NodeUnreachable

    limit = ConnectionLimit("service echo", max_connections=1)
    pool: NodePool | None = None
    try:
        async with echo_server(connection_limit=limit) as server:
            held = await RawH2.open(server.port)
            try:
                await wait_until(lambda: limit.open == 1)
                pool = NodePool(f"127.0.0.1:{server.port}")
                with pytest.raises(NodeUnreachable, match=r"refused the call before processing it: service echo has "
                                                          r"1 connections open.*\(GOAWAY ENHANCE_YOUR_CALM\)"):
                    await pool.unary("/echo.Echo/Ping", b'{"text":"refused"}')
            finally:
                held.close()
        with pytest.raises(NodeUnreachable) as failed:  # the server is gone: its port refuses the connection
            await pool.unary("/echo.Echo/Ping", b'{"text":"gone"}')
        assert "is unreachable" in str(failed.value) and "GOAWAY" not in str(failed.value), failed.value
    finally:
        if pool is not None:
            pool.close()


async def test_refused_connections_linger_for_their_clients_up_to_a_bound_and_the_rest_close_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused gRPC connection stays half-closed (a descriptor) until its client closes or the linger
    timer closes it; only max_lingering do at once: a flood of refused clients that never close costs
    that many descriptors, the others are closed at once."""
    import micro.server.grpc

    monkeypatch.setattr(micro.server.grpc, "REFUSED_LINGER", 3600.0)  # only the test's own close ends them
    limit = ConnectionLimit("service echo", max_connections=1, max_lingering=2)
    async with echo_server(connection_limit=limit) as server:
        held = await RawH2.open(server.port)
        clients: list[RawH2] = []
        try:
            await wait_until(lambda: limit.open == 1)
            clients += [await RawH2.open(server.port) for _ in range(2)]
            await wait_until(lambda: limit.refused == 2)
            assert limit.lingering == 2
            third = await RawH2.open(server.port)
            clients.append(third)
            with anyio.fail_after(10), contextlib.suppress(ConnectionResetError):
                while await third.reader.read(65536):  # closed at once: it does not wait for the timer
                    pass
            assert (limit.refused, limit.lingering) == (3, 2)
            clients[0].close()  # a lingering one whose client closes is released
            await wait_until(lambda: limit.lingering == 1)
            monkeypatch.setattr(micro.server.grpc, "REFUSED_LINGER", 0.0)  # the timer path
            fourth = await RawH2.open(server.port)
            clients.append(fourth)
            await wait_until(lambda: limit.refused == 4)
            with anyio.fail_after(10), contextlib.suppress(ConnectionResetError):
                while await fourth.reader.read(65536):  # the timer closes it although its client does not
                    pass
            await wait_until(lambda: limit.lingering == 1)
        finally:
            for client in [held, *clients]:
                client.close()
    assert limit.lingering == 0  # the server's stop closed the one still lingering


async def test_past_max_connections_a_native_connection_is_refused_with_an_error_frame() -> None:
    limit = ConnectionLimit("service echo", max_connections=1)
    async with native_echo_server(connection_limit=limit) as server:
        first = await HeldFrame.open(server)
        try:
            await wait_until(lambda: limit.open == 1)
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(wire.preface())
            with anyio.fail_after(10):
                sent = await reader.read()  # everything until the server closes
            writer.close()
            (kind, rid, _, _, body, _), = wire.FrameReader(1 << 20).feed(sent)
            assert (kind, rid) == (wire.ERROR, 0)
            assert wire.read_error(body) == (Status.UNAVAILABLE.value, "service echo has 1 connections open, its "
                                             "limit (max_connections): try another node or later")
        finally:
            first.close()


async def test_an_idle_grpc_connection_is_closed_and_a_busy_one_is_not() -> None:
    limit = ConnectionLimit("service echo", idle_timeout=0.05)
    async with echo_server(connection_limit=limit) as server:
        busy = await HeldBodies.open(f"127.0.0.1:{server.port}")
        busy.start(1, 15)  # a call whose body has not all arrived: in flight
        await wait_until(lambda: server.budget.buffered == 15)
        idle = await RawH2.open(server.port)
        await idle.until_closed()  # closed by the sweep, although it was opened after the busy one
        idle.close()
        # the busy connection survived the same sweep: its call completes on it
        busy.conn.send_data(1, b'"text":"done"}', end_stream=True)  # the other 14 of the 15 bytes
        busy.writer.write(busy.conn.data_to_send())
        with anyio.fail_after(10):
            await busy.read_until(lambda: 1 in busy.ended)
        assert busy.statuses() == ["0"]
        busy.close()


async def test_keepalive_pings_close_a_connection_whose_peer_stopped_answering() -> None:
    async with echo_server(keepalive_time=0.05, keepalive_timeout=0.05) as server:
        silent = await HeldBodies.open(f"127.0.0.1:{server.port}")
        silent.start(1, 10)  # a call in flight, then the peer never answers again (a half-open connection)
        events = []
        with anyio.fail_after(10):
            while data := await silent.reader.read(65536):  # read, but never write back the PING ack
                events += silent.conn.receive_data(data)
        assert any(isinstance(e, h2.events.PingReceived) for e in events)
        await wait_until(lambda: server.budget.buffered == 0)  # the call went with the connection
        silent.close()


# -- a backend that is down: NOT_SERVING, /health/ready 503, a line per change, calls fail fast ----


@pytest.fixture
def health_log() -> Iterator[Watch]:
    yield from watching("micro.health")


async def test_while_the_broker_is_down_the_service_is_not_serving_and_not_ready(
        own_nats_server: NatsServer, health_log: Watch) -> None:
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from micro.server.probes import readiness

    server = own_nats_server
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with micro.Runtime(registry="memory://", store="memory://", broker=server.url + "?reconnect_wait=0.05",
                             health_interval=0.05) as rt:
        service = micro.Service("echo", runtime=rt)
        service.handle(Echo())
        async with service, aio.insecure_channel(service.address) as channel:
            updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")).__aiter__()
            with anyio.fail_after(10):
                assert (await anext(updates)).status == serving
                await anyio.to_thread.run_sync(server.stop)
                assert (await anext(updates)).status == not_serving
            (problem,) = await readiness([service])
            assert problem.startswith(f"broker unavailable: cannot deliver: broker {server.url}")
            with pytest.raises(Unavailable, match=f"broker {server.url}"):
                await rt.broker.publish("jobs.created", {"n": 1})  # fails at once, naming the backend
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(server.start)
                assert (await anext(updates)).status == serving
            assert await readiness([service]) == []
    # many checks while it was down, one line each way
    assert len(health_log.seen("broker is unavailable")) == 1
    assert len(health_log.seen("answers again")) == 1


async def test_the_mcp_gateway_follows_the_registry_again_after_its_watch_failed() -> None:
    from mcp import Client

    from micro.gateway.mcp import MCPGateway

    registry = FlakyWatchRegistry(broken=0)
    watched = watching("micro.gateway.mcp")
    log = next(watched)
    try:
        async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
            await wait_until(lambda: registry.watches == 1)  # the runtime's own watch
            registry.broken = 2  # the gateway's is the next
            gateway = MCPGateway(rt)
            async with Client(gateway.server) as client:
                await log.wait_for("the registry watch failed")  # the first watch failed (EMFILE)
                async with client.listen(tools_list_changed=True) as changes:
                    service = micro.Service("late", runtime=rt)
                    service.handle(Echo())
                    async with service:
                        with anyio.fail_after(30):
                            async for _ in changes:
                                if "late_Echo_Ping" in {t.name for t in (await client.list_tools()).tools}:
                                    break
        assert len(log.seen("the registry watch failed")) == 1
    finally:
        next(watched, None)


class Stuck:
    def __init__(self) -> None:
        self.cancelled = anyio.Event()

    async def Wait(self, req: PingRequest) -> PingRequest:
        """Never answers; says when it is cancelled."""
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled.set()
        raise AssertionError("unreachable")


async def test_native_keepalive_pings_close_a_connection_whose_peer_stopped_answering() -> None:
    stuck = Stuck()
    server = NativeServer(max_message_size=1 << 20, keepalive_time=0.05, keepalive_timeout=0.05)
    for ep in endpoints_of(stuck, "stuck"):
        server.add(ep)
    await server.start("127.0.0.1")
    try:
        client = await HeldFrame.open(server)
        client.writer.write(wire.request(1, "/stuck.Stuck/Wait", None, None, b"{}", 0))  # then silence
        got: list[wire.Frame] = []
        with anyio.fail_after(10):
            while data := await client.reader.read(65536):  # read, never answer the PING
                got += client.frames.feed(data)
            await stuck.cancelled.wait()  # the call went with the connection
        client.close()
        assert [(kind, rid) for kind, rid, *_ in got] == [(wire.PING, 0), (wire.ERROR, 0)]
        assert wire.read_error(got[1][4]) == (Status.UNAVAILABLE.value, "no answer to a keepalive PING within 0.05 s")
    finally:
        await server.stop(grace=0)


async def test_native_keepalive_pings_before_it_closes_a_connection_silent_through_a_stall() -> None:
    """A connection with a call in flight that looks silent far past keepalive_time + timeout (the server's
    loop stalled: the peer's data may sit unread) gets a PING first; a peer that answers keeps it."""
    stuck = Stuck()
    server = NativeServer(max_message_size=1 << 20, keepalive_time=2.0, keepalive_timeout=2.0)
    for ep in endpoints_of(stuck, "stuck"):
        server.add(ep)
    await server.start("127.0.0.1")
    try:
        client = await HeldFrame.open(server)
        client.writer.write(wire.request(1, "/stuck.Stuck/Wait", None, None, b"{}", 0))
        with anyio.fail_after(10):
            while not any(c.calls for c in server.connections):
                await anyio.wait_all_tasks_blocked()
            (conn,) = [c for c in server.connections if c.calls]
            conn.last_seen -= 100.0  # as if the loop had not read this connection for 100 s
            kind, rid, *_ = await client.answer()
            assert (kind, rid) == (wire.PING, 0)
            client.writer.write(wire.frame(wire.PONG, 0, b"keepaliv"))
            while conn.pinged_at:  # the answer arrived
                await anyio.wait_all_tasks_blocked()
        assert conn in server.connections and not stuck.cancelled.is_set()
        client.close()
    finally:
        await server.stop(grace=0)


async def test_overlapping_backend_checks_leave_the_listeners_with_the_last_state() -> None:
    """A slow periodic check that began while all was well and a readiness check that saw the broker down
    overlap; the slow one then sees the broker answer. The listeners (the services' gRPC health) must end
    SERVING: they heard 'down' from the fast check, so the slow one tells them 'up' again."""
    from micro.health import Backends
    from micro.store.memory import MemoryStore

    slow_started, release = anyio.Event(), anyio.Event()
    calls = 0

    class Broker:
        url = "nats://broker.example:4222"

        async def check(self) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:  # the slow check: the broker answers, late
                slow_started.set()
                await release.wait()
                return
            if calls == 2:  # the fast one meanwhile: down
                raise ConnectionError("broker down")

    store = MemoryStore()
    async with store:
        rt = type("Rt", (), {"registry": MemoryRegistry(), "store": store, "broker": Broker()})()
        async with rt.registry:
            backends = Backends(rt)  # type: ignore[arg-type]
            told: list[bool] = []
            backends.listeners.add(told.append)
            async with anyio.create_task_group() as tg:
                tg.start_soon(backends.check)
                await slow_started.wait()
                assert await backends.check() == ["broker unavailable: broker nats://broker.example:4222: broker down"]
                release.set()
            assert backends.ok and told == [False, True]
            await backends.check()  # nothing changes: nothing more told
            assert told == [False, True]


class _SlowOnceThenDown:
    """A broker whose checks go: no answer, an answer, no answer twice, an answer."""

    url = "nats://broker.example:4222"

    def __init__(self) -> None:
        self.calls = 0
        self.never = anyio.Event()

    async def check(self) -> None:
        self.calls += 1
        if self.calls in (1, 3, 4):
            await self.never.wait()  # past the check's bound


async def test_one_slow_backend_check_is_slow_not_down_and_two_in_a_row_are_down(
        monkeypatch: pytest.MonkeyPatch, health_log: Watch) -> None:
    import micro.health
    from micro.health import Backends
    from micro.store.memory import MemoryStore

    monkeypatch.setattr(micro.health, "CHECK_TIMEOUT", 0.01)
    store = MemoryStore()
    async with store:
        rt = type("Rt", (), {"registry": MemoryRegistry(), "store": store, "broker": _SlowOnceThenDown()})()
        async with rt.registry:
            backends = Backends(rt)  # type: ignore[arg-type]
            told: list[bool] = []
            backends.listeners.add(told.append)
            assert await backends.check() == [] and backends.ok  # slow once: still serving
            assert health_log.seen("broker was slow: broker nats://broker.example:4222: no answer within 0.01 s")
            assert await backends.check() == []
            assert await backends.check() == []  # slow again, but after an answer: slow, not down
            assert await backends.check() == [
                "broker unavailable: broker nats://broker.example:4222: no answer within 0.01 s"]
            assert await backends.check() == []
    assert told == [False, True]


async def test_a_check_overlapping_a_slow_one_does_not_turn_the_same_stall_into_down() -> None:
    """The 5 s watch's check and a readiness probe's check overlap during one stall: the first to time out
    marks the backend slow; the other, begun before that, is the same episode (slow, not down). A check
    begun after the slow one ended and timing out too is down."""
    from micro.health import Backends
    from micro.store.memory import MemoryStore

    first_waits, second_waits, first_ended = anyio.Event(), anyio.Event(), anyio.Event()
    calls = 0

    class Broker:
        url = "nats://broker.example:4222"

        async def check(self) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:  # the watch's check: no answer (its bound ran out) once the probe's has begun
                first_waits.set()
                await second_waits.wait()
            elif calls == 2:  # the probe's, begun during the same stall: no answer either, after the first
                second_waits.set()
                await first_ended.wait()
            raise TimeoutError

    store = MemoryStore()
    async with store:
        rt = type("Rt", (), {"registry": MemoryRegistry(), "store": store, "broker": Broker()})()
        async with rt.registry:
            backends = Backends(rt)  # type: ignore[arg-type]
            told: list[bool] = []
            backends.listeners.add(told.append)
            answers: list[list[str]] = []

            async def first() -> None:
                answers.append(await backends.check())
                first_ended.set()

            async def second() -> None:
                answers.append(await backends.check())

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await first_waits.wait()
                tg.start_soon(second)
            assert answers == [[], []] and backends.ok and told == []  # one stall: slow, not down
            assert await backends.check() == [  # begun after the slow one ended, no answer either: down
                "broker unavailable: broker nats://broker.example:4222: no answer within 2 s"]
            assert told == [False]


async def test_the_readiness_answer_masks_passwords_in_failing_work() -> None:
    """/health/ready is unauthenticated: a supervised task named after a registry URL with a password (as a
    runtime's is), or failing with an error that quotes one, shows the URL without it."""
    import time

    from micro.health import Backends
    from micro.store.memory import MemoryStore
    from micro.tasks import Failing

    class Broker:
        url = "memory://"

        async def check(self) -> None:
            pass

    store = MemoryStore()
    async with store:
        rt = type("Rt", (), {"registry": MemoryRegistry(), "store": store, "broker": Broker()})()
        async with rt.registry:
            backends = Backends(rt)  # type: ignore[arg-type]
            background = BackgroundTasks("runtime nats://app:s3cret@nats.internal:4222", logging.getLogger("x"))
            background.failing["registry watch"] = Failing(
                time.time(), 2, "ConnectionError('nats://app:s3cret@nats.internal:4222: refused')")
            backends.supervised.add(background)
            (problem,) = await backends.check()
            assert "s3cret" not in problem and "s3cret" not in repr(backends.failing)
            assert problem.startswith("runtime nats://app:***@nats.internal:4222: registry watch: failing since")
            assert "the last: ConnectionError('nats://app:***@nats.internal:4222: refused')" in problem


async def test_a_runtime_names_its_background_work_without_the_registry_password() -> None:
    registry = MemoryRegistry("memory://app:s3cret@registry.internal")
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        (background,) = rt.backends.supervised
        assert background.name == "runtime memory://app:***@registry.internal"


class _WatchBrokenWhile(MemoryRegistry):
    """Every registry watch fails (EMFILE) while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.watches = 0

    def _watch(self) -> Watcher:
        self.watches += 1
        return _BrokenWatcher() if self.broken else super()._watch()


async def test_supervised_work_failing_in_a_row_makes_the_runtime_not_ready_saying_which_and_since_when() -> None:
    from micro.server.probes import readiness

    registry = _WatchBrokenWhile()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        service = micro.Service("echo", runtime=rt)
        service.handle(Echo())
        async with service:
            told: list[bool] = []
            rt.backends.listeners.add(told.append)
            await wait_until(lambda: registry.watches >= 3)  # started a third time: failed twice in a row
            (problem,) = await readiness([service])
            assert re.fullmatch(rf"runtime {re.escape(registry.url)}: registry watch: failing since "
                                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+ failures in a row; the last: "
                                r"OSError\(24, 'Too many open files'\)\)", problem), problem
            assert told == [False]  # the services' gRPC health: NOT_SERVING
    one = FlakyWatchRegistry()  # one failure, then it runs: no streak that counts
    async with micro.Runtime(registry=one, store="memory://", broker="memory://") as rt:
        await wait_until(lambda: one.watches >= 2)
        (background,) = rt.backends.supervised
        assert background.failing["registry watch"].failures == 1
        assert await rt.backends.check() == [] and rt.backends.ok

# -- a server started again under another event loop -------------------------------------------


class Stall:
    async def Wait(self, req: PingRequest) -> PingRequest:
        """Never answers."""
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


def test_a_grpc_server_started_again_under_another_loop_still_times_out_bodies() -> None:
    """Its watchdog's timer belonged to the first loop: armed there for an earlier deadline, it kept a
    later one off the new loop's timer, so bodies that never arrived were held for ever."""
    server = GrpcServer(body_timeout=0.3)
    for ep in endpoints_of(Echo(), "echo"):
        server.add(ep)

    async def held_body(stop_at_once: bool) -> list[str]:
        await server.start("127.0.0.1", 0)
        client = await HeldBodies.open(f"127.0.0.1:{server.port}")
        try:
            client.start(1, 1000)
            if stop_at_once:  # the body's deadline is on the watchdog: stop before it passes
                await wait_until(lambda: server.budget.buffered > 0)
                return []
            with anyio.fail_after(10):
                await client.read_until(lambda: len(client.ended) == 1)
            return client.statuses()
        finally:
            client.close()
            await server.stop(grace=0)

    assert asyncio.run(held_body(stop_at_once=True)) == []
    assert asyncio.run(held_body(stop_at_once=False)) == ["4"]  # DEADLINE_EXCEEDED, on the second loop


def test_a_native_server_started_again_under_another_loop_still_enforces_deadlines() -> None:
    server = NativeServer(max_message_size=1 << 20)
    for ep in endpoints_of(Stall(), "stall"):
        server.add(ep)

    async def stalled_call(timeout_us: int, stop_at_once: bool) -> wire.Frame | None:
        await server.start("127.0.0.1")
        client = await HeldFrame.open(server)
        try:
            client.writer.write(wire.request(1, "/stall.Stall/Wait", timeout_us, None, b"{}", 0))
            if stop_at_once:  # the call's deadline is on the watchdog: stop before it passes
                await wait_until(lambda: server.watchdog.active == 1)
                return None
            with anyio.fail_after(10):
                return await client.answer()
        finally:
            client.close()
            await server.stop(grace=0)

    assert asyncio.run(stalled_call(300_000, stop_at_once=True)) is None
    answer = asyncio.run(stalled_call(400_000, stop_at_once=False))  # a later deadline, on the second loop
    assert answer is not None
    kind, rid, _, _, body, _ = answer
    assert (kind, rid, wire.read_error(body)[0]) == (wire.ERROR, 1, Status.DEADLINE_EXCEEDED.value)


def test_a_runtime_opened_again_under_another_loop_still_times_out_in_process_calls() -> None:
    """The client's watchdog (in-process call deadlines) is made once per runtime: its timer, armed on the
    first loop for an earlier deadline, kept a later one off the second loop's timer, so calls never timed
    out (review finding; one fix in ``Watchdog`` for the client's, the native client's and both servers')."""
    rt = micro.Runtime(registry="memory://", store="memory://", broker="memory://")

    async def call(timeout: float, stall: bool) -> str:
        svc = micro.Service("w", runtime=rt)
        svc.handle(Echo())
        svc.handle(Stall())
        async with rt, svc:
            endpoint = "Stall.Wait" if stall else "Echo.Ping"
            try:
                with anyio.fail_after(10):  # a guard: without the fix the call waits for ever
                    await rt.client.call("w", endpoint, {}, timeout=timeout)
            except micro.errors.Timeout:
                return "timed out"
            return "answered"

    assert asyncio.run(call(0.3, stall=False)) == "answered"  # arms the watchdog on the first loop
    assert asyncio.run(call(0.4, stall=True)) == "timed out"  # a later deadline, on the second loop
