"""The native wire on a Unix socket between nodes on one host (micro.wire.unix).

A node advertises its socket beside its TCP address; a client on the same host uses
it, with the same semantics as TCP (calls, statuses, streams, deadlines, drain), and
falls back to TCP when the path is unusable: gone, a stale file, not a socket, or a
node of another host. The socket directory is private to its user; a directory that
is not is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

import micro
from micro.client import Client
from micro.client.native import NativePool
from micro.errors import BadRequest, Timeout, Unavailable
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
            assert pool.unix_fallbacks == 1 and _family(pool) == socket.AF_INET  # TCP, for a while
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
            assert pool.unix_fallbacks == (0 if how == "another host" else 1) and _family(pool) == socket.AF_INET


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


@pytest.mark.parametrize("how", ["backlog full", "closed before the handshake", "another user listens"])
async def test_a_socket_that_fails_before_the_handshake_falls_back_to_tcp_and_is_tried_again_later(
        sockets: Path, how: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full accept backlog (asyncio gets an unconnected socket), a listener that closes at once, or one
    of another user (SO_PEERCRED): that attempt uses TCP (counted, said once at INFO) and the socket is
    tried again after unix.RETRY seconds, not never."""
    os.mkdir(sockets, 0o700)
    path = str(sockets / "0123456789ab.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    fill: list[socket.socket] = []
    accepted = 0
    server: asyncio.AbstractServer | None = None
    if how == "backlog full":  # a node that does not accept: its backlog fills
        listener.listen(0)
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(path)
            fill.append(s)
    else:
        def shut(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            w.close()

        listener.listen()
        server = await asyncio.start_unix_server(shut, sock=listener)
    if how == "another user listens":  # SO_PEERCRED names another uid: the listener is not ours
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            assert unix.peer_uid(probe) == os.geteuid()  # what the kernel says of a real peer
        monkeypatch.setattr(unix, "peer_uid", lambda sock: os.geteuid() + 1)
    registry = MemoryRegistry()
    try:
        async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
                micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
            service = micro.Service("wire", runtime=home, unix_socket=False)
            service.handle(Svc())
            async with service:
                node = service.record.nodes[0]
                md = {**node.metadata, unix.UNIX: path, unix.HOST: unix.host_id()}
                pool = away.client.channel(Node(id=node.id, address=node.address, metadata=md))
                assert isinstance(pool, NativePool) and pool.unix == path
                with caplog.at_level(logging.DEBUG, logger="micro.wire"):
                    with anyio.fail_after(10):
                        assert await pool.unary("/wire.Svc/Echo", b'{"text":"x"}') == b'{"text":"x","n":0}'
                    assert pool.unix_fallbacks == 1 and _family(pool) == socket.AF_INET
                    (conn,) = pool._conns
                    conn.close(Unavailable("the test drops it"))
                    with anyio.fail_after(10):  # within unix.RETRY: straight to TCP
                        assert await pool.unary("/wire.Svc/Echo", b'{"text":"y"}') == b'{"text":"y","n":0}'
                    assert pool.unix_fallbacks == 1
                    monkeypatch.setattr(unix, "RETRY", 0.0)
                    (conn,) = pool._conns
                    conn.close(Unavailable("the test drops it"))
                    with anyio.fail_after(10):  # past unix.RETRY: the socket is tried again
                        assert await pool.unary("/wire.Svc/Echo", b'{"text":"z"}') == b'{"text":"z","n":0}'
                    assert pool.unix_fallbacks == 2 and _family(pool) == socket.AF_INET
                said = [r for r in caplog.records if f"the Unix socket {path} is unusable" in r.getMessage()]
                assert [r.levelno for r in said] == [logging.INFO, logging.DEBUG]  # said once, then quietly
                if how != "backlog full":
                    # a connection each time the socket was tried (and the probe's)
                    assert accepted == 2 + (how == "another user listens")
    finally:
        if server is not None:
            server.close()
        for s in fill:
            s.close()
        listener.close()


def test_the_sweep_leaves_other_programs_sockets_and_a_node_s_socket_listens_at_its_name(sockets: Path) -> None:
    """Only names a node gives its socket are swept (a shared MICRO_SOCKET_DIR may hold other programs'
    sockets), and a node's socket is bound under a temporary name and renamed once it listens: a node
    starting beside it never finds it refusing connections."""
    os.mkdir(sockets, 0o700)
    foreign = socket.socket(socket.AF_UNIX)
    foreign.bind(str(sockets / "docker.sock"))  # another program's, not listening yet
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sockets / "abcdef012345.sock"))  # a node's, dead
    dead.close()
    try:
        path = unix.listen_path("wire-0123456789ab")
        assert path == str(sockets / "0123456789ab.sock")
        assert sorted(os.listdir(sockets)) == ["docker.sock"]  # the dead node's socket is gone, the other kept
        sock = unix.bind(path)
        try:
            assert sorted(os.listdir(sockets)) == ["0123456789ab.sock", "docker.sock"]  # no temporary left
            assert not unix.stale(path)  # it listens at its name
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        finally:
            sock.close()
    finally:
        foreign.close()


def test_a_relative_socket_directory_is_advertised_absolute(
        sockets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(sockets.parent)
    monkeypatch.setenv("MICRO_SOCKET_DIR", sockets.name)
    path = unix.listen_path("wire-0123456789ab")
    assert path == str(sockets / "0123456789ab.sock") and os.path.isabs(path)
    assert unix.ours(path) and not unix.ours("/tmp/elsewhere/0123456789ab.sock")


async def test_a_path_outside_the_client_s_socket_directory_is_not_used(sockets: Path, tmp_path: Path) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            node = service.record.nodes[0]
            real = node.metadata[unix.UNIX]
            link = str(sockets / "0123456789ab.sock")
            os.symlink(tmp_path / "elsewhere.sock", link)  # in the directory, but leading out of it
            for port, named in enumerate((link, str(tmp_path / "elsewhere.sock"), "/run/docker.sock"), 1):
                md = {**node.metadata, unix.UNIX: named, "native": f"127.0.0.1:{port}"}  # a pool of its own
                pool = away.client.channel(Node(id=node.id, address=node.address, metadata=md))
                assert isinstance(pool, NativePool) and pool.unix is None, named
            assert isinstance(pool := away.client.channel(node), NativePool) and pool.unix == real


async def test_records_of_one_native_address_with_other_sockets_get_their_own_pools(sockets: Path) -> None:
    """A node restarted on the same port with another socket (or none) while the old record is still listed:
    each record's calls use the socket it names, not the one of the record that happened to be called first."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as away:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            node = service.record.nodes[0]
            before = str(sockets / "0123456789ab.sock")  # the socket of the node before its restart: gone
            old = Node(id="wire-0123456789ab", address=node.address, metadata={**node.metadata, unix.UNIX: before})
            bare = Node(id="wire-ba5eba11cafe", address=node.address,
                        metadata={k: v for k, v in node.metadata.items() if k != unix.UNIX})
            pools = [away.client.channel(n) for n in (old, node, bare)]
            assert [p.unix for p in pools if isinstance(p, NativePool)] == [before, node.metadata[unix.UNIX], None]
            for pool in pools:
                assert await pool.unary("/wire.Svc/Echo", b'{"text":"x"}') == b'{"text":"x","n":0}'
            assert [_family(p) for p in pools if isinstance(p, NativePool)] == [
                socket.AF_INET, socket.AF_UNIX, socket.AF_INET]  # the old path fell back; the live one is used
            assert away.client.channel(node) is pools[1]
            away.client.forget_node(old)  # the old record leaves: its pool goes, the others stay
            assert away.client.channel(node) is pools[1] and away.client.channel(bare) is pools[2]


def test_the_sweep_removes_temporary_sockets_of_nodes_that_died_before_their_rename(sockets: Path) -> None:
    """A node that died between bind and rename leaves ``.{id}.tmp``: swept once nobody listens on it and it
    is older than TEMPORARY_AGE. A temporary socket that listens, a fresh one (a node starting now), another
    program's, or a plain file of that name are left alone."""
    os.mkdir(sockets, 0o700)
    old = time.time() - unix.TEMPORARY_AGE - 5
    opened = []

    def bound(name: str, *, listening: bool = False, aged: bool = True) -> str:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sockets / name))
        if listening:
            s.listen()
        opened.append(s)
        if aged:
            os.utime(sockets / name, (old, old))
        return name

    dead = bound(".deadbeef0000.tmp")
    kept = [bound(".abcdefabcdef.tmp", listening=True),  # listens: a live node (whatever its age)
            bound(".cafebabe0000.tmp", aged=False),  # a node between its bind and its rename right now
            bound(".tool.tmp"), bound("cafe.tmp")]  # other programs' names
    plain = sockets / ".0123456789ab.tmp"  # not a socket
    os.close(os.open(plain, os.O_CREAT | os.O_WRONLY, 0o600))
    os.utime(plain, (old, old))
    kept.append(plain.name)
    try:
        assert unix.listen_path("wire-0123456789cd") is not None
        assert sorted(os.listdir(sockets)) == sorted(kept)
        assert dead not in os.listdir(sockets)
    finally:
        for s in opened:
            s.close()


async def test_micro_unix_0_keeps_the_client_on_tcp(sockets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MICRO_UNIX=0 (or Client(unix=False)): the native wire over TCP also to nodes on this host (what
    ``micro bench --wire native-tcp`` measures); any value but 0 or 1 is a ConfigError naming it."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home:
        service = micro.Service("wire", runtime=home)
        service.handle(Svc())
        async with service:
            node = service.record.nodes[0]
            assert unix.UNIX in node.metadata
            monkeypatch.setenv("MICRO_UNIX", "0")
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                     transport="native") as away:
                assert away.client.unix is False
                assert await away.client.call("wire", "Svc.Echo", {"text": "t"}) == {"text": "t", "n": 0}
                pool = away.client.channel(node)
                assert isinstance(pool, NativePool) and pool.unix is None
                assert pool.connected() == ["tcp"] and pool.unix_fallbacks == 0
            monkeypatch.setenv("MICRO_UNIX", "1")
            async with micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                     transport="native") as near:
                assert await near.client.call("wire", "Svc.Echo", {"text": "u"}) == {"text": "u", "n": 0}
                pool = near.client.channel(node)
                assert isinstance(pool, NativePool) and pool.connected() == ["unix"]
    monkeypatch.setenv("MICRO_UNIX", "no")
    with pytest.raises(micro.errors.ConfigError, match="MICRO_UNIX='no' is not a setting: use 1"):
        micro.Runtime(registry="memory://", store="memory://", broker="memory://")
    for value in ("0", 0):  # not taken as a truthy "yes"
        with pytest.raises(micro.errors.ConfigError, match=f"Client\\(unix={value!r}\\) is not a setting: use True"):
            Client(registry, unix=value)  # type: ignore[arg-type]
