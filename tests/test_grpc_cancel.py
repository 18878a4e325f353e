"""micro's gRPC server cancels a handler the way an anyio cancel scope around it would (as the native wire does).

grpclib ``Task.cancel()``-ed the handler's task on a reset stream (the caller's cancel), on its
``grpc-timeout`` timer and on a stop, cutting a section the handler shields (its clean-up, a store
write). Now the section runs to its end and the handler is cancelled at its next wait after it:
after the caller's ``RST_STREAM``, after the call's deadline (the caller still gets
``DEADLINE_EXCEEDED``), and on a drain past its grace. The calls are made over raw HTTP/2 (h2), so
the test controls exactly what the server sees and when.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import msgspec
import pytest

import micro
from micro import cancel
from micro.errors import Timeout
from micro.registry.memory import MemoryRegistry
from micro.server import grpc as grpc_server


class Echo(msgspec.Struct):
    text: str = ""
    n: int = 0


class Svc:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.release = anyio.Event()
        self.shielded: list[str] = []
        self.runtime: micro.Runtime | None = None  # the node's own, for calls in process
        self.task: asyncio.Task[object] | None = None  # Shield's

    async def Echo(self, req: Echo) -> Echo:
        """Echo."""
        return req

    async def Shield(self, req: Echo) -> Echo:
        """Shields a section (``n`` ms long, or until released), then waits for ever; notes what ran."""
        self.task = asyncio.current_task()
        self.started.set()
        try:
            with anyio.CancelScope(shield=True):
                if req.n:
                    await anyio.sleep(req.n / 1000)
                else:
                    await self.release.wait()
                self.shielded.append("section done")
            await anyio.sleep_forever()
            self.shielded.append("past the cancel")
        finally:
            self.ended.set()
        return req

    async def Outer(self, req: Echo) -> Echo:
        """Calls Inner in process with a 50 ms deadline and falls back on its Timeout; notes what ran."""
        assert self.runtime is not None
        try:
            await self.runtime.client.call("gcancel", "Svc.Inner", {}, timeout=0.05)
        except Timeout:
            self.shielded.append("Timeout")
            await anyio.lowlevel.checkpoint()
            self.shielded.append("ran on after the caller's reset")
        finally:
            self.ended.set()
        return req

    async def Inner(self, req: Echo) -> Echo:
        """A shielded section (until released, then 100 ms more: the caller's deadline passes in it), then a wait."""
        self.started.set()
        with anyio.CancelScope(shield=True):
            await self.release.wait()
            await anyio.sleep(0.1)
        await anyio.sleep_forever()
        return req

    async def Section(self, req: Echo) -> Echo:
        """Only a shielded section (until released), then the answer."""
        self.started.set()
        with anyio.CancelScope(shield=True):
            await self.release.wait()
            self.shielded.append("section done")
        self.ended.set()
        return req


class Node:
    def __init__(self, service: micro.Service, svc: Svc, client: micro.Runtime) -> None:
        self.service, self.svc, self.client = service, svc, client

    async def still_answers(self) -> None:
        with anyio.fail_after(10):
            got = await self.client.client.call("gcancel", "Svc.Echo", {"text": "ok"})
        assert got == {"text": "ok", "n": 0}


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="grpc") as away:
        svc = Svc()
        service = micro.Service("gcancel", runtime=home)
        service.handle(svc)
        svc.runtime = home
        async with service:
            yield Node(service, svc, away)


class Peer:
    """A raw HTTP/2 gRPC client on one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.got: dict[int, dict[str, str]] = {}

    @classmethod
    async def open(cls, node: Node) -> Peer:
        host, _, port = node.service.address.rpartition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def call(self, method: str, body: dict[str, object], timeout: str | None = None) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/gcancel.Svc/{method}"),
                   (":authority", "x"), ("content-type", "application/grpc+json"), ("te", "trailers")]
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        self.conn.send_headers(sid, headers)
        data = msgspec.json.encode(body)
        self.conn.send_data(sid, b"\0" + len(data).to_bytes(4, "big") + data, end_stream=True)
        self.flush()
        return sid

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def until(self, done: type[h2.events.Event]) -> list[h2.events.Event]:
        """Read until an event of type ``done`` or the connection's end; every event read."""
        seen: list[h2.events.Event] = []
        with anyio.fail_after(10):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    return seen
                if not data:
                    return seen
                for ev in self.conn.receive_data(data):
                    seen.append(ev)
                    if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        assert ev.stream_id is not None
                        self.got.setdefault(ev.stream_id, {}).update(dict(ev.headers))
                    elif isinstance(ev, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if isinstance(ev, done):
                        self.flush()
                        return seen
                self.flush()

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def peer(node: Node) -> AsyncIterator[Peer]:
    peer = await Peer.open(node)
    try:
        yield peer
    finally:
        peer.close()


def test_micro_reads_grpclib_s_cancel_internals() -> None:
    """micro replaces grpclib's Task.cancel() of a call where grpclib 0.4 makes it; a grpclib that moved it
    would cut shielded sections again, silently: this says so instead."""
    assert grpc_server._CANCELS


async def test_a_caller_s_reset_lets_a_shielded_section_of_the_handler_finish(node: Node, peer: Peer) -> None:
    """The caller's RST_STREAM cancels the handler as an anyio cancel scope around it would: the section it
    shields runs to its end, then the handler is cancelled at its next wait (Task.cancel() cut the section)."""
    sid = peer.call("Shield", {})
    with anyio.fail_after(10):
        await node.svc.started.wait()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    peer.conn.ping(b"after-rs")
    peer.flush()
    await peer.until(h2.events.PingAckReceived)  # the server handled the reset before it answered the ping
    assert not node.svc.ended.is_set()
    node.svc.release.set()  # the shielded section's wait ends only now
    with anyio.fail_after(10):
        await node.svc.ended.wait()
    assert node.svc.shielded == ["section done"]
    await node.still_answers()


async def test_a_deadline_lets_a_shielded_section_of_the_handler_finish(node: Node, peer: Peer) -> None:
    """The call's grpc-timeout (100 ms) passes inside a 300 ms shielded section: the section ends, then the
    handler is cancelled and the caller gets DEADLINE_EXCEEDED (enforced by the server alone here: the raw
    caller sets no deadline of its own)."""
    sid = peer.call("Shield", {"n": 300}, timeout="100m")
    await peer.until(h2.events.StreamEnded)
    assert node.svc.shielded == ["section done"]
    with anyio.fail_after(10):
        await node.svc.ended.wait()
    assert peer.got[sid]["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert peer.got[sid]["grpc-message"] == "gcancel Svc.Shield: deadline exceeded"
    await node.still_answers()


async def test_a_reset_and_a_deadline_held_by_one_section_both_count(node: Node, peer: Peer) -> None:
    """The caller resets the stream while the handler's in-process call is in its callee's shielded section, and
    that call's deadline passes there too: once the section is done both are delivered, the inner call's watch
    takes back its own, and the caller's reset still cancels the handler (it used to be turned into a Timeout
    the handler caught, running on for a caller that was gone)."""
    sid = peer.call("Outer", {})
    with anyio.fail_after(10):
        await node.svc.started.wait()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    peer.conn.ping(b"after-rs")
    peer.flush()
    await peer.until(h2.events.PingAckReceived)  # the reset is held
    node.svc.release.set()
    with anyio.fail_after(10):
        await node.svc.ended.wait()
    assert node.svc.shielded == []
    await node.still_answers()


async def test_a_micro_caller_past_its_deadline_gets_a_timeout(node: Node) -> None:
    """The same over micro's gRPC client, whose own deadline passes at the same time: the cancellation is held
    back until the section is done, the caller gets a Timeout. The deadline is generous (1 s): a request
    whose DATA the server reads after its deadline would never reach the section."""

    async def call() -> None:
        with pytest.raises(Timeout):
            await node.client.client.call("gcancel", "Svc.Shield", {}, timeout=1.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(10):
            await node.svc.started.wait()
            task = node.svc.task
            assert task is not None
            while not cancel.pending(task):  # noqa: ASYNC110 - the loop's timer passes the deadline
                await anyio.sleep(0.01)
        assert node.svc.shielded == [] and not task.done()  # cancelled, but still in its section
        node.svc.release.set()
    with anyio.fail_after(10):
        await node.svc.ended.wait()
    assert node.svc.shielded == ["section done"]
    await node.still_answers()


async def test_a_drain_past_its_grace_lets_shielded_sections_finish(node: Node, peer: Peer) -> None:
    """stop() with no grace cancels the handler in its 300 ms shielded section: the section ends, then the
    handler stops (stop() waits for it) and the caller's call ends without an OK."""
    sid = peer.call("Shield", {"n": 300})
    with anyio.fail_after(10):
        await node.svc.started.wait()
        await node.service._server.stop(0)
    assert node.svc.shielded == ["section done"]
    assert node.svc.ended.is_set()
    await peer.until(h2.events.StreamEnded)  # or the connection closes
    assert peer.got.get(sid, {}).get("grpc-status") != "0"


async def test_a_stop_cuts_a_shielded_section_that_does_not_end(node: Node, peer: Peer,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """stop() is bounded: a handler whose shielded section never ends gets ``shield_timeout`` after the
    cancel, then is cut with ``Task.cancel()`` (logged), as on the native wire."""
    peer.call("Shield", {})  # never released
    server = node.service._server
    assert server is not None
    server.shield_timeout = 0.05
    with anyio.fail_after(10):
        await node.svc.started.wait()
        await server.stop(0)
    assert node.svc.ended.is_set() and node.svc.shielded == []
    assert ("gRPC server: /gcancel.Svc/Shield: the handler was still in a shielded section 0.05 s after"
            in caplog.text)


async def test_without_grpclib_s_internals_a_reset_still_cancels_the_handler(node: Node, peer: Peer,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback (a grpclib without the internals _CANCELS checks): grpclib's own Task.cancel() stays, so a
    reset still stops the handler, cutting its shielded section as it always did."""
    monkeypatch.setattr(grpc_server, "_CANCELS", False)
    sid = peer.call("Shield", {})
    with anyio.fail_after(10):
        await node.svc.started.wait()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    peer.flush()
    with anyio.fail_after(10):
        await node.svc.ended.wait()
    assert node.svc.shielded == []
    await node.still_answers()


async def test_a_handler_that_answers_right_after_its_section_ends_quietly(node: Node, peer: Peer,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Reset inside a shielded section after which the handler returns at once: its answer has no stream to
    go to, and the call ends as cancelled there (its next wait), with nothing logged as an error."""
    sid = peer.call("Section", {})
    with anyio.fail_after(10):
        await node.svc.started.wait()
    peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    peer.conn.ping(b"after-rs")
    peer.flush()
    await peer.until(h2.events.PingAckReceived)
    tasks = [t for t in asyncio.all_tasks() if "request_handler" in repr(t.get_coro())]
    node.svc.release.set()
    with anyio.fail_after(10):
        await node.svc.ended.wait()
        await asyncio.wait(tasks)
    assert node.svc.shielded == ["section done"]
    assert [t.cancelled() for t in tasks] == [True]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    await node.still_answers()


async def test_calls_reset_in_the_read_that_brought_them_leave_the_connection_usable(node: Node,
                                                                                     peer: Peer) -> None:
    """A request and its RST_STREAM in one write: the call's task is cancelled before its first step, where
    grpclib would release the stream. micro releases it then: its DATA is acknowledged and the connection's
    flow-control window (4 MiB) comes back, so after twice that much in such calls a normal call is answered
    (grpclib left each stream registered, the window ran out and the connection answered nothing)."""
    path = [(":method", "POST"), (":scheme", "http"), (":path", "/gcancel.Svc/Echo"), (":authority", "x"),
            ("content-type", "application/grpc+json"), ("te", "trailers")]
    body = b"\0" + (16100).to_bytes(4, "big") + b"x" * 16000  # more to come: the handler would wait for it
    sent = 0
    while sent < 2 * 4 * 1024 * 1024:
        while peer.conn.outbound_flow_control_window < len(body):
            await peer.until(h2.events.WindowUpdated)  # the server acknowledged some
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, path)
        peer.conn.send_data(sid, body)
        peer.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        peer.flush()
        sent += len(body)
    sid = peer.call("Echo", {"text": "ok"})
    with anyio.fail_after(10):
        while "grpc-status" not in peer.got.get(sid, {}):
            assert await peer.until(h2.events.StreamEnded), "the connection closed"
    assert peer.got[sid]["grpc-status"] == "0"


async def test_a_call_without_grpc_timeout_has_no_deadline_from_where_the_server_started() -> None:
    """A server started from a task that carries a call's deadline (a gRPC handler that starts a service): its
    calls without ``grpc-timeout`` have no deadline, not that one (which has passed here)."""
    registry = MemoryRegistry()
    token = grpc_server._DEADLINE.set(asyncio.get_running_loop().time() - 1)
    try:
        async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home:
            svc = Svc()
            service = micro.Service("gcancel", runtime=home)
            service.handle(svc)
            async with service:
                grpc_server._DEADLINE.reset(token)
                peer = await Peer.open(Node(service, svc, home))
                try:
                    sid = peer.call("Section", {"text": "ok"})
                    with anyio.fail_after(10):
                        await svc.started.wait()
                        svc.release.set()
                        while "grpc-status" not in peer.got.get(sid, {}):
                            assert await peer.until(h2.events.StreamEnded), "the connection closed"
                finally:
                    peer.close()
    finally:
        if grpc_server._DEADLINE.get() is not None:
            grpc_server._DEADLINE.reset(token)
    assert peer.got[sid]["grpc-status"] == "0"
