"""Flow schedules: ``schedule="0 2 * * *"`` (cron, UTC, parsed by cronsim) or ``every="15m"``.

Every replica of a flow computes the same ticks (cron times; or multiples of ``every``
since the Unix epoch), and fires a tick only if it is the first to create the tick's
key in the shared store (``flow/{name}/ticks/{tick}``, a create-if-absent write,
``if_version=0``): exactly one firing per tick across replicas. A firing is a run
with id ``tick-{unix ms}`` and event ``{"tick": ISO time, "scheduled": unix time}``.

After downtime, ``catch_up="one"`` (the default) fires the most recent missed tick once
at start (when the flow had fired before); ``"none"`` waits for the next tick.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from micro.errors import UsageError

from .steps import parse_duration

CatchUp = Literal["one", "none"]

__all__ = ["CatchUp", "Schedule"]


class Schedule:
    """The ticks of a cron expression or a fixed period (seconds). ``UsageError`` for one that does not parse."""

    def __init__(self, flow: str, *, cron: str | None = None, every: str | float | None = None,
                 catch_up: str = "one") -> None:
        if (cron is None) == (every is None):
            raise UsageError(f"flow {flow}: give schedule= (cron) or every=, not both")
        if catch_up not in ("one", "none"):
            raise UsageError(f"flow {flow}: catch_up must be 'one' or 'none', not {catch_up!r}")
        self.catch_up: CatchUp = "one" if catch_up == "one" else "none"
        self.cron = cron
        self.every = None if every is None else parse_duration(every, f"flow {flow}: every")
        if cron is not None:
            try:
                from cronsim import CronSim, CronSimError
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise UsageError(f"flow {flow}: schedule= needs cronsim: pip install 'micro[schedule]'") from exc
            try:
                CronSim(cron, dt.datetime.now(dt.UTC))
            except CronSimError as exc:
                raise UsageError(f"flow {flow}: schedule {cron!r} is not a cron expression ({exc}); write five "
                                 "fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'") from None

    def describe(self) -> str:
        return f"cron {self.cron} (UTC)" if self.cron is not None else f"every {self.every:g}s"

    def next_after(self, ts: float) -> float:
        """The first tick strictly after ``ts`` (unix seconds)."""
        if self.every is not None:
            n = int(ts // self.every) + 1
            at = n * self.every
            return at if at > ts else (n + 1) * self.every
        from cronsim import CronSim

        start = dt.datetime.fromtimestamp(ts, dt.UTC).replace(microsecond=0)
        tick: float = next(CronSim(self.cron or "", start)).timestamp()
        return tick

    def latest(self, ts: float) -> float:
        """The last tick at or before ``ts``."""
        if self.every is not None:
            return int(ts // self.every) * self.every
        from cronsim import CronSim

        start = dt.datetime.fromtimestamp(ts + 1, dt.UTC).replace(microsecond=0)  # a tick at ts counts
        tick: float = next(CronSim(self.cron or "", start, reverse=True)).timestamp()
        return tick


def tick_id(tick: float) -> str:
    """The run id (and key part) of a tick: whole milliseconds, zero-padded so keys sort by time."""
    return f"tick-{round(tick * 1000):015d}"
