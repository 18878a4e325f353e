"""Agent run records: one per ask, in the store under ``agent/{name}/runs/{run id}``.

A record says what a run was asked, which tools it called with what arguments,
results and timings, what it answered or why it failed, and the tokens it used;
``parent_id`` links a run started by another agent's ``delegate`` tool (or any
caller that passes it) to that caller's run. Run ids start with the time in
hex, so the store's key order is the order runs started and the newest runs are
one reverse prefix read. Records hold what the run saw, never call metadata, so
a caller's bearer token cannot end up in one.

``micro agent runs NAME`` lists them through the agent's ``Agent.Runs`` endpoint.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec

from micro.errors import BadRequest, RecordNotFound
from micro.store import Record, Store

Status = Literal["completed", "failed"]


class RunToolCall(msgspec.Struct):
    """One tool call of a run."""

    id: str
    name: str
    input: dict[str, Any]
    result: str
    is_error: bool = False
    started: float = 0.0
    seconds: float = 0.0


class RunUsage(msgspec.Struct):
    """Tokens the run's model calls used, summed."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class AgentRun(msgspec.Struct):
    """What one ask did: its message, tool calls, reply or error, timings and token usage."""

    id: str
    agent: str
    message: str
    parent_id: str = ""
    session: str = ""
    status: Status = "completed"
    reply: str = ""
    error: str = ""
    error_kind: str = ""
    tool_calls: list[RunToolCall] = []
    usage: RunUsage = msgspec.field(default_factory=RunUsage)
    model: str = ""
    started: float = 0.0
    finished: float = 0.0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AgentRun).decode


def new_run_id() -> str:
    """A run id that sorts by start time: 16 hex digits of nanoseconds, then 16 random ones."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


class AgentRuns:
    """Reads and writes the run records of one agent.

    Example::

        runs = AgentRuns(runtime.store, "task-mgr")
        for run in await runs.list(limit=10):
            print(run.id, run.status, [c.name for c in run.tool_calls])
    """

    def __init__(self, store: Store, agent: str) -> None:
        self.store = store
        self.prefix = f"agent/{agent}/runs/"

    def key(self, run_id: str) -> str:
        if not run_id or "/" in run_id:
            raise BadRequest(f"run id {run_id!r}: expected the id of a run (`micro agent runs NAME` lists them)")
        return self.prefix + run_id

    async def put(self, run: AgentRun) -> None:
        await self.store.write(Record(self.key(run.id), _encode(run), metadata={"status": run.status}))

    async def get(self, run_id: str) -> AgentRun | None:
        try:
            (rec,) = await self.store.read(self.key(run_id))
        except RecordNotFound:
            return None
        return _decode(rec.value)

    async def list(self, limit: int = 20, *, session: str | None = None,
                   parent_id: str | None = None) -> list[AgentRun]:
        """The most recent runs, newest first; optionally only one session's or one parent's."""
        if limit <= 0:
            return []
        if session is None and parent_id is None:
            records = await self.store.read(self.prefix, prefix=True, limit=limit, reverse=True)
            return [_decode(r.value) for r in records]
        out: list[AgentRun] = []
        for rec in await self.store.read(self.prefix, prefix=True, reverse=True):
            run = _decode(rec.value)
            if (session is None or run.session == session) and (parent_id is None or run.parent_id == parent_id):
                out.append(run)
                if len(out) == limit:
                    break
        return out
