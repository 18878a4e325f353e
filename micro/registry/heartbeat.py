"""Keeping a record registered: one heartbeat for every node that registers itself.

A :class:`Heartbeat` registers a record (built afresh each time: its node metadata may
change) every ``every`` seconds, at once after :meth:`Heartbeat.beat` (something in the
record changed), and sooner after a failure, with a capped backoff, so that the record
does not expire while the registry (or this process's descriptors) recover. Failures are
logged once per streak (:class:`micro.tasks.Streak`). Its owner runs :meth:`Heartbeat.run`
in a supervised background task and stops it before deregistering.

Services (:class:`micro.Service`) and the ``local://`` broker's delivery node use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from micro.registry._base import Registry, ServiceRecord
from micro.tasks import Streak, backoff

__all__ = ["Heartbeat"]


class Heartbeat:
    """Registers ``record()`` in ``registry`` with ``ttl`` every ``every`` seconds, and on :meth:`beat`."""

    def __init__(self, registry: Registry, record: Callable[[], ServiceRecord], *, ttl: float, every: float,
                 what: str, log: logging.Logger) -> None:
        self.registry = registry
        self.record = record
        self.ttl = ttl
        self.every = every
        self.what = what
        self.log = log
        self._changed = anyio.Event()

    def beat(self) -> None:
        """Register again now (the record changed)."""
        self._changed.set()

    async def run(self) -> None:
        """Beat until cancelled."""
        streak = Streak(f"{self.what}: heartbeat to the registry", self.log)
        while True:
            wait = self.every if not streak.failures else min(self.every, backoff(streak.failures, 0.2, 5.0))
            with anyio.move_on_after(wait):
                await self._changed.wait()
            self._changed = anyio.Event()
            try:
                await self.registry.register(self.record(), ttl=self.ttl)
            except Exception as e:
                streak.failed(e)
            else:
                streak.ok()
