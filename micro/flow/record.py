"""Flow run records: one per event, in the store under ``flow/{name}/runs/{event id}``.

The record is the checkpoint too: results of the deterministic steps and of
every tool call are written as they complete, so a redelivered event resumes
without redoing them, and an event whose record says ``completed`` is
acknowledged without running again.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Collection
from typing import Any, Literal

import msgspec

from micro import metrics
from micro.store import Record, Store

Status = Literal["running", "completed", "failed", "retrying", "cancelled", "paused", "input_required", "waiting"]
"""``running`` now (or its process died; a durable broker delivers it again); ``completed``;
``failed`` for good (a deterministic error, the broker's last attempt, or a broker that never
redelivers); ``retrying`` (the broker delivers it again with backoff); ``cancelled`` (stopped
mid-way: the process shut down, a replay's deadline ran out, or a person cancelled it while it
waited); ``paused`` / ``input_required`` (its model step waits for a person: the event is
acknowledged, and ``micro agent approve|answer FLOW RUN_ID`` continues it); ``waiting`` (a stepped
flow's ``Await`` step waits for input: the event is acknowledged, ``micro flow resume RUN_ID`` continues
it)."""
STATUSES: tuple[str, ...] = ("running", "completed", "failed", "retrying", "cancelled", "paused", "input_required",
                             "waiting")
WAITS: tuple[str, ...] = ("waiting", "paused", "input_required")
"""The statuses of a run that waits (for an event, a time, or a person)."""


class StepInfo(msgspec.Struct):
    """How one step of a stepped flow ran: ``running``, ``completed``, ``waiting`` or ``failed``; how many
    attempts it took (deliveries and in-place retries); when it started and how long its last attempt took."""

    kind: str
    status: str = "running"
    attempts: int = 0
    started: float = 0.0
    seconds: float = 0.0
    error: str = ""


class Waiting(msgspec.Struct):
    """What a waiting run waits for: its ``Await`` step (path), a prompt, since and until when (0: no
    timeout), the event that can satisfy it (``topic`` / ``match`` = ``value``), and the JSON Schema of
    the input it takes (``{}`` when the step has no ``schema=``; the dashboard's input form is made from it)."""

    step: str
    name: str
    prompt: str = ""
    since: float = 0.0
    until: float = 0.0
    topic: str = ""
    match: str = ""
    value: str = ""
    timed_out: bool = False
    schema: dict[str, Any] = {}


class ToolCallResult(msgspec.Struct):
    key: str
    name: str
    input: dict[str, Any]
    result: str
    is_error: bool = False
    seconds: float = 0.0


class FlowRun(msgspec.Struct):
    """What one event did: its input, prompt, steps, tool calls, reply and error."""

    id: str
    flow: str
    topic: str
    event: Any = None
    status: Status = "running"
    attempts: int = 0
    prompt: str = ""
    steps: dict[str, Any] = {}
    tool_calls: list[ToolCallResult] = []
    reply: str = ""
    error: str = ""
    error_kind: str = ""
    started: float = 0.0
    finished: float = 0.0
    replay_of: str = ""
    dead_lettered: bool = False
    """Its last delivery failed and the (durable) broker moved the event to its dead-letter topic."""
    trace: dict[str, StepInfo] = {}
    waiting: Waiting | None = None

    def tool_result(self, key: str) -> ToolCallResult | None:
        for call in self.tool_calls:
            if call.key == key and not call.is_error:
                return call
        return None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(FlowRun).decode


class RunStore:
    """Reads and writes the run records of one flow."""

    def __init__(self, store: Store, flow: str) -> None:
        self.store = store
        self.prefix = f"flow/{flow}/runs/"

    def key(self, run_id: str) -> str:
        return self.prefix + run_id

    async def get(self, run_id: str) -> FlowRun | None:
        from micro.errors import RecordNotFound

        try:
            (rec,) = await self.store.read(self.key(run_id))
        except RecordNotFound:
            return None
        return _decode(rec.value)

    async def put(self, run: FlowRun, *, if_version: int | None = None) -> int:
        """Write the record (its metadata says its status and when it was written); ``if_version``: only if
        the stored record is still that version (``VersionConflict`` if not); returns the new version."""
        metrics.flow_run(run.flow, run.status)
        return await self.store.write(Record(self.key(run.id), _encode(run),
                                             metadata={"status": run.status, "updated": f"{now():.6f}"}),
                                      if_version=if_version)

    async def get_versioned(self, run_id: str) -> tuple[FlowRun, int, float] | None:
        """The record, its store version (for ``put(if_version=)``) and when it was last written (0 if unknown)."""
        from micro.errors import RecordNotFound

        try:
            (rec,) = await self.store.read(self.key(run_id))
        except RecordNotFound:
            return None
        try:
            updated = float(rec.metadata.get("updated", "0"))
        except ValueError:
            updated = 0.0
        return _decode(rec.value), rec.version, updated

    async def list(self, limit: int = 50, status: Collection[str] | None = None, *,
                   dead_lettered: bool = False) -> list[FlowRun]:
        """The most recent runs (by start time), newest first; optionally only those with some statuses, or
        only those whose event was dead-lettered."""
        records = await self.store.read(self.prefix, prefix=True)
        runs = [_decode(r.value) for r in records]
        if status is not None:
            runs = [r for r in runs if r.status in status]
        if dead_lettered:
            runs = [r for r in runs if r.dead_lettered]
        runs.sort(key=lambda r: r.started, reverse=True)
        return runs[:limit]

    async def overview(self, limit: int = 50, status: Collection[str] | None = None,
                       waits: Collection[str] = ()) -> Overview:
        """What a flow's page shows, from one read of the runs: the newest ``limit`` runs (of ``status``), those
        that wait (``waits``: their statuses), those whose event was dead-lettered, and the replays of each
        run shown (by ``replay_of``, however old)."""
        records = await self.store.read(self.prefix, prefix=True)
        runs = sorted((_decode(r.value) for r in records), key=lambda r: r.started, reverse=True)
        shown = [r for r in runs if status is None or r.status in status][:limit]
        waiting = [r for r in runs if r.status in waits][:limit]
        dead = [r for r in runs if r.dead_lettered][:limit]
        ids = {r.id for r in (*shown, *waiting, *dead)}
        replays: dict[str, builtins.list[FlowRun]] = {}
        for r in reversed(runs):  # oldest first: replay 1, 2, …
            if r.replay_of in ids:
                replays.setdefault(r.replay_of, []).append(r)
        return Overview(shown, waiting, dead, replays)

    async def replays_of(self, run_id: str) -> builtins.list[FlowRun]:
        """The replays of run ``run_id`` (``{id}-replay-1``, ``-2``, … as ``Flow.Replay`` numbers them), in order."""
        found: builtins.list[FlowRun] = []
        while (run := await self.get(f"{run_id}-replay-{len(found) + 1}")) is not None:
            found.append(run)
        return found


class Overview(msgspec.Struct):
    """A flow's runs as its page shows them (:meth:`RunStore.overview`)."""

    runs: list[FlowRun]
    waiting: list[FlowRun]
    dead_lettered: list[FlowRun]
    replays: dict[str, list[FlowRun]]


def now() -> float:
    return time.time()
