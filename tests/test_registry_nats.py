"""The nats registry against a real nats-server: the registry contract, and two OS processes
that know only the NATS URL finding and calling each other."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from _servers import NatsServer

import micro
from micro.errors import ConfigError, ServiceNotFound, Unavailable
from micro.registry import Node, ServiceRecord, from_url
from micro.registry.nats import NatsRegistry

PEER = Path(__file__).parent / "apps" / "peer.py"


def record(name: str, node: str, address: str = "127.0.0.1:1", version: str = "latest") -> ServiceRecord:
    return ServiceRecord(name, version=version, nodes=[Node(node, address)])


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> str:
    return "t_" + request.node.name.replace("[", "_").replace("]", "")[:40]


async def test_register_get_list_deregister(nats_url: str, bucket: str) -> None:
    async with NatsRegistry(f"{nats_url}?bucket={bucket}") as reg:
        await reg.register(record("task", "n1", "127.0.0.1:1"), ttl=30)
        await reg.register(record("task", "n2", "127.0.0.1:2"), ttl=30)
        await reg.register(record("task", "n3", "127.0.0.1:3", version="2"), ttl=30)
        await reg.register(record("project", "p1"), ttl=30)
        (v1, v2) = await reg.get("task")
        assert (v1.version, v2.version) == ("2", "latest")
        assert sorted(n.id for n in v2.nodes) == ["n1", "n2"]
        assert [r.name for r in await reg.list()] == ["project", "task", "task"]
        await reg.deregister(record("task", "n1"))
        assert [n.id for n in (await reg.get("task"))[1].nodes] == ["n2"]
        await reg.deregister(record("project", "p1"))
        with pytest.raises(ServiceNotFound, match="'project' is not registered"):
            await reg.get("project")


async def test_names_with_unusual_characters(nats_url: str, bucket: str) -> None:
    async with NatsRegistry(f"{nats_url}?bucket={bucket}") as reg:
        await reg.register(record("task-mgr.v2/eu", "node:1"), ttl=30)
        (found,) = await reg.get("task-mgr.v2/eu")
        assert found.nodes[0].id == "node:1"
        with pytest.raises(ServiceNotFound):
            await reg.get("task-mgr")


async def test_watch_sees_create_and_ttl_expiry(nats_url: str, bucket: str) -> None:
    async with NatsRegistry(f"{nats_url}?bucket={bucket}", poll_interval=0.1) as reg:
        watcher = reg.watch()
        send, recv = anyio.create_memory_object_stream[tuple[str, str]](100)

        async def consume() -> None:
            async with send:
                async for ev in watcher:
                    await send.send((ev.type, ev.service.name))

        async with recv, anyio.create_task_group() as tg:
            tg.start_soon(consume)
            with anyio.fail_after(15):
                # the watcher's first snapshot is taken when iteration starts: prime it
                primed = False
                for i in range(100):
                    await reg.register(record("primer", f"p{i}"), ttl=30)
                    with anyio.move_on_after(0.5):
                        assert (await recv.receive())[1] == "primer"
                        primed = True
                    if primed:
                        break
                assert primed
                await reg.register(record("short", "s1"), ttl=0.5)
                seen = []
                while ("delete", "short") not in seen:
                    seen.append(await recv.receive())
            await watcher.aclose()
        assert ("create", "short") in seen
        assert seen.index(("create", "short")) < seen.index(("delete", "short"))
        with pytest.raises(ServiceNotFound):
            await reg.get("short")


async def test_unreachable_server_fails_fast_naming_the_url() -> None:
    with pytest.raises(Unavailable, match=r"cannot connect to registry nats://127.0.0.1:1"):
        with anyio.fail_after(10):
            async with from_url("nats://127.0.0.1:1"):
                pass


def test_wrong_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nats://"):
        NatsRegistry("http://127.0.0.1:4222")


def _spawn(name: str, nats_url: str, home: Path) -> subprocess.Popen[str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MICRO_REGISTRY": nats_url, "MICRO_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(PEER), name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        out = line + proc.stdout.read()
        proc.stdout.close()
        pytest.fail(f"peer {name} did not start:\n{out}")
    return proc


@pytest.fixture
def peers(nats_url: str, tmp_path: Path) -> Iterator[str]:
    # each process gets its own MICRO_HOME: the only thing they share is the NATS URL
    a = _spawn("peer-a", nats_url, tmp_path / "a")
    b = _spawn("peer-b", nats_url, tmp_path / "b")
    yield nats_url
    for p in (a, b):
        p.terminate()
        p.wait(20)
        assert p.stdout is not None
        p.stdout.close()


async def test_two_processes_call_each_other_through_nats(peers: str) -> None:
    async with micro.Runtime(registry=peers, store="memory://", broker="memory://") as rt:
        ab = await rt.client.call("peer-a", "Peer.Ask", {"target": "peer-b"})
        ba = await rt.client.call("peer-b", "Peer.Ask", {"target": "peer-a"})
        assert ab["greeting"] == "hello peer-a from peer-b"
        assert ba["greeting"] == "hello peer-b from peer-a"
        assert ab["pid"] != ba["pid"] and os.getpid() not in (ab["pid"], ba["pid"])
        names = [r.name for r in await rt.registry.list()]
        assert {"peer-a", "peer-b"} <= set(names)


async def test_server_restart_fails_fast_then_recovers(own_nats_server: NatsServer) -> None:
    url = own_nats_server.url
    async with NatsRegistry(url, connect_timeout=1.0) as reg:
        await reg.register(record("task", "n1"), ttl=60)
        own_nats_server.stop()
        with anyio.fail_after(15):  # fails with Unavailable, never hangs
            with pytest.raises(Unavailable, match=url.replace(".", r"\.")):
                await reg.get("task")
        own_nats_server.start()
        with anyio.fail_after(30):
            while True:  # nats-py reconnects on its own; the first calls may still fail
                try:
                    (found,) = await reg.get("task")
                    break
                except Unavailable:
                    await anyio.sleep(0.2)
        assert found.nodes[0].id == "n1"  # JetStream kept the bucket across the restart
