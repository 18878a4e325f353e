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
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

from micro.errors import UsageError

__all__ = ["BackgroundTasks"]


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
