"""Staying up when descriptors run out (issue 22): a service in a subprocess with a low RLIMIT_NOFILE.

Before, with the descriptor limit reached by idle connections, new clients timed out,
the service dropped out of the registry (its heartbeat could not open a file), 101,018
accept-error tracebacks filled stderr in 21 s and the registry watch task died for good.

The subprocess runs one service on the machine-wide ``local://`` registry with its
descriptor limit at 256. The test then

1. opens more connections than the service's connection bound: the excess is refused,
   the service's heartbeat keeps landing (its registry file is rewritten) while it is
   saturated;
2. makes the subprocess take every free descriptor itself (a leak elsewhere) while
   clients keep connecting: accept fails with EMFILE, the heartbeat and the registry
   watch fail, and each is logged once, not per attempt (on uvloop, libuv closes the
   connections it cannot accept and reports nothing);
3. replaces a node of another service meanwhile, lets the descriptors go and closes
   the connections: the service answers calls again, and its client's cache knows the
   new node (the watch delivered the change).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import pytest

import micro

CHILD = r'''
import asyncio, logging, os, resource, sys
import msgspec
import micro

class Ping(msgspec.Struct):
    text: str = ""

class Echo:
    async def Ping(self, req: Ping) -> Ping:
        """Answer with the request."""
        return req

async def main() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("micro.service").setLevel(logging.DEBUG)  # to see the heartbeat retry
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        service = micro.Service("fdsvc", runtime=rt, ttl=1.0)
        service.handle(Echo())
        async with service:
            print("ready", service.address, service.connections.max_connections, flush=True)
            hog: list[int] = []
            while words := (await stdin.readline()).decode().split():
                if words[0] == "hog":  # take every free descriptor
                    try:
                        while True:
                            hog.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        pass
                    print("hogged", len(hog), flush=True)
                elif words[0] == "free":
                    for fd in hog:
                        os.close(fd)
                    hog.clear()
                    print("freed", flush=True)
                elif words[0] == "stats":
                    c = service.connections
                    print("stats", c.open, c.refused, flush=True)
                elif words[0] == "lookup":
                    records = await rt.client.lookup(words[1])
                    print("nodes", *sorted(n.address for r in records for n in r.nodes), flush=True)

micro.eventloop.run(main())
'''

NOFILE = 256


class Ping(msgspec.Struct):
    text: str = ""


class Echo:
    async def Ping(self, req: Ping) -> Ping:
        """Answer with the request."""
        return req


class Child:
    """The service's process: commands on stdin, answers on stdout, its log collected from stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []
        self._logged = asyncio.Event()

    async def collect(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode().rstrip())
            self._logged.set()

    async def ask(self, command: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        with anyio.fail_after(10):
            return (await self.proc.stdout.readline()).decode().split()

    async def logged(self, phrase: str) -> None:
        with anyio.move_on_after(15):
            while not any(phrase in line for line in self.log):
                self._logged.clear()
                await self._logged.wait()
        assert any(phrase in line for line in self.log), f"not logged: {phrase!r}; the log:\n" + "\n".join(self.log)

    def lines(self, phrase: str) -> list[str]:
        return [line for line in self.log if phrase in line]


@contextlib.asynccontextmanager
async def child(loop: str) -> AsyncIterator[tuple[Child, list[str]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(NOFILE), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "MICRO_LOOP": loop})
    c = Child(proc)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.collect)
            assert proc.stdout is not None
            with anyio.fail_after(30):
                ready = (await proc.stdout.readline()).decode().split()
            assert ready and ready[0] == "ready", c.log
            yield c, ready[1:]
            assert proc.stdin is not None
            proc.stdin.close()  # the child's loop ends, its service stops
            with anyio.fail_after(15):
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def open_many(address: str, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, _, port = address.rpartition(":")
    return [await asyncio.open_connection(host, int(port)) for _ in range(n)]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    """Poll ``check`` (another process's state: nothing here to wait on) until it holds."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - another process changes what is checked
            await anyio.sleep(0.02)


def heartbeat_file(home: Path) -> Path:
    (found,) = (home / "registry").glob("fdsvc~*.json")
    return found


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_service_out_of_descriptors_stays_registered_logs_once_and_serves_again(
        micro_home: Path, loop: str) -> None:
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt, \
            child(loop) as (c, info):
        address, max_connections = info[0], int(info[1])
        assert max_connections == NOFILE - 64  # the default keeps 64 descriptors for the service's own work
        other = micro.Service("other", runtime=rt)
        other.handle(Echo())
        await other.start()
        assert await c.ask("lookup other") == ["nodes", other.address]  # cached in the child

        # 1. more connections than the bound: the excess is refused; the heartbeat still lands
        conns = await open_many(address, max_connections + 40)
        clients = [writer for _, writer in conns]
        try:
            async def saturated() -> bool:
                return await c.ask("stats") == ["stats", str(max_connections), "40"]

            await eventually(saturated)

            # a refused connection is half-closed after the GOAWAY and held until its client closes it (as
            # grpclib's client does on the GOAWAY) or for a second: these clients close theirs
            told = 0
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    async def read_to_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                        nonlocal told
                        await reader.read()  # the accepted ones wait here until cancelled
                        writer.close()
                        told += 1
                        if told == 40:
                            tg.cancel_scope.cancel()

                    for reader, writer in conns:
                        tg.start_soon(read_to_end, reader, writer)
            before = heartbeat_file(micro_home).stat().st_mtime_ns

            async def beaten() -> bool:  # the heartbeat rewrote the record while saturated
                return heartbeat_file(micro_home).stat().st_mtime_ns != before

            await eventually(beaten)
            assert [n.address for r in await rt.registry.get("fdsvc") for n in r.nodes] == [address]
            assert len(c.lines("refusing new connections")) == 1

            # 2. no descriptor left at all: accept, the heartbeat and the watch fail; each logged once
            hogged = await c.ask("hog")
            assert hogged[0] == "hogged"
            await other.stop()  # meanwhile the other service's node is replaced
            other = micro.Service("other", runtime=rt)
            other.handle(Echo())
            await other.start()
            clients += [writer for _, writer in await open_many(address, 20)]
            if loop == "asyncio":  # libuv (uvloop) closes what it cannot accept, and reports nothing
                await c.logged("accepting connections failed: [Errno 24]")
            await c.logged("heartbeat to the registry failed again (3 in a row)")  # hogged for a while
            clients += [writer for _, writer in await open_many(address, 20)]  # still connecting
            assert await c.ask("free") == ["freed"]
            await c.logged("heartbeat to the registry works again")
        finally:
            for writer in clients:
                writer.close()

        # 3. the connections gone, it serves again, and its client knows the other service's new node
        stats: list[str] = []

        async def all_closed() -> bool:
            stats[:] = await c.ask("stats")
            return stats[1] == "0"

        await eventually(all_closed)
        with anyio.fail_after(10):
            assert await rt.client.call("fdsvc", "Echo.Ping", {"text": "back"}) == {"text": "back"}
        async def replaced() -> bool:
            return await c.ask("lookup other") == ["nodes", other.address]

        await eventually(replaced)
        assert [n.address for r in await rt.registry.get("fdsvc") for n in r.nodes] == [address]
        await other.stop()
    assert int(stats[2]) >= 40
    # one per episode, not one per attempt
    assert len(c.lines("accepting connections failed")) == (1 if loop == "asyncio" else 0)
    assert len(c.lines("heartbeat to the registry failed:")) == 1  # the rest of the streak at debug
    # none of the loop's own accept errors (asyncio: "socket.accept() out of system resource", uvloop: "listen")
    assert not [line for line in c.log if "out of system resource" in line or "listen callback" in line]
    shown = [line for line in c.log if " DEBUG " not in line]
    assert len(shown) < 100, "\n".join(shown)  # bounded: a few lines (and tracebacks) per episode
