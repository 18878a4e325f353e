"""Background tasks for an object that one task opens and another may close.

The Runtime, a Service and the brokers each own work that runs while they are open
(a registry watcher, heartbeats, subscription workers). They are often opened by
one task and closed by another: a pytest fixture's set-up and teardown, ``start()``
from one coroutine and ``stop()`` from a signal handler's. An anyio task group
entered directly could only be left by the task that entered it, so
:class:`BackgroundTasks` runs the group in a task of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import anyio
import anyio.abc

from micro.errors import UsageError

__all__ = ["BackgroundTasks", "Failing", "Streak", "backoff"]


def backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): ``first`` doubling up to ``cap``, ±20 % jitter."""
    return min(cap, first * 2.0 ** min(attempt - 1, 30)) * random.uniform(0.8, 1.2)


class Streak:
    """Logs a repeated failure once per streak: the first failure, then its end.

    For loops that catch their own errors (a heartbeat): ``failed(e)`` logs a warning
    the first time and at debug level after; ``ok()`` logs once that it works again.

    Args:
        what: names the work in messages (``"service task: heartbeat to the registry"``).
        logger: where to log.
    """

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.failures = 0
        self._log = logger

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            self._log.warning("%s failed: %s (logged again when it works)", self.what, error, exc_info=error)
        else:
            self._log.debug("%s failed again (%d in a row): %s", self.what, self.failures, error)

    def ok(self) -> None:
        if self.failures:
            self._log.info("%s works again (after %d failures)", self.what, self.failures)
            self.failures = 0


class Failing(NamedTuple):
    """A supervised task's streak of failures (:attr:`BackgroundTasks.failing`)."""

    since: float
    """When the streak began (``time.time()``)."""
    failures: int
    """Failures in a row so far."""
    error: str
    """The last one (``repr``), or ``"ended"`` for work that returned."""


class BackgroundTasks:
    """An anyio task group that runs in a task of its own.

    :meth:`start` opens the group; :attr:`task_group` and :meth:`start_soon` add work
    to it while it is open. :meth:`aclose` (idempotent, from any task) cancels what
    still runs and waits for it to end, shielded from the caller's cancellation.
    A background task that crashes ends the group (anyio cancels its siblings) and
    is logged on ``logger`` with the traceback when it happens; :meth:`aclose` does
    not raise it again, so the owner's close goes on with the rest of its clean-up.

    Args:
        name: names the host task and the owner in messages (``"broker memory://"``).
        logger: where a crash is logged (default ``micro.tasks``); pass the owner's.
    """

    def __init__(self, name: str, logger: logging.Logger | None = None) -> None:
        self.name = name
        self._log = logger or logging.getLogger("micro.tasks")
        self._tg: anyio.abc.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.failing: dict[str, Failing] = {}
        """Supervised tasks in a streak of failures, by name (see :meth:`supervise`); a runtime's count
        against its readiness (:class:`micro.health.Backends`)."""

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The open task group; ``UsageError`` once closed or ended by a crash."""
        if self._tg is None or self._stop.is_set() or self._host is None or self._host.done():
            raise UsageError(f"{self.name} is not running")
        return self._tg

    async def start(self) -> anyio.abc.TaskGroup:
        """Start the host task; returns the task group once it is open."""
        ready = asyncio.Event()
        self._host = asyncio.create_task(self._run(ready), name=self.name)
        self._host.add_done_callback(self._report)
        await ready.wait()
        return self.task_group

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: object,
                   name: object = None) -> None:
        """Run ``fn(*args)`` in the group (``UsageError`` if it is not running)."""
        self.task_group.start_soon(fn, *args, name=name)

    def supervise(self, fn: Callable[[], Coroutine[Any, Any, Any]], *, name: str,
                  first_wait: float = 0.1, max_wait: float = 30.0) -> None:
        """Run ``fn()`` for as long as the group is open, starting it again when it fails or ends.

        The waits between starts double from ``first_wait`` up to ``max_wait`` (with
        jitter). A streak of failures is logged once (error, with the traceback) and its
        end once (info) when a run has lasted ``max_wait`` seconds; while it lasts,
        ``name`` is in :attr:`failing`. ``fn`` is a factory: each start makes its state
        anew (a fresh registry watch, not the broken one).
        """
        self.start_soon(self._supervised, fn, name, first_wait, max_wait, name=f"{self.name}: {name}")

    async def _supervised(self, fn: Callable[[], Coroutine[Any, Any, Any]], name: str,
                          first_wait: float, max_wait: float) -> None:
        streak = 0
        while True:
            async with anyio.create_task_group() as tg:
                if streak:
                    tg.start_soon(self._recovered, name, streak, max_wait)
                try:
                    await fn()
                    error: Exception | None = None
                except Exception as e:
                    error = e
                tg.cancel_scope.cancel()
            if name not in self.failing:
                streak = 0  # it ran long enough to count as recovered
            streak += 1
            what = f"failed: {error!r}" if error is not None else "ended"
            since = time.time() if streak == 1 else self.failing[name].since
            self.failing[name] = Failing(since, streak, repr(error) if error is not None else "ended")
            if streak == 1:
                self._log.error("%s: %s %s; starting it again (backoff up to %g s; logged again when it "
                                "has run %g s without failing)", self.name, name, what, max_wait, max_wait,
                                exc_info=error)
            else:
                self._log.debug("%s: %s %s again (%d in a row)", self.name, name, what, streak)
            await anyio.sleep(backoff(streak, first_wait, max_wait))

    async def _recovered(self, name: str, failures: int, after: float) -> None:
        await anyio.sleep(after)
        self.failing.pop(name, None)
        self._log.info("%s: %s recovered: ran %g s without failing (after %d failures)", self.name, name, after,
                       failures)

    async def _run(self, ready: asyncio.Event) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            ready.set()
            await self._stop.wait()
            tg.cancel_scope.cancel()

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s: a background task crashed", self.name, exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel the background work and wait for it to end (idempotent)."""
        self._stop.set()
        host, self._host = self._host, None
        if host is not None:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([host])
        self._tg = None
