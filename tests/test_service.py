"""Services: handler introspection, lifecycle (start, drain, stop), the loop's shared
Runtime, and the example system in examples/tasks."""

from __future__ import annotations

import asyncio
import runpy
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest

import micro
from micro.errors import ServiceNotFound, Unavailable, UsageError
from micro.registry.memory import MemoryRegistry
from micro.service import endpoints_of

EXAMPLE = Path(__file__).parent.parent / "examples" / "tasks"


class Req(msgspec.Struct):
    user_id: str


class Rsp(msgspec.Struct):
    user_id: str
    count: int = 0


def memory_runtime(registry: MemoryRegistry | None = None) -> micro.Runtime:
    return micro.Runtime(registry=registry or MemoryRegistry(), store="memory://", broker="memory://")


# -- handler introspection --------------------------------------------------------------------


class Task:
    """Handler docstrings are not endpoint descriptions; method docstrings are."""

    limit = 10  # attributes are not endpoints

    async def ListOverdue(self, req: Req) -> Rsp:
        """List the tasks of a user that are past their due date.

        Second paragraph, kept.
        """
        return Rsp(req.user_id)

    async def Watch(self, req: Req) -> AsyncIterator[Rsp]:
        """Stream a user's tasks as they change."""
        yield Rsp(req.user_id)

    async def Feed(self, req: Req) -> AsyncGenerator[Rsp, None]:
        yield Rsp(req.user_id)

    async def Bare(self, req: Req) -> Rsp:
        return Rsp(req.user_id)

    def helper(self, x: int) -> int:  # sync: not an endpoint
        return x

    async def _private(self, req: Req) -> Rsp:  # private: not an endpoint
        return Rsp(req.user_id)

    @property
    def size(self) -> int:
        return 0


def test_public_async_methods_become_endpoints() -> None:
    found = {ep.name: ep for ep in endpoints_of(Task(), "task")}
    assert sorted(found) == ["Task.Bare", "Task.Feed", "Task.ListOverdue", "Task.Watch"]
    ep = found["Task.ListOverdue"]
    assert ep.path == "/task.Task/ListOverdue"
    assert ep.description == ("List the tasks of a user that are past their due date.\n\n"
                              "Second paragraph, kept.")
    assert ep.streaming is False
    assert ep.request.type is Req and ep.response.type is Rsp
    assert ep.wires == ("proto", "json")
    assert found["Task.Watch"].streaming is True
    assert found["Task.Watch"].response.type is Rsp  # the item type, not AsyncIterator[Rsp]
    assert found["Task.Watch"].description == "Stream a user's tasks as they change."
    assert found["Task.Feed"].streaming is True
    assert found["Task.Bare"].description == ""


def test_handler_name_can_be_given() -> None:
    (ep, *_) = endpoints_of(Task(), "task", name="Tasks")
    assert ep.name == "Tasks.Bare"
    assert ep.path == "/task.Tasks/Bare"


def test_inherited_endpoints_count() -> None:
    class Base:
        async def Ping(self, req: Req) -> Rsp:
            return Rsp(req.user_id)

    class Child(Base):
        async def Pong(self, req: Req) -> Rsp:
            return Rsp(req.user_id)

    assert [ep.name for ep in endpoints_of(Child(), "svc")] == ["Child.Ping", "Child.Pong"]


def test_proto_first_endpoints_take_the_proto_package() -> None:
    class Greeter:
        async def SayHello(self, req: HelloRequest) -> HelloReply:
            """Greet."""
            return HelloReply()

    (ep,) = endpoints_of(Greeter(), "anything")
    assert ep.path == "/greeter.Greeter/SayHello"
    assert ep.wires == ("proto", "json")


class NoAnnotations:
    async def Get(self, req):  # type: ignore[no-untyped-def]
        return req


class NoReturn:
    async def Get(self, req: Req):  # type: ignore[no-untyped-def]
        return req


class TwoArgs:
    async def Get(self, req: Req, other: Req) -> Rsp:
        return Rsp(req.user_id)


class NoArgs:
    async def Get(self) -> Rsp:
        return Rsp("x")


class YieldsUnannotated:
    async def Stream(self, req: Req) -> Rsp:  # type: ignore[misc]
        yield Rsp(req.user_id)


class ClaimsToStream:
    async def Stream(self, req: Req) -> AsyncIterator[Rsp]:  # type: ignore[misc]
        return Rsp(req.user_id)  # type: ignore[return-value]


class Unresolvable:
    async def Get(self, req: DoesNotExist) -> Rsp:  # type: ignore[name-defined]  # noqa: F821
        return Rsp("x")


class NotAMessageType:
    async def Get(self, req: asyncio.Event) -> Rsp:
        return Rsp("x")


class Nothing:
    def sync_only(self) -> None:
        pass


class MixedPackages:
    async def Hello(self, req: HelloRequest) -> HelloReply:
        return HelloReply()

    async def Plain(self, req: Req) -> Rsp:
        return Rsp("x")


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        (Task, r"not the class Task: handle\(Task\(\)\)"),
        (NoAnnotations(), r"NoAnnotations\.Get must take exactly one annotated request argument"),
        (NoReturn(), r"NoReturn\.Get needs a return annotation"),
        (TwoArgs(), r"TwoArgs\.Get must take exactly one"),
        (NoArgs(), r"NoArgs\.Get must take exactly one"),
        (YieldsUnannotated(), r"YieldsUnannotated\.Stream yields: annotate it -> AsyncIterator\[Rsp\]"),
        (ClaimsToStream(), r"ClaimsToStream\.Stream is annotated as streaming: make it an async "
                           r"generator"),
        (Unresolvable(), r"Unresolvable\.Get: cannot resolve its annotations"),
        (NotAMessageType(), r"cannot be a request or response type"),
        (Nothing(), r"Nothing has no endpoints"),
        (MixedPackages(), r"MixedPackages mixes protobuf packages \['greeter', 'svc'\]"),
    ],
)
def test_malformed_handlers_are_usage_errors(handler: object, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        endpoints_of(handler, "svc")


def test_service_names_and_duplicate_handlers() -> None:
    for bad in ("", "has space", "a/b", "a~b"):
        with pytest.raises(UsageError, match="invalid service name"):
            micro.Service(bad)
    service = micro.Service("task")
    service.handle(Task())
    with pytest.raises(UsageError, match=r"Task\.Bare is already handled"):
        service.handle(Task())
    assert sorted(service.endpoints) == ["Task.Bare", "Task.Feed", "Task.ListOverdue", "Task.Watch"]


def test_using_a_service_before_it_runs_is_a_usage_error() -> None:
    service = micro.Service("task")
    with pytest.raises(UsageError, match="not running"):
        _ = service.client


# -- lifecycle --------------------------------------------------------------------------------


async def test_async_with_binds_registers_and_returns_once_callable() -> None:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as rt:
        service = micro.Service("task", runtime=rt, version="1.2.0", metadata={"team": "core"})
        service.handle(Task())
        async with service as entered:
            assert entered is service
            (record,) = await registry.get("task")
            assert record.version == "1.2.0" and record.metadata == {"team": "core"}
            (node,) = record.nodes
            assert node.id == service.id and node.address == service.address
            host, _, port = service.address.rpartition(":")
            assert host == "127.0.0.1" and int(port) > 0
            with socket_to(host, int(port)):
                pass  # the port is bound and accepting
            assert service.client is rt.client
            with pytest.raises(UsageError, match="already running"):
                await service.start()
        with pytest.raises(ServiceNotFound):
            await registry.get("task")
        await service.stop()  # idempotent


class socket_to:
    def __init__(self, host: str, port: int) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=5)

    def __enter__(self) -> socket_to:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_wait_returns_once_stopped() -> None:
    async with memory_runtime() as rt:
        service = micro.Service("task", runtime=rt)
        service.handle(Task())
        async with anyio.create_task_group() as tg:
            await service.start()
            waited = anyio.Event()

            async def waiter() -> None:
                await service.wait()
                waited.set()

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not waited.is_set()
            await service.stop()
            with anyio.fail_after(5):
                await waited.wait()


async def test_start_and_stop_from_different_tasks() -> None:
    """A fixture's set-up and teardown, or a signal handler, stop what another task started."""
    async with memory_runtime() as rt:
        service = micro.Service("task", runtime=rt)
        service.handle(Task())
        started = asyncio.ensure_future(service.start())
        await started
        assert (await rt.client.call("task", "Task.Bare", {"user_id": "a"}))["user_id"] == "a"
        await asyncio.ensure_future(service.stop())


class Blocking:
    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = False

    async def Hold(self, req: Req) -> Rsp:
        self.entered.set()
        try:
            await self.release.wait()
        except BaseException:
            self.cancelled = True
            raise
        return Rsp(req.user_id, 1)


async def test_stop_drains_in_flight_calls() -> None:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry) as away:
        blocking = Blocking()
        service = micro.Service("hold", runtime=home, drain_timeout=30)
        service.handle(blocking)
        await service.start()
        results: list[Any] = []
        async with anyio.create_task_group() as tg:
            async def call() -> None:
                results.append(await away.client.call("hold", "Blocking.Hold", {"user_id": "a"}))

            tg.start_soon(call)
            with anyio.fail_after(5):
                await blocking.entered.wait()
            stopping = asyncio.ensure_future(service.stop())
            await anyio.wait_all_tasks_blocked()
            # deregistered first: newcomers no longer find the service...
            with pytest.raises(ServiceNotFound):
                await registry.get("hold")
            assert not stopping.done()  # ...while the call in flight is waited for
            blocking.release.set()
            with anyio.fail_after(5):
                await stopping
    assert results == [{"user_id": "a", "count": 1}]
    assert not blocking.cancelled


async def test_stop_cancels_calls_that_outlive_the_drain_timeout() -> None:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry) as away:
        blocking = Blocking()
        service = micro.Service("hold", runtime=home, drain_timeout=0.2)
        service.handle(blocking)
        await service.start()
        errors: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            async def call() -> None:
                try:
                    await away.client.call("hold", "Blocking.Hold", {"user_id": "a"})
                except micro.errors.Error as exc:
                    errors.append(exc)

            tg.start_soon(call)
            with anyio.fail_after(5):
                await blocking.entered.wait()
            with anyio.fail_after(10):
                await service.stop()
    assert blocking.cancelled
    assert len(errors) == 1 and isinstance(errors[0], Unavailable)


# -- the loop's shared runtime ----------------------------------------------------------------


async def test_services_without_a_runtime_share_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICRO_REGISTRY", "memory://")
    monkeypatch.setenv("MICRO_STORE", "memory://")
    monkeypatch.setenv("MICRO_BROKER", "memory://")

    class Caller:
        async def Relay(self, req: Req) -> Rsp:
            rsp: Rsp = await caller.client.call("task", "Task.ListOverdue", req, response_type=Rsp)
            return Rsp(rsp.user_id, rsp.count + 1)

    task = micro.New("task")
    task.handle(Task())
    caller = micro.New("caller")
    caller.handle(Caller())
    async with task, caller:
        assert task.runtime is caller.runtime is micro.Runtime.current()
        assert task.client is caller.client
        assert type(task.runtime.registry) is MemoryRegistry
        rsp = await caller.client.call("caller", "Caller.Relay", {"user_id": "z"})
        assert rsp == {"user_id": "z", "count": 1}
        # the first example: handle() inside `async with`, then call
        extra = micro.New("extra")
        async with extra:
            extra.handle(Task())
            assert (await extra.client.call("extra", "Task.Bare", {"user_id": "q"}))["user_id"] == "q"
    # the last service out closed it: the next one gets a fresh runtime
    assert micro.Runtime.current() is not task.runtime


# -- the example ------------------------------------------------------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("services", None)
    import services

    yield services
    sys.modules.pop("services", None)


OVERDUE = ["Write quarterly report", "Review PR #42", "Update deployment docs"]


async def test_example_app_as_micro_run_starts_it(example: ModuleType) -> None:
    """app.py as written, on the default (local) registry under this test's MICRO_HOME."""
    app = runpy.run_path(str(EXAMPLE / "app.py"))
    task, project = app["task"], app["project"]
    async with task, project:
        client = task.client
        rsp = await client.call("task", "Task.ListOverdue", {"user_id": "alice"})
        assert rsp["total"] == 3
        assert [r["title"] for r in rsp["records"]] == OVERDUE
        assert {r["assignee"] for r in rsp["records"]} == {"alice"}
        detail = await client.call("project", "Project.Get", {"id": "p1"})
        assert detail["record"]["name"] == "Website"
        assert sorted(t["id"] for t in detail["tasks"]) == ["t1", "t2", "t6"]
        # another process's view: a second runtime on the same machine-wide registry
        async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as other:
            remote = await other.client.call("task", "Task.ListOverdue", {"user_id": "alice"})
            assert remote == rsp
            records = {r.name: r for r in await other.registry.list()}
            assert {"task", "project"} <= set(records)
            endpoint = records["task"].endpoint("Task.ListOverdue")
            assert endpoint is not None and endpoint.request["required"] == ["user_id"]
            assert endpoint.description.startswith("List the open tasks of a user")


async def test_example_over_the_network(example: ModuleType) -> None:
    """task and project in different runtimes: Project.Get reaches the task service over gRPC."""
    registry = MemoryRegistry()
    async with memory_runtime(registry) as a, memory_runtime(registry) as b, \
            memory_runtime(registry) as caller:
        task = micro.Service("task", runtime=a)
        task.handle(example.Task())
        project = micro.Service("project", runtime=b)
        project.handle(example.Project(project))
        async with task, project:
            rsp = await caller.client.call("task", "Task.ListOverdue", {"user_id": "alice"},
                                           response_type=example.ListOverdueResponse)
            assert rsp.total == 3 and [r.title for r in rsp.records] == OVERDUE
            as_of = await caller.client.call("task", "Task.ListOverdue",
                                             {"user_id": "alice", "as_of": "2026-06-02"})
            assert [r["title"] for r in as_of["records"]] == ["Write quarterly report"]
            detail = await caller.client.call("project", "Project.Get", {"id": "p2"})
            assert sorted(t["id"] for t in detail["tasks"]) == ["t3", "t4", "t5", "t7"]
            with pytest.raises(micro.errors.NotFound, match="no project 'p9'"):
                await caller.client.call("project", "Project.Get", {"id": "p9"})
            with pytest.raises(micro.errors.BadRequest, match="as_of"):
                await caller.client.call("task", "Task.ListOverdue",
                                         {"user_id": "alice", "as_of": "June"})
