"""The in-process deadline watchdog: one timer, the same semantics as asyncio.timeout."""

from __future__ import annotations

import asyncio

import anyio
import msgspec
import pytest

import micro
from micro import cancel
from micro.deadlines import Watchdog
from micro.errors import Timeout


class Wait(msgspec.Struct):
    key: str


class Waiter:
    def __init__(self) -> None:
        self.events: dict[str, anyio.Event] = {}
        self.cancelled: list[str] = []
        self.two_cancelled = anyio.Event()

    async def Hold(self, req: Wait) -> Wait:
        """Wait until released."""
        ev = self.events.setdefault(req.key, anyio.Event())
        try:
            await ev.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(req.key)
            if len(self.cancelled) == 2:
                self.two_cancelled.set()
            raise
        return req


async def test_each_call_times_out_at_its_own_deadline_and_only_then() -> None:
    waiter = Waiter()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("w", runtime=rt)
        svc.handle(waiter)
        async with svc:
            results: dict[str, str] = {}

            async def call(key: str, timeout: float) -> None:
                try:
                    await rt.client.call("w", "Waiter.Hold", {"key": key}, timeout=timeout)
                    results[key] = "ok"
                except Timeout:
                    results[key] = "timeout"
                await anyio.lowlevel.checkpoint()  # the caller's task is not left cancelled
                results[key] += "+alive"

            async with anyio.create_task_group() as tg:
                # registered out of deadline order: the watchdog's timer must move earlier
                tg.start_soon(call, "long", 30.0)
                tg.start_soon(call, "short", 0.05)
                tg.start_soon(call, "short2", 0.1)
                with anyio.fail_after(10):
                    await waiter.two_cancelled.wait()
                waiter.events["long"].set()
    assert results == {"short": "timeout+alive", "short2": "timeout+alive", "long": "ok+alive"}
    assert sorted(waiter.cancelled) == ["short", "short2"]


async def test_cancellation_from_outside_is_not_reported_as_a_timeout() -> None:
    waiter = Waiter()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("w", runtime=rt)
        svc.handle(waiter)
        async with svc:
            with anyio.move_on_after(0.05) as scope:
                await rt.client.call("w", "Waiter.Hold", {"key": "x"}, timeout=30)
            assert scope.cancelled_caught  # the caller's own scope, not micro's Timeout
            assert waiter.cancelled == ["x"]


async def test_finished_calls_do_not_pile_up() -> None:
    dog = Watchdog()
    for _ in range(1000):
        with dog.watch(anyio.current_time() + 60, "x"):
            await anyio.lowlevel.checkpoint()
    assert dog.active == 0
    assert len(dog._heap) <= 65


async def test_a_passed_deadline_inside_a_handler_chain_is_a_timeout() -> None:
    with pytest.raises(Timeout, match="deadline exceeded"):
        dog = Watchdog()
        with dog.watch(anyio.current_time() + 0.01, "svc X.Y"):
            await anyio.sleep(5)


async def test_a_watch_made_after_its_deadline_passed_fires_at_once() -> None:
    # the native server's calls: watched only once they outlived their first step, maybe past their deadline
    dog = Watchdog()
    with pytest.raises(Timeout, match=r"svc X\.Y: deadline exceeded"):
        with dog.watch(anyio.current_time() - 1, "svc X.Y"):
            assert dog.active == 1
            await anyio.sleep(30)  # cancelled at once, as a Timeout
    assert dog.active == 0


def test_micro_reads_anyio_s_cancel_scopes() -> None:
    """micro.cancel reads anyio's private record of cancel scopes; a new anyio without it would cut shielded
    sections again, silently: this says so instead."""
    assert cancel.SHIELDS


async def test_a_deadline_watched_inside_a_shielded_scope_still_fires() -> None:
    """Only shields entered after the watch began hold its cancellation back, not the caller's own."""
    dog = Watchdog()
    loop = asyncio.get_running_loop()
    ended: list[bool] = []
    with anyio.CancelScope(shield=True):
        with pytest.raises(Timeout, match="x: deadline exceeded"), dog.watch(loop.time() + 0.05, "x"):
            await anyio.sleep(30)
        with pytest.raises(Timeout, match="y: deadline exceeded"), dog.watch(loop.time() + 0.05, "y") as w:
            with anyio.CancelScope(shield=True):  # entered after the watch began: the section ends first
                await anyio.sleep(0.2)
                ended.append(w.fired)
            await anyio.sleep(30)
        assert ended == [False]  # and the cancellation came after it
        assert w.fired


async def test_a_deadline_that_passed_in_a_shielded_section_is_a_timeout_when_the_work_ends_after_it() -> None:
    """The watch is past its deadline once it fires, whether or not the cancellation got through: work that
    ends right after its shielded section (before the held cancellation is delivered) is a Timeout too."""
    dog = Watchdog()
    loop = asyncio.get_running_loop()
    ended: list[str] = []
    with pytest.raises(Timeout, match="z: deadline exceeded"), dog.watch(loop.time() + 0.05, "z") as w:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)  # the deadline passes in here
        ended.append("section done")  # and nothing waits after it
    assert ended == ["section done"] and w.expired and not w.fired
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
