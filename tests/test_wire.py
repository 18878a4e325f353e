"""micro's native wire: the frame parser, and a node facing peers that break the rules.

The parser is fuzzed with hypothesis (arbitrary bytes in arbitrary chunks; valid frames
split anywhere). The rest talks to a real service over raw sockets: a peer that closes
mid-frame, announces a body over the limit, sends an unknown kind, reuses a request id,
speaks another version or another protocol, or goes silent; and a client facing a
server that sends items after the end or stops answering. Each case checks that the
node answers the next, well-behaved caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import strategies as st
from test_cancel import CancelTimers
from test_fuzz_kit import CASES, Host, Seed, error_log, fuzz

import micro
from micro import cancel, eventloop
from micro.broker.local import SERVICE as BROKER_SERVICE
from micro.client.native import NativePool
from micro.client.pool import NodeUnreachable
from micro.errors import BadRequest, ResourceExhausted, Status, Timeout, Unavailable
from micro.registry.memory import MemoryRegistry
from micro.wire import frames as f
from micro.wire import unix
from micro.wire.server import DRAINING, NativeServer

LIMIT = 64 * 1024


# -- the parser -------------------------------------------------------------------------------


def test_frames_round_trip_through_any_split() -> None:
    wire = b"".join([
        f.request(1, "/svc.H/M", 1_000_000, {"authorization": "Bearer t"}, b'{"a":1}', f.PROTO),
        f.frame(f.CANCEL, 1),
        f.frame(f.CREDIT, 7, aux=8),
        f.error(3, 14, "gone"),
        f.frame(f.PING, 0, b"12345678"),
    ])
    whole = f.FrameReader(LIMIT).feed(wire)
    assert [(k, rid) for k, rid, *_ in whole] == [(f.REQUEST, 1), (f.CANCEL, 1), (f.CREDIT, 7), (f.ERROR, 3),
                                                 (f.PING, 0)]
    head_len = whole[0][3]
    assert f.read_head(whole[0][4][:head_len]) == ("/svc.H/M", 1_000_000, {"authorization": "Bearer t"})
    assert whole[0][4][head_len:] == b'{"a":1}'
    assert f.read_error(whole[3][4]) == (14, "gone")
    for cut in range(1, len(wire)):  # every split point gives the same frames
        reader = f.FrameReader(LIMIT)
        assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == whole
        assert reader.buffered == 0
    reader = f.FrameReader(LIMIT)
    assert [fr for b in wire for fr in reader.feed(bytes([b]))] == whole  # one byte at a time


def test_an_oversize_payload_is_reported_from_its_header_and_skipped_unread() -> None:
    reader = f.FrameReader(100)
    head = msgspec.msgpack.encode(("/svc.H/M", None, None))
    big = f.HEADER.pack(len(head) + 3_000_000_000, 5, f.REQUEST, 0, len(head)) + head  # 3 GB announced
    (frame,) = reader.feed(big + b"x" * 1000)
    kind, rid, flags, _aux, body, length = frame
    assert (kind, rid, flags & f.OVERSIZE, body, length) == (f.REQUEST, 5, f.OVERSIZE, head, len(head) + 3_000_000_000)
    assert reader.buffered == 3_000_000_000 - 1000  # to skip, none of it kept
    reader = f.FrameReader(100)
    small = f.frame(f.RESPONSE, 9, b"ok")
    out = reader.feed(f.frame(f.RESPONSE, 8, b"y" * 101) + small)
    assert [(k, rid, fl & f.OVERSIZE, b) for k, rid, fl, _, b, _ in out] == [(f.RESPONSE, 8, f.OVERSIZE, b""),
                                                                          (f.RESPONSE, 9, 0, b"ok")]


@pytest.mark.parametrize(("data", "needle"), [
    (f.HEADER.pack(0, 1, 42, 0, 0), "unknown frame kind 42"),
    (f.HEADER.pack(0, 1, 0, 0, 0), "unknown frame kind 0"),
    (f.HEADER.pack(4, 1, f.REQUEST, 0, 9) + b"abcd", "head of 9 bytes is longer than its body of 4"),
    (f.HEADER.pack(0, 1, f.END, f.OVERSIZE, 0), "flag 0x80 is reserved"),
])
def test_bytes_that_are_not_the_wire_are_a_protocol_error(data: bytes, needle: str) -> None:
    with pytest.raises(f.ProtocolError, match=needle):
        f.FrameReader(LIMIT).feed(data)


def test_the_preface_names_the_version() -> None:
    assert f.read_preface(f.preface()) == f.VERSION
    assert f.read_preface(f.preface(7)) == 7
    with pytest.raises(f.ProtocolError, match="gRPC or HTTP port"):
        f.read_preface(b"PRI * HTTP/2.0"[:8])


def _frames_from(seed: Seed) -> list[bytes]:
    """Valid frames read off a seed: requests with heads and payloads, and every other kind."""
    out: list[bytes] = []
    for _ in range(seed.byte() % 5):
        rid = int.from_bytes(seed.take(4).ljust(4, b"\0"), "big")
        if seed.byte() % 2:
            md = {seed.text(4): seed.text(6)} if seed.byte() % 2 else None
            timeout = None if seed.byte() % 3 == 0 else seed.byte() * 1000
            out.append(f.request(rid, seed.text(16), timeout, md, seed.take(seed.byte() % 40),
                                 seed.pick([0, f.PROTO, f.STREAM, f.PROTO | f.STREAM])))
        else:
            kind = seed.pick(sorted(f.KINDS - {f.REQUEST}))
            out.append(f.frame(kind, rid, seed.take(seed.byte() % 40), aux=seed.byte()))
    return out


def _cuts(seed: Seed, size: int) -> list[int]:
    return sorted({seed.byte() * 7 % (size + 1) for _ in range(seed.byte() % 5)} | {size})


def _parse_case(case: tuple[int, bytes]) -> None:
    how, data = case
    seed = Seed(data)
    limit = 64
    if how == 0:  # arbitrary bytes
        stream = seed.rest()
    else:  # valid frames, split anywhere; or with one byte changed
        frames = _frames_from(seed)
        stream = b"".join(frames)
        if how == 2 and stream:
            at = seed.byte() * 5 % len(stream)
            stream = stream[:at] + bytes([seed.byte()]) + stream[at + 1:]
        if how == 1:
            limit = 1 << 20
            whole = f.FrameReader(limit).feed(stream)
            assert len(whole) == len(frames)
    reader = f.FrameReader(limit)
    got: list[f.Frame] = []
    pos = 0
    try:
        for cut in _cuts(seed, len(stream)):
            for frame in reader.feed(stream[pos:cut]):
                kind, _rid, flags, aux, body, length = frame
                assert kind in f.KINDS
                if flags & f.OVERSIZE:
                    assert length - (aux if kind == f.REQUEST else 0) > limit
                else:
                    assert len(body) == length
                got.append(frame)
            pos = cut
            # what is kept is at most one header, one head and one payload under the limit (skips are counted)
            assert len(reader._buf) <= f.HEADER_SIZE + f.MAX_HEAD + limit
    except f.ProtocolError:
        assert how != 1, "valid frames were refused"
        return
    if how == 1:
        assert got == whole and reader.buffered == 0


@pytest.mark.fuzz
def test_fuzz_the_frame_parser() -> None:
    """10,000 cases: arbitrary bytes, valid frames, and valid frames with a byte changed, each fed in
    arbitrary chunks: frames (the same as fed whole) or a ProtocolError, and never more buffered than one
    frame under the limit needs."""
    ran = fuzz(st.tuples(st.integers(0, 2), st.binary(max_size=160)), _parse_case)
    assert ran == CASES


# -- a node facing a misbehaving peer ---------------------------------------------------------


class Echo(msgspec.Struct):
    text: str = ""
    n: int = 0


class Svc:
    def __init__(self) -> None:
        self.produced = 0
        self.echoes = 0
        self.slow_started = anyio.Event()
        self.slow_ended = anyio.Event()
        self.release = anyio.Event()
        self.shielded: list[str] = []
        self.task: asyncio.Task[Any] | None = None  # Shield's

    async def Echo(self, req: Echo) -> Echo:
        """Echo."""
        self.echoes += 1
        return req

    async def Hold(self, req: Echo) -> Echo:
        """Answer once released."""
        self.slow_started.set()
        await self.release.wait()
        return req

    async def Slow(self, req: Echo) -> Echo:
        """Never answers; says when it stops."""
        self.slow_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.slow_ended.set()
        raise AssertionError("unreachable")

    async def Shield(self, req: Echo) -> Echo:
        """Shields a section (``n`` ms long, or until released), then waits for ever; notes what ran."""
        self.task = asyncio.current_task()
        self.slow_started.set()
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
            self.slow_ended.set()
        return req

    async def Brief(self, req: Echo) -> Echo:
        """Shields a section of ``n`` ms, then returns at once (no wait after it where a cancel would land)."""
        with anyio.CancelScope(shield=True):
            await anyio.sleep(req.n / 1000)
        self.shielded.append("brief done")
        return req

    async def Count(self, req: Echo) -> AsyncIterator[Echo]:
        """``n`` items, counting what it produced."""
        for i in range(req.n):
            self.produced += 1
            yield Echo(str(i), i)


class Node:
    def __init__(self, service: micro.Service, svc: Svc, client: micro.Runtime) -> None:
        self.service, self.svc, self.client = service, svc, client
        self.peers: list[Peer] = []
        host, _, port = service.record.nodes[0].metadata["native"].rpartition(":")
        self.host, self.port = host, int(port)

    @property
    def native(self) -> NativeServer:
        server = self.service._native
        assert server is not None
        return server

    async def still_answers(self) -> None:
        with anyio.fail_after(10):
            got = await self.client.client.call("wire", "Svc.Echo", {"text": "ok"})
        assert got == {"text": "ok", "n": 0}


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        svc = Svc()
        service = micro.Service("wire", runtime=home, max_message_size=LIMIT)
        service.handle(svc)
        async with service:
            node = Node(service, svc, away)
            try:
                yield node
            finally:
                for peer in node.peers:
                    peer.close()
                    with anyio.move_on_after(5):
                        await peer.writer.wait_closed()


class Peer:
    """A raw connection to the native port, speaking frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = f.FrameReader(1 << 22)
        self.pending: list[f.Frame] = []

    @classmethod
    async def open(cls, node: Node, *, greet: bool = True) -> Peer:
        reader, writer = await asyncio.open_connection(node.host, node.port)
        peer = cls(reader, writer)
        node.peers.append(peer)
        if greet:
            writer.write(f.preface())
            assert f.read_preface(await reader.readexactly(f.PREFACE_SIZE)) == f.VERSION
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def call(self, rid: int, path: str, body: Any, *, flags: int = 0, timeout_us: int | None = 10_000_000) -> None:
        self.send(f.request(rid, path, timeout_us, None, msgspec.json.encode(body), flags))

    async def next(self) -> f.Frame:
        with anyio.fail_after(10):
            while not self.pending:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the node closed the connection")
                self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    async def closed(self) -> bytes:
        """What the node sent before closing the connection (fails if it stays open)."""
        with anyio.fail_after(10):
            return await self.reader.read()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


async def test_a_peer_that_closes_mid_frame_harms_no_one(node: Node) -> None:
    peer = await Peer.open(node)
    whole = f.request(1, "/wire.Svc/Echo", None, None, b'{"text": "half"}', 0)
    peer.send(whole[: len(whole) // 2])
    await peer.writer.drain()
    peer.close()
    await node.still_answers()
    with anyio.fail_after(10):
        while len(node.native.connections) > 1:  # the broken connection is gone; the client's stays
            await anyio.wait_all_tasks_blocked()


async def test_a_body_over_the_limit_is_refused_from_its_length_prefix(node: Node) -> None:
    peer = await Peer.open(node)
    head = msgspec.msgpack.encode(("/wire.Svc/Echo", 10_000_000, None))
    peer.send(f.HEADER.pack(len(head) + 2_000_000_000, 1, f.REQUEST, 0, len(head)) + head)  # 2 GB, never sent
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid) == (f.ERROR, 1)
    assert f.read_error(body) == (Status.RESOURCE_EXHAUSTED.value, "wire Svc.Echo: request of 2000000000 bytes "
                                  "is over the service's 65536-byte limit")
    peer.close()
    # a body over the limit that does arrive is skipped, and the same connection goes on
    peer = await Peer.open(node)
    peer.send(f.request(1, "/wire.Svc/Echo", None, None, b" " * (LIMIT + 1), 0))
    peer.call(2, "/wire.Svc/Echo", {"text": "after"})
    (k1, r1, *_), (k2, r2, _, _, body, _) = await peer.next(), await peer.next()
    assert (k1, r1, k2, r2) == (f.ERROR, 1, f.RESPONSE, 2)
    assert msgspec.json.decode(body) == {"text": "after", "n": 0}
    peer.close()
    await node.still_answers()


async def test_an_unknown_frame_kind_closes_that_connection_only(node: Node) -> None:
    peer = await Peer.open(node)
    peer.send(f.HEADER.pack(0, 1, 99, 0, 0))
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid) == (f.ERROR, 0)
    assert "unknown frame kind 99" in f.read_error(body)[1]
    assert await peer.closed() == b""
    await node.still_answers()


async def test_a_request_id_reused_while_in_flight_closes_that_connection(node: Node) -> None:
    peer = await Peer.open(node)
    peer.call(7, "/wire.Svc/Slow", {})
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    peer.call(7, "/wire.Svc/Echo", {})
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid) == (f.ERROR, 0)
    assert "request id 7 was reused while its call is in flight" in f.read_error(body)[1]
    assert await peer.closed() == b""
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()  # the handler of the closed connection's call was stopped
    await node.still_answers()


async def test_a_request_id_may_be_used_again_once_its_call_ended(node: Node) -> None:
    peer = await Peer.open(node)
    for text in ("one", "two"):
        peer.call(3, "/wire.Svc/Echo", {"text": text})
        kind, rid, _, _, body, _ = await peer.next()
        assert (kind, rid, msgspec.json.decode(body)["text"]) == (f.RESPONSE, 3, text)
    peer.close()


async def test_another_wire_version_is_refused_with_a_clear_error(node: Node) -> None:
    peer = await Peer.open(node, greet=False)
    peer.send(f.preface(f.VERSION + 1))
    kind, rid, _, _, body, _ = await peer.next()
    status, message = f.read_error(body)
    assert (kind, rid, status) == (f.ERROR, 0, Status.FAILED_PRECONDITION.value)
    assert f"the client speaks micro wire version {f.VERSION + 1}; this node speaks version {f.VERSION}" in message
    assert await peer.closed() == b""


async def test_another_protocol_on_the_native_port_is_closed(node: Node) -> None:
    peer = await Peer.open(node, greet=False)
    peer.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert await peer.closed() == b""
    await node.still_answers()


async def test_frames_a_client_never_sends_close_the_connection(node: Node) -> None:
    peer = await Peer.open(node)
    peer.send(f.frame(f.RESPONSE, 1, b"{}"))
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid) == (f.ERROR, 0) and "a client does not send RESPONSE frames" in f.read_error(body)[1]
    await node.still_answers()


async def test_ping_is_answered_and_unknown_cancels_and_credits_are_ignored(node: Node) -> None:
    peer = await Peer.open(node)
    peer.send(f.frame(f.CANCEL, 42) + f.frame(f.CREDIT, 43, aux=5) + f.frame(f.PING, 0, b"abc"))
    assert (await peer.next())[:2] == (f.PONG, 0)
    peer.call(1, "/wire.Svc/Echo", {"text": "x"})
    assert (await peer.next())[:2] == (f.RESPONSE, 1)
    peer.close()


async def test_the_server_enforces_the_deadline_it_was_sent(node: Node) -> None:
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Slow", {}, timeout_us=100_000)  # 0.1 s; this peer never cancels
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid) == (f.ERROR, 1)
    assert f.read_error(body) == (Status.DEADLINE_EXCEEDED.value, "wire Svc.Slow: deadline exceeded")
    assert node.svc.slow_ended.is_set()
    peer.call(2, "/wire.Svc/Echo", {}, timeout_us=500)  # under 1 ms left on arrival: refused before it runs
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid, f.read_error(body)[0]) == (f.ERROR, 2, Status.DEADLINE_EXCEEDED.value)
    peer.close()


async def test_a_cancel_frame_stops_the_handler(node: Node) -> None:
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Slow", {})
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    peer.send(f.frame(f.CANCEL, 1))
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    peer.close()


async def test_a_cancelled_caller_cancels_the_handler(node: Node) -> None:
    async def call() -> None:
        await node.client.client.call("wire", "Svc.Slow", {})

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(10):
            await node.svc.slow_started.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    await node.still_answers()


async def test_a_cancel_lets_a_shielded_section_of_the_handler_finish(node: Node) -> None:
    """A caller's CANCEL cancels the handler as an anyio cancel scope around it would: a section it shields
    (its clean-up, a store write) runs to its end, and the handler is cancelled at its next wait after it
    (``Task.cancel()`` cut the section at once)."""
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Shield", {})
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    peer.send(f.frame(f.CANCEL, 1) + f.frame(f.PING, 0, b"after"))
    assert (await peer.next())[:2] == (f.PONG, 0)  # the CANCEL before it was handled
    assert not node.svc.slow_ended.is_set()
    node.svc.release.set()  # the shielded section's wait ends only now
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    assert node.svc.shielded == ["section done"]
    await anyio.wait_all_tasks_blocked()
    assert all(not c.calls for c in node.native.connections)
    await node.still_answers()


async def test_a_flood_of_cancels_for_a_call_in_a_shield_holds_one_timer(node: Node,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 CANCELs for one call inside a shielded section hold its cancellation once (one timer looking at
    the task, not one retry chain per frame, which starved the loop); it is delivered after the section."""
    timers = CancelTimers(asyncio.get_running_loop(), monkeypatch)
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Shield", {})
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    peer.send(f.frame(f.CANCEL, 1) * 2000 + f.frame(f.PING, 0, b"after"))
    assert (await peer.next())[:2] == (f.PONG, 0)  # the CANCELs before it were handled
    task = node.svc.task
    assert task is not None and cancel.pending(task)
    assert timers.outstanding() == 1
    node.svc.release.set()
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    assert node.svc.shielded == ["section done"]
    await anyio.wait_all_tasks_blocked()
    assert timers.outstanding() == 0 and all(not c.calls for c in node.native.connections)
    await node.still_answers()


async def test_a_stop_cuts_a_shielded_section_that_does_not_end(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """stop() is bounded: a handler whose shielded section never ends gets ``shield_timeout`` after the
    cancel, then is cut with ``Task.cancel()``, logged with the call's name; the caller is told."""
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Shield", {}, timeout_us=None)  # never released
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    node.native.shield_timeout = 0.05
    with anyio.fail_after(10):
        await node.native.stop(0)
    task = node.svc.task
    assert task is not None and task.done() and not cancel.pending(task)
    assert node.svc.slow_ended.is_set() and node.svc.shielded == []
    assert "wire Svc.Shield: the handler was still in a shielded section 0.05 s after" in caplog.text
    frames = [await peer.next(), await peer.next()]
    assert [(k, rid) for k, rid, *_ in frames] == [(f.GOAWAY, 0), (f.ERROR, 1)]
    assert f.read_error(frames[1][4])[0] == Status.UNAVAILABLE.value


async def test_the_calls_of_a_lost_connection_are_stopped_with_the_server(node: Node) -> None:
    """A lost connection's calls are cancelled (after their shielded sections), and the server owns their
    tasks until they end: stop() waits for them (cutting a section past its bound), none outlives it."""
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Shield", {}, timeout_us=None)  # never released
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
    task = node.svc.task
    assert task is not None
    peer.close()
    with anyio.fail_after(10):
        while node.native.connections:  # noqa: ASYNC110 - the node's transport reports the lost connection
            await anyio.sleep(0.001)
    assert cancel.pending(task) and len(node.native.lost) == 1  # held back by the shield, still owned
    node.native.shield_timeout = 0.05
    with anyio.fail_after(10):
        await node.native.stop(0)
    assert task.done() and node.svc.slow_ended.is_set() and node.svc.shielded == []
    assert not cancel.pending(task) and not node.native.lost


async def test_a_deadline_lets_a_shielded_section_of_the_handler_finish(node: Node) -> None:
    """In process, a deadline that passes while the handler is in a shielded section (300 ms, deadline
    100 ms) cancels it once the section is done; the caller gets ``Timeout``."""
    with pytest.raises(Timeout, match="deadline exceeded"):
        await node.service.runtime.client.call("wire", "Svc.Shield", {"n": 300}, timeout=0.1)
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    assert node.svc.shielded == ["section done"]
    await node.still_answers()


async def test_a_deadline_on_the_native_server_lets_a_shielded_section_finish(node: Node) -> None:
    """Over the native wire, the call's deadline (or the client's CANCEL after its own) passing while the
    handler is in a shielded section is held back until the section is done; the caller gets ``Timeout``.
    The deadline is generous (1 s): a request that arrived with under 1 ms of it left is refused unrun."""

    async def call() -> None:
        with pytest.raises(Timeout, match="deadline exceeded"):
            await node.client.client.call("wire", "Svc.Shield", {}, timeout=1.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(10):
            await node.svc.slow_started.wait()
            task = node.svc.task
            assert task is not None
            while not cancel.pending(task):  # noqa: ASYNC110 - the loop's timer passes the deadline
                await anyio.sleep(0.01)
        assert node.svc.shielded == [] and not task.done()  # cancelled, but still in its section
        node.svc.release.set()
    with anyio.fail_after(10):
        await node.svc.slow_ended.wait()
    assert node.svc.shielded == ["section done"]
    await node.still_answers()


@pytest.mark.parametrize("path", ["native", "in-process"])
async def test_a_call_whose_deadline_passed_in_a_shield_is_a_timeout_though_it_returns(node: Node,
                                                                                         path: str) -> None:
    """A handler whose deadline passes in its shielded section (300 ms, deadline 100 ms) and that returns
    right after it (before its held cancellation is delivered) still fails the call with ``Timeout``: in
    process as over the native wire, where the server answers DEADLINE_EXCEEDED, not the result (a raw peer,
    which enforces no deadline of its own, reads what the server sent)."""
    if path == "native":
        peer = await Peer.open(node)
        peer.call(1, "/wire.Svc/Brief", {"n": 300}, timeout_us=100_000)
        kind, rid, _, _, body, _ = await peer.next()
        assert (kind, rid) == (f.ERROR, 1)
        assert f.read_error(body) == (Status.DEADLINE_EXCEEDED.value, "wire Svc.Brief: deadline exceeded")
    else:
        with pytest.raises(Timeout, match="deadline exceeded"):
            await node.service.runtime.client.call("wire", "Svc.Brief", {"n": 300}, timeout=0.1)
    assert node.svc.shielded == ["brief done"]  # the answer came at the end of the section
    await node.still_answers()


async def test_a_drain_past_its_grace_lets_shielded_sections_finish(node: Node) -> None:
    """stop() with no grace cancels the handler in its 300 ms shielded section: the section ends, then the
    handler stops and the caller is told the node dropped the call."""
    peer = await Peer.open(node)
    peer.call(1, "/wire.Svc/Shield", {"n": 300}, timeout_us=None)
    with anyio.fail_after(10):
        await node.svc.slow_started.wait()
        await node.native.stop(0)
    assert node.svc.shielded == ["section done"]
    assert node.svc.slow_ended.is_set()
    frames = [await peer.next(), await peer.next()]
    assert [(k, rid) for k, rid, *_ in frames] == [(f.GOAWAY, 0), (f.ERROR, 1)]
    assert f.read_error(frames[1][4])[0] == Status.UNAVAILABLE.value


async def test_malformed_heads_and_unknown_paths_get_statuses(node: Node) -> None:
    peer = await Peer.open(node)
    head = b"\xc1"  # msgpack's never-used byte
    peer.send(f.HEADER.pack(len(head), 1, f.REQUEST, 0, len(head)) + head)
    peer.call(2, "/wire.Svc/Nope", {})
    peer.call(3, "/wire.Svc/Echo", {}, flags=f.PROTO)  # a msgspec endpoint has no protobuf form
    peer.call(4, "/wire.Svc/Count", {"n": 1})  # a streaming endpoint called as unary
    head = b"\x93\xa1\x80\xc0\xc0"  # [path, nil, nil] with a path that is not UTF-8 (found by fuzzing)
    peer.send(f.HEADER.pack(len(head), 5, f.REQUEST, 0, len(head)) + head)
    got = {}
    for _ in range(5):
        kind, rid, _, _, body, _ = await peer.next()
        assert kind == f.ERROR
        got[rid] = f.read_error(body)
    assert got[1][0] == Status.INVALID_ARGUMENT.value and "malformed request head" in got[1][1]
    assert got[2] == (Status.UNIMPLEMENTED.value, "unknown method /wire.Svc/Nope")
    # a msgspec endpoint has a protobuf form too (the .proto micro derives): JSON bytes are not a valid message of it
    assert got[3][0] == Status.INVALID_ARGUMENT.value and "wire Svc" in got[3][1]
    assert got[4] == (Status.INVALID_ARGUMENT.value, "wire Svc.Count: call it with client.stream()")
    assert got[5][0] == Status.INVALID_ARGUMENT.value and "malformed request head" in got[5][1]
    peer.close()


async def test_a_slow_reader_holds_the_stream_back(node: Node) -> None:
    """A consumer that stops reading: the server produces at most the credit window ahead of it."""
    items = node.client.client.stream("wire", "Svc.Count", {"n": 10_000})
    got = [await anext(items)]  # type: ignore[call-overload]
    await anyio.wait_all_tasks_blocked()  # everything the server could do without credit, it did
    assert node.svc.produced <= 1 + f.STREAM_WINDOW + 1
    async for item in items:  # type: ignore[attr-defined]
        got.append(item)
    assert [g["n"] for g in got] == list(range(10_000))


async def test_an_idle_connection_is_closed_by_the_server() -> None:
    server = NativeServer(max_message_size=LIMIT, idle_timeout=0.05)
    await server.start("127.0.0.1")
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f.preface())
        try:
            with anyio.fail_after(10):
                assert await reader.read() == f.preface()  # greeted, then silent with nothing in flight: closed
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await server.stop()


async def test_a_draining_node_finishes_its_calls_and_sends_new_ones_elsewhere() -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as a, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as b, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as caller:
        svcs = [Svc(), Svc()]
        services = [micro.Service("wire", runtime=rt, drain_timeout=30) for rt in (a, b)]
        for service, svc in zip(services, svcs, strict=True):
            service.handle(svc)
        async with services[0], services[1]:
            for _ in range(4):  # a connection to each node
                await caller.client.call("wire", "Svc.Echo", {})
            held: list[Any] = []

            async def hold() -> None:
                held.append(await caller.client.call("wire", "Svc.Hold", {"text": "held"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                with anyio.fail_after(10):
                    while not any(s.slow_started.is_set() for s in svcs):
                        await anyio.wait_all_tasks_blocked()
                x = 0 if svcs[0].slow_started.is_set() else 1
                draining, other = services[x], services[1 - x]
                native = draining._native
                assert native is not None
                reader, writer = await asyncio.open_connection(native.host, native.port)
                writer.write(f.preface())
                await reader.readexactly(f.PREFACE_SIZE)
                # (taken now: once the node leaves the registry the client drops its pool)
                pool = caller.client.channel(draining.record.nodes[0])
                tg.start_soon(draining.stop)
                with anyio.fail_after(10):
                    while not native.closing:
                        await anyio.wait_all_tasks_blocked()
                # a call sent to the draining node on a connection opened before is refused, not run
                before = svcs[x].echoes
                writer.write(f.request(1, "/wire.Svc/Echo", None, None, b"{}", 0))
                frames = f.FrameReader(LIMIT)
                got: list[f.Frame] = []
                with anyio.fail_after(10):
                    while len(got) < 2:
                        got += frames.feed(await reader.read(65536))
                writer.close()
                assert [g[:2] for g in got] == [(f.GOAWAY, 0), (f.ERROR, 1)]
                assert f.read_error(got[1][4]) == (Status.UNAVAILABLE.value, DRAINING)
                # the client's pool takes that as "try another node"
                with pytest.raises(NodeUnreachable):
                    await pool.unary("/wire.Svc/Echo", b"{}")
                # and calls through the client go to the other node
                for _ in range(6):
                    assert await caller.client.call("wire", "Svc.Echo", {"text": "e"}) == {"text": "e", "n": 0}
                assert svcs[x].echoes == before
                assert svcs[1 - x].echoes >= 6
                assert other._native is not None and not other._native.closing
                svcs[x].release.set()  # the call in flight on the draining node finishes
            assert held == [{"text": "held", "n": 0}]


async def test_a_request_on_its_way_when_the_goaway_left_is_answered_not_cut_off() -> None:
    """A draining server closes a connection once its client has (or at the end of the drain time), not at
    once: a request the client sent before it read the GOAWAY is answered "shutting down" (nothing ran: try
    another node) instead of meeting a reset the client cannot tell from a call that ran (a failed call
    during a `micro run --reload` swap)."""
    server = NativeServer(max_message_size=LIMIT)
    await server.start("127.0.0.1")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(f.preface())
    await reader.readexactly(f.PREFACE_SIZE)
    stopping = asyncio.ensure_future(server.stop(grace=60))
    frames = f.FrameReader(LIMIT)
    got: list[f.Frame] = []
    try:
        with anyio.fail_after(10):
            while not got:
                got += frames.feed(await reader.read(65536))
            assert [g[:2] for g in got] == [(f.GOAWAY, 0)]
            writer.write(f.request(1, "/wire.Svc/Echo", None, None, b"{}", 0))  # already on its way
            while len(got) < 2:
                data = await reader.read(65536)
                assert data, "the server closed the connection with a request on its way"
                got += frames.feed(data)
        assert got[1][:2] == (f.ERROR, 1)
        assert f.read_error(got[1][4]) == (Status.UNAVAILABLE.value, DRAINING)
        assert not stopping.done()  # the connection is open: the server waits for its client
    finally:
        writer.close()
    with anyio.fail_after(10):
        await stopping  # the client closed: the stop does not wait out its 60 s


async def test_a_connection_greeted_while_draining_gets_the_preface_then_the_goaway() -> None:
    server = NativeServer(max_message_size=LIMIT)
    await server.start("127.0.0.1")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        with anyio.fail_after(10):
            while not server.connections:  # accepted, not greeted yet
                await anyio.wait_all_tasks_blocked()
            stopping = asyncio.ensure_future(server.stop(grace=60))
            while not server.closing:
                await anyio.wait_all_tasks_blocked()
            writer.write(f.preface())
            assert await reader.readexactly(f.PREFACE_SIZE) == f.preface()  # not a GOAWAY read as a preface
            frames = f.FrameReader(LIMIT)
            got: list[f.Frame] = []
            while not got:
                got += frames.feed(await reader.read(65536))
            assert [g[:2] for g in got] == [(f.GOAWAY, 0)]
    finally:
        writer.close()
    with anyio.fail_after(10):
        await stopping


async def test_a_client_closes_its_connection_to_a_draining_node_once_its_calls_are_answered() -> None:
    server = NativeServer(max_message_size=LIMIT)
    await server.start("127.0.0.1")
    pool = NativePool(f"{server.host}:{server.port}")
    try:
        with pytest.raises(Exception, match=r"unknown method /x\.Y/Z"):
            await pool.unary("/x.Y/Z", b"{}")  # a connection is open, and idle
        assert len(pool._conns) == 1
        with anyio.fail_after(10):
            await server.stop(grace=60)  # ends once the client closed its connection after the GOAWAY
        assert pool._conns == []
    finally:
        pool.close()


# -- a client facing a misbehaving server -----------------------------------------------------


class FakeNode:
    """A server that speaks the wire by hand: ``script(frame, writer)`` answers each frame it receives."""

    def __init__(self, script: Any, preface: bytes = f.preface()) -> None:
        self.script, self.preface = script, preface
        self.server: asyncio.Server | None = None
        self.address = ""
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeNode:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            await reader.readexactly(f.PREFACE_SIZE)
            writer.write(self.preface)
            frames = f.FrameReader(1 << 20)
            while data := await reader.read(65536):
                for frame in frames.feed(data):
                    self.script(frame, writer)
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def _stream_then_garbage(frame: f.Frame, writer: asyncio.StreamWriter) -> None:
    kind, rid, flags, *_ = frame
    if kind != f.REQUEST:
        return
    if flags & f.STREAM:
        writer.write(f.frame(f.ITEM, rid, b'{"n": 1}') + f.frame(f.END, rid) + f.frame(f.ITEM, rid, b'{"n": 2}'))
    else:
        writer.write(f.frame(f.RESPONSE, rid + 1000, b'{"n": 0}')  # a reply to a call that does not exist
                     + f.frame(f.RESPONSE, rid, b'{"n": 3}') + f.frame(f.RESPONSE, rid, b'{"n": 4}'))


async def test_items_after_the_end_and_replies_to_no_call_are_ignored() -> None:
    async with FakeNode(_stream_then_garbage) as fake:
        pool = NativePool(fake.address)
        try:
            loop = asyncio.get_running_loop()
            items = [i async for i in pool.server_stream("/x.Y/Z", b"{}", deadline=loop.time() + 10)]
            assert items == [b'{"n": 1}']
            for _ in range(3):  # the connection carries on
                assert await pool.unary("/x.Y/Z", b"{}", deadline=loop.time() + 10) == b'{"n": 3}'
            assert len(pool._conns) == 1
        finally:
            pool.close()


def _echo(frame: f.Frame, writer: asyncio.StreamWriter) -> None:
    kind, rid, *_ = frame
    if kind == f.REQUEST:
        writer.write(f.frame(f.RESPONSE, rid, b'{"n": 1}'))


async def test_a_call_or_stream_whose_metadata_is_over_the_head_limit_is_refused_and_leaves_no_call_behind() -> None:
    async with FakeNode(_echo) as fake:
        pool = NativePool(fake.address)
        try:
            loop = asyncio.get_running_loop()
            assert await pool.unary("/x.Y/Z", b"{}", deadline=loop.time() + 10) == b'{"n": 1}'
            with pytest.raises(BadRequest, match="over the wire's 65535"):
                await pool.unary("/x.Y/Z", b"{}", deadline=loop.time() + 10, metadata={"k": "v" * 70_000})
            (conn,) = pool._conns
            assert conn.calls == {}  # not counted as a call in flight on the connection
            assert pool.places.inflight == 0
            with pytest.raises(BadRequest, match="over the wire's 65535"):  # a stream's request too
                async for _ in pool.server_stream("/x.Y/Z", b"{}", deadline=loop.time() + 10,
                                                  metadata={"k": "v" * 70_000}):
                    pass
            assert conn.calls == {} and pool.places.inflight == 0
            assert await pool.unary("/x.Y/Z", b"{}", deadline=loop.time() + 10) == b'{"n": 1}'
        finally:
            pool.close()


async def test_a_server_that_stops_answering_is_dropped_by_the_keepalive() -> None:
    async with FakeNode(lambda frame, writer: None) as fake:  # accepts calls, never answers, not even PINGs
        pool = NativePool(fake.address, keepalive=0.05)
        try:
            with anyio.fail_after(10), pytest.raises(Unavailable, match="stopped answering"):
                await pool.unary("/x.Y/Z", b"{}")  # no deadline: only the keepalive can end it
        finally:
            pool.close()


async def test_a_server_of_another_version_is_a_clear_error() -> None:
    async with FakeNode(lambda frame, writer: None, preface=f.preface(f.VERSION + 1)) as fake:
        pool = NativePool(fake.address)
        try:
            with pytest.raises(Unavailable, match=f"speaks micro wire version {f.VERSION + 1}; this client"):
                await pool.unary("/x.Y/Z", b"{}")
        finally:
            pool.close()


async def test_an_oversize_reply_fails_that_call_only() -> None:
    def big(frame: f.Frame, writer: asyncio.StreamWriter) -> None:
        kind, rid, *_ = frame
        if kind == f.REQUEST:
            writer.write(f.frame(f.RESPONSE, rid, b"x" * (2000 if rid == 1 else 10)))

    async with FakeNode(big) as fake:
        pool = NativePool(fake.address, max_message_size=1000)
        try:
            with pytest.raises(ResourceExhausted, match=r"response of 2000 bytes .* over the client's 1000-byte limit"):
                await pool.unary("/x.Y/Z", b"{}")
            assert await pool.unary("/x.Y/Z", b"{}") == b"x" * 10
        finally:
            pool.close()


async def test_a_client_deadline_cancels_the_call_on_the_server() -> None:
    cancelled: list[int] = []
    got_cancel = asyncio.Event()

    def record(frame: f.Frame, writer: asyncio.StreamWriter) -> None:
        if frame[0] == f.CANCEL:
            cancelled.append(frame[1])
            got_cancel.set()

    async with FakeNode(record) as fake:
        pool = NativePool(fake.address)
        try:
            loop = asyncio.get_running_loop()
            with pytest.raises(Timeout, match="deadline exceeded"):
                await pool.unary("/x.Y/Z", b"{}", deadline=loop.time() + 0.1)
            with anyio.fail_after(10):
                await got_cancel.wait()
            assert cancelled == [1]
        finally:
            pool.close()


def test_request_heads_over_64_kib_are_refused() -> None:
    with pytest.raises(ValueError, match="over the wire's 65535"):
        f.request(1, "/x", None, {"k": "v" * 70_000}, b"", 0)
    assert struct.calcsize(">IIBBH") == f.HEADER_SIZE == 12


# -- uvloop -----------------------------------------------------------------------------------


def test_the_native_wire_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """micro[fast]: programs run on uvloop (MICRO_LOOP=asyncio keeps the stock loop); the wire's
    calls, streams, deadlines and errors behave the same on it."""
    monkeypatch.setenv("MICRO_LOOP", "asyncio")
    assert eventloop.name() == "asyncio"
    monkeypatch.setenv("MICRO_LOOP", "tokio")
    with pytest.raises(micro.errors.ConfigError, match="MICRO_LOOP='tokio'"):
        eventloop.name()
    monkeypatch.delenv("MICRO_LOOP")
    assert eventloop.name() == "uvloop"  # installed by the dev extras (micro[fast], in micro[all])

    async def main() -> list[Any]:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        registry = MemoryRegistry()
        async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
                micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
            service = micro.Service("wire", runtime=home)
            svc = Svc()
            service.handle(svc)
            async with service:
                got: list[Any] = [await away.client.call("wire", "Svc.Echo", {"text": "uv"})]
                got.append([i["n"] async for i in away.client.stream("wire", "Svc.Count", {"n": 40})])
                with pytest.raises(Timeout):
                    await away.client.call("wire", "Svc.Slow", {}, timeout=0.1)
                with anyio.fail_after(10):
                    await svc.slow_ended.wait()
                got.append(sorted(type(p).__name__ for p in away.client._pools.values()))
                return got

    assert eventloop.run(main()) == [{"text": "uv", "n": 0}, list(range(40)), ["NativePool"]]


# -- where micro calls micro nodes, it rides the native wire ------------------------------------


@pytest.mark.parametrize("wire", ["auto", "grpc"])
async def test_local_broker_deliveries_reach_subscribers_whatever_the_client_s_wire(wire: str) -> None:
    registry = MemoryRegistry()
    got: list[int] = []
    done = anyio.Event()

    async def handle(m: micro.broker.Message) -> None:
        got.append(msgspec.json.decode(m.data)["i"])
        if len(got) == 5:
            done.set()

    async with micro.Runtime(registry=registry, broker="local://", store="memory://") as sub, \
            micro.Runtime(registry=registry, broker="local://", store="memory://", transport=wire) as pub:
        await sub.broker.subscribe("jobs.run", handle)
        for i in range(5):
            await pub.broker.publish("jobs.run", {"i": i})
        with anyio.fail_after(10):
            await done.wait()
        (node,) = [n for r in await registry.get(BROKER_SERVICE) for n in r.nodes if n.metadata["subs"] != "[]"]
        # the runtime's delivery transport serves the broker's endpoint on both wires, advertised as a service
        # node's (a Unix socket too, on this host): the publisher reaches it on the one its transport picks
        assert node.metadata[unix.HOST] == unix.host_id() and unix.ours(node.metadata[unix.UNIX])
        (pool,) = pub.client._pools.values()
        assert pool is pub.client.channel(node)
        if wire == "auto":  # the native wire, over the subscriber's Unix socket
            assert isinstance(pool, NativePool) and pool.unix == node.metadata[unix.UNIX]
            (conn,) = pool._conns
            assert conn.transport is not None
            assert conn.transport.get_extra_info("socket").family == socket.AF_UNIX and pool.unix_fallbacks == 0
        else:
            assert type(pool).__name__ == "NodePool"
    assert sorted(got) == list(range(5))
    with pytest.raises(FileNotFoundError):  # the subscriber's runtime stopped: its socket went
        os.lstat(node.metadata[unix.UNIX])


IDLE_PEERS = r'''
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(b"MICROW\x00\x01")  # the preface, then silence
    socks.append(s)
for s in socks:
    assert s.recv(8) == b"MICROW\x00\x01"
print("idle", len(socks), flush=True)
sys.stdin.read()  # hold them until told to go
'''


async def test_ten_thousand_idle_connections_harm_no_one(node: Node) -> None:
    """10,000 greeted, silent connections from another process: the node still answers at once, and
    counts them all; when they go, it lets them go."""
    import sys

    peers = await asyncio.create_subprocess_exec(
        sys.executable, "-c", IDLE_PEERS, node.host, str(node.port), "10000",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert peers.stdout is not None and peers.stdin is not None
        with anyio.fail_after(120):
            assert await peers.stdout.readline() == b"idle 10000\n"
        assert len(node.native.connections) >= 10_000
        await node.still_answers()
        items = [i["n"] async for i in node.client.client.stream("wire", "Svc.Count", {"n": 20})]
        assert items == list(range(20))
        peers.stdin.close()
        with anyio.fail_after(60):
            await peers.wait()
            while len(node.native.connections) > 1:  # only the client's own connection stays
                await anyio.wait_all_tasks_blocked()
    finally:
        if peers.returncode is None:
            peers.kill()
            await peers.wait()
    await node.still_answers()


# -- whole connections, fuzzed ----------------------------------------------------------------

CONNECTION_CASES = 500


class Served:
    def __init__(self, service: micro.Service, client: micro.Runtime) -> None:
        self.service, self.client = service, client
        host, _, port = service.record.nodes[0].metadata["native"].rpartition(":")
        self.host, self.port = host, int(port)

    async def session(self, data: bytes) -> list[f.Frame]:
        """Greet, send ``data``, stop sending; every frame the node sent until it closed."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f.preface() + data)
            writer.write_eof()
            got = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        assert got[:f.PREFACE_SIZE] == f.preface()
        return f.FrameReader(1 << 22).feed(got[f.PREFACE_SIZE:])

    async def answers(self) -> Any:
        return await self.client.client.call("wire", "Svc.Echo", {"text": "still"}, timeout=10)


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[Served]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home, max_message_size=LIMIT)
        service.handle(Svc())
        async with service:
            yield Served(service, away)


_PATHS = ["/wire.Svc/Echo", "/wire.Svc/Count", "/wire.Svc/Hold", "/wire.Svc/Nope", ""]


def _session_bytes(seed: Seed) -> bytes:
    """A client's bytes: requests (some malformed), cancels, credits, pings, junk; maybe cut short."""
    out: list[bytes] = []
    for _ in range(seed.byte() % 6):
        rid = seed.byte() % 4
        how = seed.byte() % 8
        if how <= 2:
            body = seed.pick([b'{"text": "a"}', b'{"n": 3}', b"{}", b"[]", b"\xff", seed.take(seed.byte() % 12)])
            timeout = seed.pick([None, 5_000_000, 10, 0])
            md = seed.pick([None, {"k": "v"}, {"authorization": "Bearer x"}])
            out.append(f.request(rid, seed.pick(_PATHS), timeout, md, body, seed.pick([0, f.STREAM, f.PROTO])))
        elif how == 3:
            out.append(f.frame(f.CANCEL, rid))
        elif how == 4:
            out.append(f.frame(f.CREDIT, rid, aux=seed.byte()))
        elif how == 5:
            out.append(f.frame(f.PING, rid, seed.take(seed.byte() % 10)))
        elif how == 6:
            frame = f.request(rid, "/wire.Svc/Echo", None, None, b"{}", 0)
            at = seed.byte() % len(frame)
            out.append(frame[:at] + bytes([seed.byte()]) + frame[at + 1:])
        else:
            out.append(seed.take(seed.byte() % 24))
    data = b"".join(out)
    if data and seed.byte() % 4 == 0:
        data = data[: seed.byte() * 3 % len(data)]  # the peer stops mid-frame
    return data


@pytest.mark.fuzz
def test_fuzz_whole_connections() -> None:
    """500 sessions of valid, malformed and truncated frames: the node answers with frames it may send
    (or closes after an ERROR on request id 0), never logs an error, and answers a well-behaved caller
    after every session."""
    with error_log() as errors, Host(_served()) as host:

        def case(data: tuple[int, bytes]) -> None:
            frames = host.run(host.system.session(_session_bytes(Seed(data[1]))))
            for kind, _rid, _flags, _aux, body, _length in frames:
                assert kind in (f.RESPONSE, f.ITEM, f.END, f.ERROR, f.PONG, f.GOAWAY)
                if kind == f.ERROR:
                    status, message = f.read_error(body)
                    assert status in {s.value for s in Status} and message
            assert host.run(host.system.answers()) == {"text": "still", "n": 0}
            assert errors.records == []

        ran = fuzz(st.tuples(st.just(0), st.binary(max_size=120)), case, max_examples=CONNECTION_CASES)
    assert ran == CONNECTION_CASES


# -- the wire choice --------------------------------------------------------------------------


async def test_the_client_picks_the_wire_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: native where a node advertises it, gRPC where it does not (native=False, an older micro);
    MICRO_TRANSPORT=native refuses a node without a native address, naming the setting; grpc never
    uses the native wire; anything else is a ConfigError."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home:
        modern = micro.Service("modern", runtime=home)
        modern.handle(Svc())
        older = micro.Service("older", runtime=home, native=False)
        older.handle(Svc())
        async with modern, older:
            assert "native" not in older.record.nodes[0].metadata
            monkeypatch.setenv("MICRO_TRANSPORT", "native")
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as native, \
                    micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                  transport="auto") as auto:
                assert (native.client.transport, auto.client.transport) == ("native", "auto")  # argument wins
                for rt in (native, auto):
                    assert await rt.client.call("modern", "Svc.Echo", {"text": "m"}) == {"text": "m", "n": 0}
                assert await auto.client.call("older", "Svc.Echo", {"text": "o"}) == {"text": "o", "n": 0}
                only = r"has no native address .* uses the native wire only \(transport='native' or MICRO_TRANSPORT"
                with pytest.raises(Unavailable, match=only):
                    await native.client.call("older", "Svc.Echo", {})
                kinds = {type(p).__name__ for p in auto.client._pools.values()}
                assert kinds == {"NativePool", "NodePool"}
            monkeypatch.setenv("MICRO_TRANSPORT", "grpc")
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as grpc:
                assert await grpc.client.call("modern", "Svc.Echo", {"text": "g"}) == {"text": "g", "n": 0}
                assert {type(p).__name__ for p in grpc.client._pools.values()} == {"NodePool"}
    monkeypatch.setenv("MICRO_TRANSPORT", "carrier-pigeon")
    with pytest.raises(micro.errors.ConfigError, match="MICRO_TRANSPORT='carrier-pigeon' is not a transport"):
        micro.Runtime(registry="memory://", store="memory://", broker="memory://")
    with pytest.raises(micro.errors.ConfigError, match="transport='h3' is not a transport"):
        micro.Runtime(registry="memory://", store="memory://", broker="memory://", transport="h3")


async def test_a_call_cancelled_in_the_read_that_brought_it_leaves_nothing_behind(node: Node) -> None:
    """REQUEST and CANCEL of one call in one read: its task is cancelled before its first step, so its own
    clean-up never runs. The node must still forget the call (or the connection never counts as idle) and
    not put its deadline on the watchdog's heap."""
    peer = await Peer.open(node)
    peer.send(f.request(1, "/wire.Svc/Echo", 5_000_000, None, b'{"text": "gone"}', 0) + f.frame(f.CANCEL, 1))
    peer.call(3, "/wire.Svc/Echo", {"text": "after"})  # answered after the two above were handled
    kind, rid, _, _, body, _ = await peer.next()
    assert (kind, rid, msgspec.json.decode(body)) == (f.RESPONSE, 3, {"text": "after", "n": 0})
    await anyio.wait_all_tasks_blocked()
    assert all(not c.calls for c in node.native.connections)
    assert node.native.watchdog.active == 0


class _Recorder(asyncio.WriteTransport):
    """A transport that keeps what it is given (asyncio 3.11's ``writelines``: it joins)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(data)  # type: ignore[arg-type]

    def is_closing(self) -> bool:
        return False


class _Failing(_Recorder):
    """One whose first write fails: the transport closes (as asyncio's does on EPIPE)."""

    def is_closing(self) -> bool:
        return bool(self.writes)


class _Gatherer(_Recorder):
    """One whose ``writelines`` hands the pieces over without joining (uvloop, asyncio 3.12+)."""

    def writelines(self, list_of_data: Any) -> None:
        self.gathered = list(list_of_data)


def test_a_large_payload_is_written_as_it_is_not_copied_into_a_join() -> None:
    from micro.connections import LARGE, write_all

    big = b"x" * LARGE
    small = [f.HEADER.pack(1, 1, f.RESPONSE, 0, 0), b"a", f.HEADER.pack(len(big), 2, f.RESPONSE, 0, 0)]
    t = _Recorder()
    write_all(t, [*small, big, b"tail"])
    assert t.writes == [b"".join(small), big, b"tail"] and t.writes[1] is big  # the body itself, uncopied
    t = _Recorder()
    write_all(t, [*small, b"y" * (LARGE - 1)])  # all small: one write
    assert len(t.writes) == 1
    g = _Gatherer()
    write_all(g, [*small, big])
    assert g.writes == [] and g.gathered[-1] is big
    failing = _Failing()
    write_all(failing, [*small, big, b"tail", big])
    assert failing.writes == [b"".join(small)]  # nothing written after the transport failed


async def test_a_large_reply_arrives_whole(node: Node) -> None:
    text = "é" * 20_000  # 40 kB of JSON: written as its own piece
    assert await node.client.client.call("wire", "Svc.Echo", {"text": text, "n": 2}) == {"text": text, "n": 2}
