"""Two OS processes find each other through the ``local`` registry (same MICRO_HOME).

A child process runs a small service with ``micro.New(...).run()``; this process calls
it, it calls back, and then the child is killed (its record goes at once: its pid is
dead), stopped (its record expires by TTL although its pid lives), or terminated (it
deregisters on its way out).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import micro
from micro.errors import ServiceNotFound
from micro.registry import Event, Watcher
from micro.registry.local import LocalRegistry

CHILD = textwrap.dedent(
    """
    import os, sys
    import msgspec
    import micro
    from micro import context

    class Req(msgspec.Struct):
        name: str = ""

    class Rsp(msgspec.Struct):
        pid: int
        text: str = ""
        remaining: float | None = None

    class Echo:
        async def Hi(self, req: Req) -> Rsp:
            \"\"\"Say hi from this process.\"\"\"
            return Rsp(os.getpid(), f"hi {req.name}", context.time_remaining())

        async def CallBack(self, req: Req) -> Rsp:
            \"\"\"Call the parent process's service.\"\"\"
            rsp = await service.client.call("parent", "Parent.Hello", {"name": req.name})
            return Rsp(os.getpid(), rsp["text"], context.time_remaining())

    service = micro.New("echo", ttl=float(sys.argv[1]), heartbeat=float(sys.argv[2]))
    service.handle(Echo())
    service.run()  # until SIGINT/SIGTERM; the parent learns of it from the registry
    print("clean exit", flush=True)
    """
)


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.address = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


async def spawn(tmp_path: Path, watcher: Watcher, *, ttl: float = 30.0,
                heartbeat: float = 5.0) -> Child:
    """Start the child service; return once the registry shows it (its address from there)."""
    script = tmp_path / "child_service.py"
    script.write_text(CHILD)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(ttl), str(heartbeat),
        stdout=asyncio.subprocess.PIPE, env={**os.environ},  # the same MICRO_HOME
    )
    child = Child(proc)
    try:
        created = await next_event(watcher, "create", "echo", within=30)
    except BaseException:
        await finish(child)
        raise
    (node,) = created.service.nodes
    assert node.metadata["pid"] == str(proc.pid)
    child.address = node.address
    return child


async def finish(child: Child) -> bytes:
    if child.proc.returncode is None:
        child.proc.kill()
    assert child.proc.stdout is not None
    rest = await child.proc.stdout.read()
    await child.proc.wait()
    return rest


async def next_event(watcher: Watcher, type_: str, name: str, *, within: float = 15) -> Event:
    with anyio.fail_after(within):
        async for event in watcher:
            if event.type == type_ and event.service.name == name:
                return event
    raise AssertionError("the watcher ended")


class Parent:
    async def Hello(self, req: dict[str, str]) -> dict[str, str]:
        return {"text": f"parent {os.getpid()} says hello to {req.get('name', '')}"}


@pytest.fixture
async def registry(micro_home: Path) -> AsyncIterator[LocalRegistry]:
    async with LocalRegistry(poll_interval=0.02) as reg:
        assert reg.path == micro_home / "registry"
        yield reg


async def test_two_processes_call_each_other_then_a_kill_drops_the_record(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    watcher = registry.watch()
    child = await spawn(tmp_path, watcher)
    try:
        (record,) = await registry.get("echo")
        assert [n.address for n in record.nodes] == [child.address]

        async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
            parent = micro.Service("parent", runtime=rt)
            parent.handle(Parent())
            async with parent:
                rsp = await rt.client.call("echo", "Echo.Hi", {"name": "there"}, timeout=10)
                assert rsp["pid"] == child.pid != os.getpid()
                assert rsp["text"] == "hi there"
                assert 0 < rsp["remaining"] <= 10  # the deadline crossed the process boundary
                back = await rt.client.call("echo", "Echo.CallBack", {"name": "child"})
                assert back["text"] == f"parent {os.getpid()} says hello to child"

                (record,) = await registry.get("echo")
                endpoint = record.endpoint("Echo.Hi")
                assert endpoint is not None and endpoint.description == "Say hi from this process."

                child.proc.send_signal(signal.SIGKILL)
                await child.proc.wait()
                # the pid is dead: gone at the next look, long before its 30 s TTL
                deleted = await next_event(watcher, "delete", "echo", within=5)
                assert deleted.service.nodes[0].address == child.address
                with pytest.raises(ServiceNotFound):
                    await registry.get("echo")
                assert not any(p.name.startswith("echo~") for p in registry.path.iterdir())
        # a fresh process's view (what `micro call` sees): no such service
        async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
            with pytest.raises(ServiceNotFound):
                await rt.client.call("echo", "Echo.Hi", {})
    finally:
        await watcher.aclose()
        await finish(child)


async def test_a_stopped_process_expires_by_ttl_and_comes_back(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    watcher = registry.watch()
    child = await spawn(tmp_path, watcher, ttl=1.0, heartbeat=0.1)
    try:
        child.proc.send_signal(signal.SIGSTOP)  # alive, but no more heartbeats
        deleted = await next_event(watcher, "delete", "echo")
        assert deleted.service.nodes[0].metadata["pid"] == str(child.pid)
        os.kill(child.pid, 0)  # still alive: the TTL did it
        with pytest.raises(ServiceNotFound):
            await registry.get("echo")

        child.proc.send_signal(signal.SIGCONT)  # heart-beats again: registered again
        await next_event(watcher, "create", "echo")
        async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
            assert (await rt.client.call("echo", "Echo.Hi", {"name": "again"}))["pid"] == child.pid
    finally:
        await watcher.aclose()
        await finish(child)


async def test_sigterm_stops_the_service_cleanly_and_deregisters(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    watcher = registry.watch()
    child = await spawn(tmp_path, watcher)  # a 30 s TTL: only a deregistration removes it quickly
    try:
        child.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            code = await child.proc.wait()
        assert code == 0
        assert child.proc.stdout is not None
        assert b"clean exit" in await child.proc.stdout.read()
        # deregistered on the way out (the file is removed, not left to expire or be reaped)
        assert not any(p.name.startswith("echo~") for p in registry.path.iterdir())
        await next_event(watcher, "delete", "echo")
    finally:
        await watcher.aclose()
        await finish(child)

