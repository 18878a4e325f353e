"""micro.cancel: a task cancelled from outside as an anyio cancel scope around it would cancel it."""

from __future__ import annotations

import asyncio
import functools
import weakref
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from micro import cancel
from micro.deadlines import Watchdog
from micro.errors import Timeout


class CancelTimers:
    """Counts the timers :mod:`micro.cancel` has outstanding on a loop (scheduled, not yet run or cancelled):
    one per task whose cancellation is held back, however often it was cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: list[asyncio.TimerHandle] = []
        real = loop.call_later

        def spy(delay: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
            func = callback.func if isinstance(callback, functools.partial) else callback
            if getattr(func, "__module__", None) != cancel.__name__:
                return real(delay, callback, *args, context=context)

            def run(*a: Any) -> None:
                self.live.remove(handle)
                callback(*a)

            handle = real(delay, run, *args, context=context)
            self.live.append(handle)
            return handle

        monkeypatch.setattr(loop, "call_later", spy)

    def outstanding(self) -> int:
        return sum(not h.cancelled() for h in self.live)


async def _in_a_shield(release: anyio.Event, inside: anyio.Event, seen: list[str]) -> None:
    with anyio.CancelScope(shield=True):
        inside.set()
        await release.wait()
        seen.append("section done")
    await anyio.sleep_forever()


async def test_a_task_cancelled_again_and_again_in_a_shield_has_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of cancellations of a task in a shielded section (a caller's CANCEL frames) holds one record and
    one timer, not one retry chain each; the one cancellation is delivered once the section is done."""
    loop = asyncio.get_running_loop()
    timers = CancelTimers(loop, monkeypatch)
    release, inside, seen = anyio.Event(), anyio.Event(), []
    task = loop.create_task(_in_a_shield(release, inside, seen))
    await inside.wait()
    delivered: list[str] = []
    note = functools.partial(delivered.append, "watch")
    for _ in range(1000):
        cancel.cancel(task)
        cancel.cancel(task, delivered=note)  # another request (a deadline's): held once too
    assert timers.outstanding() == 1 and cancel.pending(task)
    release.set()
    await asyncio.wait([task])
    assert task.cancelled() and seen == ["section done"] and delivered == ["watch"]
    assert timers.outstanding() == 0 and not cancel.pending(task)


async def test_cut_cancels_inside_the_shield_and_ends_the_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner that waited long enough cuts the section: ``Task.cancel()`` at once, and no timer is left."""
    loop = asyncio.get_running_loop()
    timers = CancelTimers(loop, monkeypatch)
    inside, seen = anyio.Event(), []
    task = loop.create_task(_in_a_shield(anyio.Event(), inside, seen))
    await inside.wait()
    cancel.cancel(task)
    assert cancel.pending(task)
    cancel.cut(task)
    assert timers.outstanding() == 0 and not cancel.pending(task)
    await asyncio.wait([task])
    assert task.cancelled() and seen == []


async def test_shields_outside_the_work_do_not_count() -> None:
    """A task no longer inside ``base`` is in scopes that are not the work's: its caller's own shield is not a
    section of the work to wait for."""
    task = asyncio.current_task()
    assert task is not None
    with anyio.CancelScope(shield=True):
        assert cancel.shielded(task)  # since the start of the task: this shield counts
        with anyio.CancelScope():
            base = cancel.scope_of(task)
            assert base is not None and not cancel.shielded(task, base)
            with anyio.CancelScope(shield=True):
                assert cancel.shielded(task, base)
                await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
        assert not cancel.shielded(task, base)  # out of base: the shield around it is the caller's
        await anyio.lowlevel.checkpoint()


async def test_the_looks_at_a_held_task_back_off_up_to_poll_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task held in a long section is looked at after POLL, then twice as long each time up to POLL_MAX (a
    thousand held tasks looked at every 5 ms cost a third of a CPU); once out, the next look delivers."""
    loop = asyncio.get_running_loop()
    real = loop.call_later
    delays: list[float] = []
    looks: list[tuple[Any, tuple[Any, ...]]] = []
    handles: list[asyncio.TimerHandle] = []

    def spy(delay: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        if getattr(callback, "__module__", None) != cancel.__name__:
            return real(delay, callback, *args, context=context)
        delays.append(delay)
        looks.append((callback, args))
        handles.append(real(3600, lambda: None))  # the test makes each look itself
        return handles[-1]

    monkeypatch.setattr(loop, "call_later", spy)
    release, inside, seen = anyio.Event(), anyio.Event(), []
    task = loop.create_task(_in_a_shield(release, inside, seen))
    await inside.wait()
    cancel.cancel(task)
    for _ in range(8):
        callback, args = looks[-1]
        callback(*args)
    assert delays == pytest.approx([min(cancel.POLL * 2 ** i, cancel.POLL_MAX) for i in range(9)])
    assert cancel.POLL_MAX > cancel.POLL and cancel.pending(task)
    release.set()
    with anyio.fail_after(5):
        while cancel.shielded(task):
            await anyio.lowlevel.checkpoint()
    callback, args = looks[-1]
    callback(*args)
    with anyio.fail_after(5):
        await asyncio.wait([task])
    assert task.cancelled() and seen == ["section done"] and not cancel.pending(task) and len(delays) == 9
    for handle in handles:
        handle.cancel()


class _Scope:  # as anyio 4.6 to 4.13 define it: attributes set in __init__, no __slots__
    def __init__(self, *, shield: bool = False) -> None:
        self._parent_scope: _Scope | None = None
        self._shield = shield

    @property
    def shield(self) -> bool:
        return self._shield


class _State:
    def __init__(self, parent_id: int | None, cancel_scope: _Scope | None) -> None:
        self.parent_id, self.cancel_scope = parent_id, cancel_scope


class _NoParent:
    shield = False


def test_the_shield_record_is_looked_for_on_instances_not_slots() -> None:
    """anyio declares ``__slots__`` only from 4.14; 4.6 to 4.13 (which pyproject allows) keep the same record
    in plain attributes: shields are respected there too. A backend without it cancels at once."""
    old = SimpleNamespace(CancelScope=_Scope, TaskState=_State, _task_states=weakref.WeakKeyDictionary())
    assert cancel.readable(old)
    assert not cancel.readable(SimpleNamespace(CancelScope=_NoParent, TaskState=_State, _task_states={}))
    assert not cancel.readable(SimpleNamespace(CancelScope=_Scope, TaskState=_State))
    assert cancel.SHIELDS  # and the installed anyio has it


async def test_held_cancellations_delivered_together_are_each_counted() -> None:
    """A caller's cancel and a deadline held back by the same shielded section are delivered together when the
    task leaves it, one ``Task.cancel()`` each: the deadline's watch takes back its own alone, and the caller's
    goes through as with ``asyncio.timeout`` (it used to be consumed: one ``Task.cancel()`` for both, turned
    into a ``Timeout`` the handler could catch and run on after its caller was gone)."""
    dog = Watchdog()
    inside, release, seen, watches = anyio.Event(), anyio.Event(), [], []

    async def handler() -> None:
        try:
            with dog.watch(asyncio.get_running_loop().time(), "inner") as w:  # fires once the task waits
                watches.append(w)
                with anyio.CancelScope(shield=True):
                    inside.set()
                    await release.wait()
                await anyio.sleep_forever()
        except Timeout:
            seen.append("Timeout")  # a fallback after a timed-out dependency
        await anyio.lowlevel.checkpoint()
        seen.append("ran on after the caller's cancel")

    task = asyncio.get_running_loop().create_task(handler())
    await inside.wait()
    cancel.cancel(task)  # the caller's reset: held
    with anyio.fail_after(5):
        while not watches[0].expired:  # the deadline's cancellation: held too
            await anyio.lowlevel.checkpoint()
    assert cancel.pending(task) and not watches[0].fired
    release.set()
    with anyio.fail_after(5):
        await asyncio.wait([task])
    assert task.cancelled() and seen == []
