"""One timer for the deadlines of many calls: the in-process path's, both ends of the native wire's, the gRPC server's.

``asyncio.timeout_at`` schedules and cancels a timer handle per call, which was
~70% of the in-process fast path's own cost. :class:`Watchdog` keeps the calls
in flight in a heap and one timer at the earliest deadline: with a fixed default
timeout, deadlines arrive in order and the timer almost never moves, so a call
costs a heap push and a flag. Semantics match ``asyncio.timeout``: when a
deadline passes the task is cancelled, and the watch's exit turns that
``CancelledError`` into ``Timeout`` (after ``uncancel()``). The cancellation goes through
:func:`micro.cancel.cancel`: a handler inside an anyio shielded scope entered since the watch
began finishes that section first, as anyio's own deadlines would let it. A watch is past its
deadline from the moment it fires: its exit raises ``Timeout`` also when the work ended before the
held cancellation could be delivered (it returned right after the section), as the native wire's
client would (it enforces the deadline itself).
A future can be watched too (:meth:`Watchdog.expire`): it fails with ``Timeout``.
A watchdog serves the event loop it is used on: used on another (a runtime or server
opened again under a second ``asyncio.run``), it drops the old loop's timer and calls.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from types import TracebackType
from typing import Any

from micro.cancel import cancel, scope_of
from micro.errors import Timeout


class Watch:
    """One call under watch; a context manager around the awaited work."""

    __slots__ = ("_dog", "base", "deadline", "done", "expired", "fired", "task", "where")

    def __init__(self, dog: Watchdog, task: asyncio.Task[Any], deadline: float, where: str,
                 base: object | None = None) -> None:
        self._dog = dog
        self.task = task
        self.base = base  # the task's anyio cancel scope when the watch began: shields outside it do not count
        self.deadline = deadline
        self.where = where
        self.done = False
        self.expired = False  # the deadline passed (its cancellation may wait for a shielded section)
        self.fired = False  # the task was cancelled for it

    def __enter__(self) -> Watch:
        return self

    def active(self) -> bool:
        return not self.done

    def fire(self) -> None:
        self.fired = True  # the task is cancelled now: its exit turns that into Timeout

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        """``Timeout`` when the deadline passed: the work's end (a result, an error, the cancellation
        the deadline delivered) came too late, also when a shielded section held that cancellation back
        and the work ended before it could be delivered. Another cancellation goes through."""
        self.done = True
        self._dog.active -= 1
        if not self.expired:
            return
        if t is asyncio.CancelledError:
            if self.fired and self.task.uncancel() == 0:
                raise Timeout(f"{self.where}: deadline exceeded") from None
            return  # not the deadline's cancellation (or someone else's too): it goes through
        if t is None or issubclass(t, Exception):
            if self.fired:
                self.task.uncancel()  # the work caught the deadline's cancellation and ended anyway
            raise Timeout(f"{self.where}: deadline exceeded") from e


class Watchdog:
    """Cancels tasks (and fails futures) whose deadline passed; one ``call_at`` handle for all of them.

    The heap holds ``(deadline, seq, target, where)`` tuples (compared in C); finished
    entries are dropped lazily, whenever the heap has doubled since it was last cleaned.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch | asyncio.Future[Any], str]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the timer and the calls belong to
        self._clean_at = 64
        self.active = 0

    def watch(self, deadline: float, where: str, task: asyncio.Task[Any] | None = None) -> Watch:
        """Watch ``task`` until the returned context exits: the current one (the work is what the context
        encloses), or a task that runs nothing but the watched work (anyio scopes it entered before count)."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None
            w = Watch(self, task, deadline, where, scope_of(task))
        else:
            w = Watch(self, task, deadline, where)
        self.active += 1
        self._push(deadline, w, where)
        return w

    def expire(self, fut: asyncio.Future[Any], deadline: float, where: str) -> None:
        """Fail ``fut`` with ``Timeout`` when ``deadline`` passes, unless it is done by then."""
        self._push(deadline, fut, where)

    def _push(self, deadline: float, target: Watch | asyncio.Future[Any], where: str) -> None:
        heap = self._heap
        if len(heap) >= self._clean_at:  # drop finished entries, amortised O(1)
            heap[:] = [x for x in heap if not (x[2].done if isinstance(x[2], Watch) else x[2].done())]
            heapq.heapify(heap)
            self._clean_at = max(64, 2 * len(heap))
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._adopt(loop)
            heap = self._heap
        heapq.heappush(heap, (deadline, next(self._seq), target, where))
        if deadline < self._timer_at:
            self._arm(deadline)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` from now on: the last loop's timer would never fire here (an earlier deadline armed
        there kept every later one from arming), and its calls cannot be cancelled from this one."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._heap = []
        self._clean_at = 64
        self._loop = loop

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        assert self._loop is not None  # set by _push before it arms
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        heap = self._heap
        assert self._loop is not None  # it armed the timer
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            _, _, target, where = heapq.heappop(heap)
            if isinstance(target, Watch):
                if not target.done and not target.expired:
                    target.expired = True  # its exit says Timeout, whether or not the cancel got through
                    cancel(target.task, target.base, active=target.active, delivered=target.fire)
            elif not target.done():
                target.set_exception(Timeout(f"{where}: deadline exceeded"))
        if heap:
            self._arm(heap[0][0])
