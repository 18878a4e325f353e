"""One timer for the deadlines of many calls: the in-process path's, and both ends of the native wire's.

``asyncio.timeout_at`` schedules and cancels a timer handle per call, which was
~70% of the in-process fast path's own cost. :class:`Watchdog` keeps the calls
in flight in a heap and one timer at the earliest deadline: with a fixed default
timeout, deadlines arrive in order and the timer almost never moves, so a call
costs a heap push and a flag. Semantics match ``asyncio.timeout``: when a
deadline passes the task is cancelled, and :meth:`Watch.expired` tells the
caller to turn that ``CancelledError`` into ``Timeout`` (after ``uncancel()``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from types import TracebackType

from micro.errors import Timeout


class Watch:
    """One call under watch; a context manager around the awaited work."""

    __slots__ = ("_dog", "deadline", "done", "fired", "seq", "task", "where")

    def __init__(self, dog: Watchdog, task: asyncio.Task[object], deadline: float, seq: int, where: str) -> None:
        self._dog = dog
        self.task = task
        self.deadline = deadline
        self.seq = seq
        self.where = where
        self.done = False
        self.fired = False

    def __lt__(self, other: Watch) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.done = True
        self._dog.active -= 1
        if self.fired and t is asyncio.CancelledError and self.task.uncancel() == 0:
            raise Timeout(f"{self.where}: deadline exceeded") from None


class Watchdog:
    """Cancels tasks whose deadline passed; one ``call_at`` handle for all of them."""

    def __init__(self) -> None:
        self._heap: list[Watch] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.active = 0

    def watch(self, deadline: float, where: str) -> Watch:
        """Watch the current task until the returned context exits."""
        task = asyncio.current_task()
        assert task is not None
        w = Watch(self, task, deadline, next(self._seq), where)
        heap = self._heap
        if len(heap) > 64 and len(heap) > 4 * self.active:  # drop finished calls, amortised O(1)
            heap[:] = [x for x in heap if not x.done]
            heapq.heapify(heap)
        heapq.heappush(heap, w)
        self.active += 1
        if deadline < self._timer_at:
            self._arm(deadline)
        return w

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and (heap[0].done or heap[0].deadline <= now):
            w = heapq.heappop(heap)
            if not w.done and not w.fired:
                w.fired = True
                w.task.cancel()
        if heap:
            self._arm(heap[0].deadline)
