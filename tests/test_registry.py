"""Registries (memory and local): register, get, list, deregister, watch, TTL, heartbeat.

Every behaviour runs against both backends; the local registry's machine-wide side
(other processes, dead pids) is in test_local_registry_processes.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

import micro
from micro.errors import ConfigError, NotFound, RegistryError, ServiceNotFound
from micro.registry import Endpoint, Event, Node, Registry, ServiceRecord, Watcher, from_url
from micro.registry.local import LocalRegistry
from micro.registry.memory import MemoryRegistry


def record(name: str = "task", node: str = "n1", *, version: str = "latest", port: int = 1,
           description: str = "list overdue tasks") -> ServiceRecord:
    return ServiceRecord(
        name=name,
        version=version,
        metadata={"team": "core"},
        endpoints=[Endpoint(name="Task.ListOverdue", path=f"/{name}.Task/ListOverdue",
                            request={"type": "object", "properties": {"user_id": {"type": "string"}}},
                            response={"type": "object"}, description=description)],
        nodes=[Node(id=node, address=f"127.0.0.1:{port}", metadata={"pid": "1"})],
    )


def make(kind: str) -> Registry:
    if kind == "memory":
        return MemoryRegistry()
    return LocalRegistry(poll_interval=0.02)


@pytest.fixture(params=["memory", "local"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    async with make(request.param) as reg:
        yield reg


async def next_event(watcher: Watcher, type_: str, name: str, node: str | None = None, *,
                     within: float = 5) -> Event:
    """The next event of that type for that service (and node)."""
    with anyio.fail_after(within):
        async for event in watcher:
            if event.type == type_ and event.service.name == name and (
                node is None or any(n.id == node for n in event.service.nodes)
            ):
                return event
    raise AssertionError("the watcher ended")


async def test_register_get_list_deregister(registry: Registry) -> None:
    rec = record()
    await registry.register(rec, ttl=30)
    (got,) = await registry.get("task")
    assert got == rec
    assert [r.name for r in await registry.list()] == ["task"]
    await registry.deregister(rec)
    with pytest.raises(ServiceNotFound, match="'task'"):
        await registry.get("task")
    assert await registry.list() == []


async def test_unknown_service_is_service_not_found(registry: Registry) -> None:
    with pytest.raises(ServiceNotFound) as info:
        await registry.get("nope")
    assert isinstance(info.value, NotFound) and isinstance(info.value, RegistryError)
    assert info.value.code == "NOT_FOUND"


async def test_nodes_of_one_name_and_version_merge(registry: Registry) -> None:
    await registry.register(record(node="a", port=1), ttl=30)
    await registry.register(record(node="b", port=2), ttl=30)
    await registry.register(record(node="c", port=3, version="2.0"), ttl=30)
    await registry.register(record("project", node="p"), ttl=30)
    got = await registry.get("task")
    assert [(r.version, sorted(n.id for n in r.nodes)) for r in got] == [
        ("2.0", ["c"]), ("latest", ["a", "b"])
    ]
    assert [(r.name, r.version) for r in await registry.list()] == [
        ("project", "latest"), ("task", "2.0"), ("task", "latest")
    ]
    await registry.deregister(record(node="a"))
    latest = [r for r in await registry.get("task") if r.version == "latest"]
    assert [n.id for n in latest[0].nodes] == ["b"]


async def test_names_that_share_a_prefix_stay_apart(registry: Registry) -> None:
    await registry.register(record("task"), ttl=30)
    await registry.register(record("task-mgr", node="m"), ttl=30)
    assert [n.id for r in await registry.get("task") for n in r.nodes] == ["n1"]
    assert [n.id for r in await registry.get("task-mgr") for n in r.nodes] == ["m"]


async def test_watch_reports_create_update_delete(registry: Registry) -> None:
    watcher = registry.watch()
    try:
        await registry.register(record(), ttl=30)
        created = await next_event(watcher, "create", "task")
        assert created.service.nodes == [Node(id="n1", address="127.0.0.1:1", metadata={"pid": "1"})]
        assert created.service.endpoints[0].name == "Task.ListOverdue"

        await registry.register(record(description="changed"), ttl=30)
        updated = await next_event(watcher, "update", "task")
        assert updated.service.endpoints[0].description == "changed"

        await registry.deregister(record())
        deleted = await next_event(watcher, "delete", "task")
        assert [n.id for n in deleted.service.nodes] == ["n1"]
    finally:
        await watcher.aclose()


async def test_closed_watcher_ends(registry: Registry) -> None:
    watcher = registry.watch()
    await watcher.aclose()
    with anyio.fail_after(5):
        assert [e async for e in watcher] == []


async def test_ttl_expiry_drops_the_record_and_tells_watchers(registry: Registry) -> None:
    watcher = registry.watch()
    try:
        # a TTL well past one poll (the local registry polls every 0.25 s): the watcher must see the node
        # before it expires, or it has nothing to report gone (at 0.2 s a loaded machine missed it)
        await registry.register(record(node="short"), ttl=1.0)
        await registry.register(record(node="long"), ttl=60)
        # nobody calls get(): the watcher alone must learn that the node expired
        event = await next_event(watcher, "delete", "task", node="short")
        assert [n.id for n in event.service.nodes] == ["short"]
    finally:
        await watcher.aclose()
    assert [n.id for r in await registry.get("task") for n in r.nodes] == ["long"]


class _Counting:
    """Mixin: count register() calls and let a test wait for the next one."""

    def _init_counting(self) -> None:
        self.registrations: list[float] = []
        self.registered = anyio.Event()

    async def register(self, record: ServiceRecord, *, ttl: float) -> None:
        await super().register(record, ttl=ttl)  # type: ignore[misc]
        self.registrations.append(time.monotonic())
        self.registered.set()
        self.registered = anyio.Event()


class CountingMemoryRegistry(_Counting, MemoryRegistry):
    def __init__(self) -> None:
        MemoryRegistry.__init__(self)
        self._init_counting()


class CountingLocalRegistry(_Counting, LocalRegistry):
    def __init__(self) -> None:
        LocalRegistry.__init__(self, poll_interval=0.02)
        self._init_counting()


@pytest.mark.parametrize("cls", [CountingMemoryRegistry, CountingLocalRegistry])
async def test_service_heartbeat_keeps_its_record_alive_and_exit_deregisters(
    cls: type[CountingMemoryRegistry | CountingLocalRegistry],
) -> None:
    registry = cls()
    deleted: list[Event] = []
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        watcher = registry.watch()

        async def watch_for_the_delete() -> None:
            deleted.append(await next_event(watcher, "delete", "task", within=20))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_for_the_delete)
                async with micro.Service("task", runtime=rt, ttl=0.3, heartbeat=0.05) as service:
                    first = registry.registrations[0]
                    with anyio.fail_after(10):
                        # heart-beats until three TTLs have passed since the first registration
                        while registry.registrations[-1] - first < 0.9:
                            await registry.registered.wait()
                    (got,) = await registry.get("task")
                    assert [n.id for n in got.nodes] == [service.id]
                # a clean exit deregisters at once: no waiting for the TTL
                with pytest.raises(ServiceNotFound):
                    await registry.get("task")
        finally:
            await watcher.aclose()
    assert [n.id for n in deleted[0].service.nodes] == [service.id]


async def test_handle_after_start_refreshes_the_record() -> None:
    class Later:
        async def Ping(self, req: dict[str, str]) -> dict[str, str]:
            return req

    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        watcher = registry.watch()
        async with micro.Service("svc", runtime=rt) as service:
            await next_event(watcher, "create", "svc")
            service.handle(Later())
            event = await next_event(watcher, "update", "svc")
            assert [e.name for e in event.service.endpoints] == ["Later.Ping"]
        await watcher.aclose()


async def test_one_memory_registry_shared_by_two_runtimes() -> None:
    """Closing one runtime must not end the other's watch (its client cache depends on it)."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://"):
        watcher = registry.watch()
        async with micro.Runtime(registry=registry, store="memory://", broker="memory://"):
            pass
        await registry.register(record(), ttl=30)
        assert (await next_event(watcher, "create", "task")).service.name == "task"
        await watcher.aclose()


# -- local only -------------------------------------------------------------------------------


async def test_local_registry_lives_under_micro_home(micro_home: Path) -> None:
    async with LocalRegistry() as reg:
        assert reg.path == micro_home / "registry"
        await reg.register(record(), ttl=30)
        files = list((micro_home / "registry").glob("*.json"))
        assert [f.name for f in files] == ["task~latest~n1.json"]


async def test_micro_home_isolates_local_registries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LocalRegistry() as here:
        await here.register(record(), ttl=30)
        monkeypatch.setenv("MICRO_HOME", str(tmp_path / "elsewhere"))
        async with LocalRegistry() as there:
            assert await there.list() == []
            with pytest.raises(ServiceNotFound):
                await there.get("task")
        async with LocalRegistry(f"local://{here.path}") as same_dir:
            assert [r.name for r in await same_dir.list()] == ["task"]


async def test_local_registry_ignores_garbage_files(micro_home: Path) -> None:
    async with LocalRegistry() as reg:
        await reg.register(record(), ttl=30)
        (reg.path / "broken~latest~x.json").write_bytes(b"{not json")
        (reg.path / ".half-written.tmp").write_bytes(b"{")
        assert [r.name for r in await reg.list()] == ["task"]


async def test_local_entries_are_plain_json_with_expiry_and_pid(micro_home: Path) -> None:
    import os

    async with LocalRegistry() as reg:
        await reg.register(record(), ttl=30)
        (path,) = reg.path.glob("*.json")
        entry = msgspec.json.decode(path.read_bytes())
        assert entry["pid"] == os.getpid()
        assert entry["expires"] > time.time()
        assert entry["record"]["name"] == "task"


# -- URLs -------------------------------------------------------------------------------------


def test_registry_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, micro_home: Path) -> None:
    assert isinstance(from_url("memory://"), MemoryRegistry)
    local = from_url("local://")
    assert isinstance(local, LocalRegistry) and local.path == micro_home / "registry"
    custom = from_url(f"local://{tmp_path / 'reg'}")
    assert isinstance(custom, LocalRegistry) and custom.path == tmp_path / "reg"
    assert isinstance(from_url(None), LocalRegistry)  # the default: machine-wide
    monkeypatch.setenv("MICRO_REGISTRY", "memory://")
    assert isinstance(from_url(None), MemoryRegistry)
    with pytest.raises(ConfigError, match="bogus://"):
        from_url("bogus://x")


async def test_long_names_register_on_every_registry(registry: Registry) -> None:
    # percent-encoded, a 16-character CJK name and its node id passed the 255-byte file name limit,
    # and the local registry (the default) failed to register it
    name = "注文処理サービス用のバックエンド"
    rec = record(name, node=f"{name}-{'a' * 32}", version="v" * 60)
    await registry.register(rec, ttl=30)
    (got,) = await registry.get(name)
    assert got == rec
    other = record(name + "2", node="n2")  # a name that shares the cut prefix stays apart
    await registry.register(other, ttl=30)
    assert [r.nodes[0].id for r in await registry.get(name)] == [rec.nodes[0].id]
    await registry.deregister(rec)
    await registry.deregister(other)
    assert await registry.list() == []
    if isinstance(registry, LocalRegistry):
        assert list(registry.path.iterdir()) == []  # no temporary file left behind


class HeartbeatWatcher(MemoryRegistry):
    """Notes whether the service's heartbeat task is still alive when it is deregistered."""

    heartbeat_alive: bool | None = None

    async def deregister(self, record: ServiceRecord) -> None:
        import asyncio

        beats = [t for t in asyncio.all_tasks() if "Heartbeat.run" in t.get_name()]
        self.heartbeat_alive = any(not t.done() for t in beats)
        await super().deregister(record)


async def test_a_stopping_service_stops_its_heartbeat_before_it_deregisters() -> None:
    # a beat that landed after the deregistration put the stopped service's node back (a "ghost")
    registry = HeartbeatWatcher()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        svc = micro.New("task", runtime=rt)

        class Task:
            async def Ping(self, req: dict[str, str]) -> dict[str, str]:
                """Ping."""
                return req

        svc.handle(Task())
        async with svc:
            pass
    assert registry.heartbeat_alive is False
