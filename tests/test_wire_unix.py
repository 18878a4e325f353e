"""The native wire on a Unix socket between nodes on one host (micro.wire.unix).

A node advertises its socket beside its TCP address; a client on the same host uses
it, with the same semantics as TCP (calls, statuses, streams, deadlines, drain), and
falls back to TCP when the path is unusable: gone, a stale file, not a socket, or a
node of another host. The socket directory is private to its user; a directory that
is not is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

import micro
from micro.client.native import NativePool
from micro.errors import BadRequest, Timeout
from micro.registry import Node
from micro.registry.memory import MemoryRegistry
from micro.wire import unix


class Echo(msgspec.Struct):
    text: str = ""
    n: int = 0


class Svc:
    def __init__(self) -> None:
        self.held = anyio.Event()
        self.release = anyio.Event()
        self.slow_ended = anyio.Event()

    async def Echo(self, req: Echo) -> Echo:
        """Echo."""
        if req.text == "bad":
            raise BadRequest("text: 'bad' is refused")
        return req

    async def Count(self, req: Echo) -> AsyncIterator[Echo]:
        """``n`` items."""
        for i in range(req.n):
            yield Echo(str(i), i)

    async def Hold(self, req: Echo) -> Echo:
        """Answer once released."""
        self.held.set()
        await self.release.wait()
        return req

    async def Slow(self, req: Echo) -> Echo:
        """Never answers; says when it stops."""
        try:
            await anyio.sleep_forever()
        finally:
            self.slow_ended.set()
        raise AssertionError("unreachable")


@pytest.fixture
def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A socket directory of this test's own (short: sun_path holds 107 bytes)."""
    where = Path(f"/tmp/mt-{os.getpid()}-{tmp_path.name[-12:]}")
    monkeypatch.setenv("MICRO_SOCKET_DIR", str(where))
    yield where
    for entry in where.glob("*"):
        entry.unlink()
    if where.exists():
        where.rmdir()


def _exists(path: str | Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _family(pool: NativePool) -> int:
    (conn,) = pool._conns
    assert conn.transport is not None
    return int(conn.transport.get_extra_info("socket").family)


@pytest.mark.parametrize("over", ["unix", "tcp"])
async def test_calls_streams_errors_and_deadlines_are_the_same_on_both(sockets: Path, over: str) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        svc = Svc()
        service = micro.Service("wire", runtime=home, unix_socket=over == "unix")
        service.handle(svc)
        async with service:
            md = service.record.nodes[0].metadata
            if over == "unix":
                path = md[unix.UNIX]
                assert Path(path).parent == sockets and md[unix.HOST] == unix.host_id()
                assert stat.S_IMODE(os.stat(sockets).st_mode) == 0o700  # only this user reaches it
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            else:
                assert unix.UNIX not in md and "native" in md
            assert await away.client.call("wire", "Svc.Echo", {"text": "hi"}) == {"text": "hi", "n": 0}
            pool = away.client.channel(service.record.nodes[0])
            assert isinstance(pool, NativePool)
            assert _family(pool) == (socket.AF_UNIX if over == "unix" else socket.AF_INET)
            got = [i["n"] async for i in away.client.stream("wire", "Svc.Count", {"n": 100})]
            assert got == list(range(100))  # past the credit window
            with pytest.raises(BadRequest, match="'bad' is refused"):
                await away.client.call("wire", "Svc.Echo", {"text": "bad"})
            with pytest.raises(Timeout):
                await away.client.call("wire", "Svc.Slow", {}, timeout=0.1)
            with anyio.fail_after(10):
                await svc.slow_ended.wait()  # the handler was cancelled
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:  # many calls in flight on one connection
                    for i in range(50):
                        tg.start_soon(away.client.call, "wire", "Svc.Echo", {"n": i})
            assert len(pool._conns) == 1
        if over == "unix":
            assert not _exists(path)  # a stopped node leaves no socket behind


async def test_a_draining_node_finishes_a_call_in_flight_on_its_socket(sockets: Path) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        svc = Svc()
        service = micro.Service("wire", runtime=home, drain_timeout=30)
        service.handle(svc)
        await service.start()
        try:
            path = service.record.nodes[0].metadata[unix.UNIX]
            held: list[object] = []

            async def hold() -> None:
                held.append(await away.client.call("wire", "Svc.Hold", {"text": "held"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                with anyio.fail_after(10):
                    await svc.held.wait()
                assert _family(away.client.channel(service.record.nodes[0])) == socket.AF_UNIX
                tg.start_soon(service.stop)
                native = service._native
                assert native is not None
                with anyio.fail_after(10):
                    while not native.closing:
                        await anyio.wait_all_tasks_blocked()
                assert not _exists(path)  # no new connections
                svc.release.set()
            assert held == [{"text": "held", "n": 0}]
        finally:
            await service.stop()


async def test_a_stale_socket_file_is_swept_at_start_and_a_node_s_stale_path_falls_back_to_tcp(
        sockets: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.mkdir(sockets, 0o700)
    left = sockets / "deadbeef0000.sock"  # a node that died without removing its socket
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(left))
        s.listen()
    other = sockets / "notes.txt"
    os.close(os.open(other, os.O_CREAT | os.O_WRONLY, 0o600))
    assert unix.stale(str(left))
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            assert not _exists(left) and _exists(other)  # only dead sockets are swept
            node = service.record.nodes[0]
            path = Path(node.metadata[unix.UNIX])
            assert not unix.stale(str(path))  # a live one is not stale
            # the node's socket replaced by a stale file (as after a crash, with the record still listed)
            os.unlink(path)
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
            with caplog.at_level(logging.DEBUG, logger="micro.wire"):
                assert await away.client.call("wire", "Svc.Echo", {"text": "t"}) == {"text": "t", "n": 0}
            pool = away.client.channel(node)
            assert isinstance(pool, NativePool)
            assert pool.unix is None and _family(pool) == socket.AF_INET  # TCP from now on
            assert f"the Unix socket {path} is unusable" in caplog.text


@pytest.mark.parametrize("how", ["gone", "not a socket", "another host"])
async def test_an_unusable_path_falls_back_to_tcp(sockets: Path, how: str) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            node = service.record.nodes[0]
            md = dict(node.metadata)
            if how == "gone":
                md[unix.UNIX] = str(sockets / "nobody-here.sock")
            elif how == "not a socket":
                md[unix.UNIX] = str(sockets / "plain.sock")
                os.close(os.open(md[unix.UNIX], os.O_CREAT | os.O_WRONLY, 0o600))
            else:
                md[unix.HOST] = "boot:another-machine"
            listed = Node(id=node.id, address=node.address, metadata=md)
            pool = away.client.channel(listed)
            assert isinstance(pool, NativePool)
            assert pool.unix == (None if how == "another host" else md[unix.UNIX])
            assert await pool.unary("/wire.Svc/Echo", b'{"text":"x"}') == b'{"text":"x","n":0}'
            assert pool.unix is None and _family(pool) == socket.AF_INET


async def test_a_socket_directory_others_may_enter_is_refused(
        sockets: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.mkdir(sockets)
    os.chmod(sockets, 0o777)
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        with caplog.at_level(logging.WARNING, logger="micro.wire"):
            async with service:
                md = service.record.nodes[0].metadata
                assert unix.UNIX not in md and "native" in md
                assert await away.client.call("wire", "Svc.Echo", {"text": "t"}) == {"text": "t", "n": 0}
                assert os.listdir(sockets) == []
    assert f"{sockets} must be a directory of this user" in caplog.text
    assert "MICRO_SOCKET_DIR" in caplog.text and "drwxrwxrwx" in caplog.text


async def test_another_user_cannot_reach_the_socket(sockets: Path) -> None:
    """0700 directory, 0600 socket: as another user, connecting fails (so that client uses TCP)."""
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as home:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            path = service.record.nodes[0].metadata[unix.UNIX]
            if os.geteuid() == 0:  # root passes any permission check: ask as nobody
                assert _connect_as(65534, path) == "refused"
            else:  # this user is the owner: the modes are what keeps others out
                assert stat.S_IMODE(os.stat(sockets).st_mode) == 0o700
                assert os.stat(sockets).st_uid == os.geteuid()
            assert _connect_as(os.geteuid(), path) == "connected"  # its own user may


def _connect_as(uid: int, path: str) -> str:
    """Connect to ``path`` from a child process running as ``uid`` (a fork: nothing to execute as it)."""
    pid = os.fork()
    if pid == 0:  # the child: a connect and an exit code, nothing else
        code = 3
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "refused"}.get(os.waitstatus_to_exitcode(status), "failed")
