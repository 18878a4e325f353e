"""Graceful shutdown: deregister first, let in-flight calls finish, leave no task behind."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.errors import Unavailable
from micro.registry.memory import MemoryRegistry


class Q(msgspec.Struct):
    n: int = 0


class Slow:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def Work(self, req: Q) -> Q:
        """Wait to be released."""
        self.started.set()
        await self.release.wait()
        return Q(req.n + 1)


@pytest.mark.parametrize("wire", ["grpc", "native"])
async def test_in_flight_calls_finish_and_no_task_is_left(wire: str) -> None:
    before = asyncio.all_tasks()
    registry = MemoryRegistry()
    slow = Slow()
    results: list[object] = []
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as client_rt:
        server_rt = micro.Runtime(registry=registry, store="memory://", broker="memory://")
        async with server_rt:
            svc = micro.New("slow", runtime=server_rt, drain_timeout=30)
            svc.handle(slow)
            await svc.start()

            async def call() -> None:
                results.append(await client_rt.client.call("slow", "Slow.Work", {"n": 1}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    await slow.started.wait()

                async def stop() -> None:
                    await svc.stop()

                tg.start_soon(stop)
                with anyio.fail_after(10):  # deregistered before draining: new callers stop finding it
                    while registry._nodes:
                        await anyio.wait_all_tasks_blocked()
                slow.release.set()
            assert results == [{"n": 2}]  # the call in flight finished
            client_rt.client.forget("slow")
            try:
                await client_rt.client.call("slow", "Slow.Work", {}, timeout=5)
                raise AssertionError("a stopped service answered")
            except (micro.errors.NotFound, Unavailable):
                pass
    await anyio.wait_all_tasks_blocked()
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leftover == [], leftover


@pytest.mark.parametrize("wire", ["grpc", "native"])
async def test_a_call_past_the_drain_timeout_is_cancelled_cleanly(wire: str) -> None:
    registry = MemoryRegistry()
    slow = Slow()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=wire) as client_rt:
        server_rt = micro.Runtime(registry=registry, store="memory://", broker="memory://")
        async with server_rt:
            svc = micro.New("slow", runtime=server_rt, drain_timeout=0.2)
            svc.handle(slow)
            await svc.start()
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await client_rt.client.call("slow", "Slow.Work", {})
                except micro.errors.Error as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    await slow.started.wait()
                with anyio.fail_after(10):
                    await svc.stop()  # never released: cancelled after 0.2 s
    (err,) = outcome
    assert isinstance(err, micro.errors.Error)
    assert isinstance(err, Unavailable) and "dropped the call" in str(err)


class Gate(msgspec.Struct):
    job: int = 0


class Blocking:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def Do(self, req: Gate) -> Gate:
        """Wait to be released, then answer."""
        self.started.set()
        await self.release.wait()
        return req


async def test_stopping_a_flow_lets_the_event_in_flight_finish_and_record() -> None:
    from micro.ai import scripted

    blocking = Blocking()
    model = scripted.turns(scripted.call("gate_Blocking_Do", job=1), scripted.reply("done"))
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        gate = micro.New("gate", runtime=rt)
        gate.handle(blocking)
        flow = micro.NewFlow(
            "jobs", trigger="jobs.created", prompt="Do job {job}.", services=["gate"], provider=model, runtime=rt
        )
        async with gate:
            await flow.start()
            await rt.client.publish("jobs.created", {"job": 1}, headers={"Micro-Id": "ev-1"})
            with anyio.fail_after(10):
                await blocking.started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(flow.stop)  # the event is mid-run: stop waits for it
                with anyio.fail_after(10):
                    while any(r.name == "jobs" for r in await rt.registry.list()):  # deregistered first
                        await anyio.wait_all_tasks_blocked()
                assert not any(r.name == "jobs" for r in await rt.registry.list())
                assert not blocking.release.is_set() and flow.active == 1  # still running its event
                blocking.release.set()
            run = await flow.runs.get("ev-1")
    assert run is not None and run.status == "completed" and run.reply == "done"


async def test_stopping_a_flow_closes_all_its_subscriptions_before_draining_them() -> None:
    # a flow has max_concurrency subscriptions on its trigger; closed one after another, the later ones
    # went on starting events while the first one drained
    started: list[int] = []
    gates: dict[int, anyio.Event] = {}

    async def work(event: dict[str, Any], run: Any) -> int:
        started.append(event["n"])
        gate = gates.setdefault(event["n"], anyio.Event())
        await gate.wait()
        return int(event["n"])

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        flow = micro.NewFlow("jobs", trigger="jobs.created", steps=[work], runtime=rt, max_concurrency=3)
        await flow.start()
        for n in range(10):
            await rt.client.publish("jobs.created", {"n": n})
        with anyio.fail_after(10):
            while len(started) < 3:
                await anyio.wait_all_tasks_blocked()
        assert len(started) == 3  # one event per subscription, each held at its gate
        async with anyio.create_task_group() as tg:
            tg.start_soon(flow.stop)
            with anyio.fail_after(10):
                while any(r.name == "jobs" for r in await rt.registry.list()):
                    await anyio.wait_all_tasks_blocked()
            await anyio.wait_all_tasks_blocked()  # stop() is now waiting for the events in flight
            first, *others = started
            for n in others:
                gates[n].set()  # two of the three finish...
            await anyio.wait_all_tasks_blocked()
            assert started == [first, *others]  # ...and no subscription takes another event
            gates[first].set()
    assert len(started) == 3
