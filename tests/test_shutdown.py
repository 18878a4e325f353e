"""Graceful shutdown: deregister first, let in-flight calls finish, leave no task behind."""

from __future__ import annotations

import asyncio

import anyio
import msgspec

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


async def test_in_flight_calls_finish_and_no_task_is_left() -> None:
    before = asyncio.all_tasks()
    registry = MemoryRegistry()
    slow = Slow()
    results: list[object] = []
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as client_rt:
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


async def test_a_call_past_the_drain_timeout_is_cancelled_cleanly() -> None:
    registry = MemoryRegistry()
    slow = Slow()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as client_rt:
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
