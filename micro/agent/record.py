"""Agent run records: one per run, in the store under ``agent/{name}/runs/{run id}``; the run's checkpoint.

A record says what a run was asked, which tools it called with what arguments,
results and timings, each model turn's start, duration and tokens (or error), what it
answered or why it failed, and the tokens it used;
``parent_id`` links a run started by another agent's ``delegate`` tool (or any
caller that passes it) to that caller's run. Run ids start with the time in
hex, so the store's key order is the order runs started and the newest runs are
one reverse prefix read. Records hold what the run saw, never call metadata, so
a caller's bearer token cannot end up in one.

The record is also the run's **checkpoint** (see :mod:`micro.agent.engine`): the
engine rewrites it at every step boundary (after each model turn, and as each
tool call's result comes in), with the run's own messages so far, every tool
call's state (``running`` while in flight, ``done`` with its result, ``pending``
while it waits for a person), and its status:

=================  ==========================================================
``running``        a process is working on it (``owner`` names the node)
``paused``         a tool call waits for a person's approval (``pending``)
``input_required`` the model asked the person a question (``pending``)
``waiting``        waits for an event or a clock (flows; not used by agents yet)
``completed``      answered (``reply``)
``failed``         ended with an error (``error``, ``error_kind``)
``cancelled``      cancelled by its caller or ``micro agent cancel``
``expired``        waited longer than ``pause_ttl``; its pending calls were refused
``interrupted``    its process died mid-run; ``resume_interrupted`` continues it
=================  ==========================================================

Writes are conditional on the version read (the store's compare-and-set), so of
two processes resuming one run exactly one wins. A run that waits is also
indexed under ``agent/{name}/waiting/{session}#{run id}``: a new message to a
session with a waiting run is refused, and ``micro agent pending`` is one prefix
read.

``micro agent runs NAME`` lists them through the agent's ``AgentInfo.Runs`` endpoint.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any, Literal

import anyio
import msgspec

from micro.ai import Message
from micro.errors import BadRequest, RecordNotFound
from micro.store import Record, Store

Status = Literal["running", "paused", "input_required", "waiting", "completed", "failed", "cancelled",
                 "expired", "interrupted"]
STATUSES: tuple[str, ...] = ("running", "paused", "input_required", "waiting", "completed", "failed",
                             "cancelled", "expired", "interrupted")
WAITING: frozenset[str] = frozenset({"paused", "input_required", "waiting"})
"""Statuses of a run that waits for a person (or an event): a session with one refuses new messages."""
FINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})

CallState = Literal["running", "done", "pending"]


class RunToolCall(msgspec.Struct):
    """One tool call of a run: ``running`` (in flight), ``done`` (with its result) or ``pending``."""

    id: str
    name: str
    input: dict[str, Any]
    result: str = ""
    is_error: bool = False
    started: float = 0.0
    seconds: float = 0.0
    state: CallState = "done"
    paused: float = 0.0  # when it began waiting for a person (0: never); ``started`` is when it last began running


class PendingCall(msgspec.Struct):
    """A tool call that waits for a person: an approval (``kind="approval"``) or an answer (``"question"``).

    ``decided`` is set by a partial decision (``resume(..., partial=True)``); the run resumes once
    every pending call of it is decided. ``state`` is what the tool asked with
    (:attr:`micro.agent.tools.AskPerson.state`), handed back to it with the answer.
    """

    call_id: str
    tool: str
    input: dict[str, Any]
    reason: str = ""
    kind: Literal["approval", "question"] = "approval"
    question: str = ""
    decided: bool = False
    approved: bool = False
    answer: str = ""
    state: dict[str, Any] = msgspec.field(default_factory=dict)


class RunUsage(msgspec.Struct):
    """Tokens the run's model calls used, summed."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class RunTurn(msgspec.Struct, frozen=True):
    """One model turn of a run: when the model was called, how long it took, the tokens it used, or its error.

    Records written before turns were recorded have none (``AgentRun.turns`` empty); the dashboard then
    draws the stretches between tool calls as the model's turns.
    """

    started: float
    seconds: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


class AgentRun(msgspec.Struct):
    """What one run did and where it is: its message, messages so far, tool calls, status, reply or error."""

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
    turns: list[RunTurn] = []
    usage: RunUsage = msgspec.field(default_factory=RunUsage)
    model: str = ""
    started: float = 0.0
    finished: float = 0.0
    messages: list[Message] = []
    pending: list[PendingCall] = []
    key: str = ""
    owner: str = ""
    updated: float = 0.0
    expires: float = 0.0
    resumes: int = 0
    pause: str = ""  # the fingerprint of the pause it waits in (:func:`pause_token`), for decisions to name

    def waits_for(self) -> str:
        """What the run waits for, in words (for errors and listings)."""
        if not self.pending:
            return "nothing"
        parts = []
        for p in self.pending:
            if p.kind == "question":
                parts.append(f"an answer to {p.question!r} (call {p.call_id})")
            else:
                state = " (decided)" if p.decided else ""
                parts.append(f"approval of {p.tool} (call {p.call_id}){state}")
        return "; ".join(parts)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AgentRun).decode


def new_run_id() -> str:
    """A run id that sorts by start time: 16 hex digits of nanoseconds, then 16 random ones."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def check_run_id(agent: str, run_id: str) -> None:
    """Refuse (``BadRequest``) a caller's run id that is not of :func:`new_run_id`'s form."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise BadRequest(f"agent {agent}: run_id {run_id!r} is not a run id (32 lowercase hex digits, the time "
                         "first: micro.agent.record.new_run_id()); leave it empty and the agent picks one")


class AgentRuns:
    """Reads and writes the run records of one agent (conditionally: see :meth:`save`).

    Example::

        runs = AgentRuns(runtime.store, "task-mgr")
        for run in await runs.list(limit=10):
            print(run.id, run.status, [c.name for c in run.tool_calls])
    """

    def __init__(self, store: Store, agent: str, *, retention: float | None = None) -> None:
        self.store = store
        self.agent = agent
        self.retention = retention  # seconds a finished run's record is kept (None: for ever)
        self.prefix = f"agent/{agent}/runs/"
        self.waiting_prefix = f"agent/{agent}/waiting/"
        self._changed: anyio.Event | None = None

    @property
    def changed(self) -> anyio.Event:
        """Set when this process next marks or unmarks a waiting run (a fresh event after each)."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _touch(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def key(self, run_id: str) -> str:
        if not isinstance(run_id, str) or not run_id or "/" in run_id or "#" in run_id:
            raise BadRequest(f"run id {run_id!r}: expected the id of a run (`micro agent runs {self.agent}` "
                             "lists them)")
        return self.prefix + run_id

    async def save(self, run: AgentRun, version: int) -> int:
        """Write ``run`` if its record is still at ``version`` (0: only if there is none); the new version.

        Raises :class:`micro.errors.VersionConflict` when another writer got there first.
        """
        run.updated = time.time()
        return await self.store.write(Record(self.key(run.id), _encode(run), metadata={"status": run.status}),
                                      ttl=self._ttl(run), if_version=version)

    def _ttl(self, run: AgentRun) -> float | None:
        """A finished run (it holds the conversation's messages) is kept ``retention``; a live one for ever."""
        return self.retention if run.status in FINAL else None

    async def put(self, run: AgentRun) -> None:
        """Write ``run`` whatever is stored (for records no one else writes)."""
        await self.store.write(Record(self.key(run.id), _encode(run), metadata={"status": run.status}),
                               ttl=self._ttl(run))

    async def load(self, run_id: str) -> tuple[AgentRun, int] | None:
        """The run and the version of its record, or None."""
        try:
            (rec,) = await self.store.read(self.key(run_id))
        except RecordNotFound:
            return None
        return _decode(rec.value), rec.version

    async def get(self, run_id: str) -> AgentRun | None:
        found = await self.load(run_id)
        return None if found is None else found[0]

    async def list(self, limit: int = 20, *, session: str | None = None, parent_id: str | None = None,
                   status: Collection[str] | None = None,
                   effective: Callable[[AgentRun], AgentRun] | None = None) -> list[AgentRun]:
        """The most recent runs, newest first; optionally only one session's, one parent's, or some statuses'.

        ``effective`` maps a stored run to what it is now (a ``running`` run whose process is gone
        is ``interrupted``; a paused one past its expiry ``expired``) before the status filter.
        """
        if limit <= 0:
            return []
        if session is None and parent_id is None and status is None:
            records = await self.store.read(self.prefix, prefix=True, limit=limit, reverse=True)
            runs = [_decode(r.value) for r in records]
            return [effective(r) for r in runs] if effective is not None else runs
        out: list[AgentRun] = []
        for rec in await self.store.read(self.prefix, prefix=True, reverse=True):
            run = _decode(rec.value)
            if effective is not None:
                run = effective(run)
            if ((session is None or run.session == session) and (parent_id is None or run.parent_id == parent_id)
                    and (status is None or run.status in status)):
                out.append(run)
                if len(out) == limit:
                    break
        return out

    # -- the index of waiting runs ----------------------------------------------------------------

    def _waiting_key(self, session: str, run_id: str = "") -> str:
        return f"{self.waiting_prefix}{session}#{run_id}"

    async def mark_waiting(self, run: AgentRun) -> None:
        await self.store.write(Record(self._waiting_key(run.session, run.id), run.id.encode(),
                                      metadata={"status": run.status, "expires": repr(run.expires)}))
        self._touch()

    async def unmark_waiting(self, run: AgentRun) -> None:
        await self.store.delete(self._waiting_key(run.session, run.id))
        self._touch()

    async def waiting_in(self, session: str) -> builtins.list[str]:
        """Ids of the runs of ``session`` that wait (for a decision, an answer or an event)."""
        keys = await self.store.list(self._waiting_key(session))
        return [k.rsplit("#", 1)[1] for k in keys]

    async def waiting_counts(self, now: float | None = None) -> dict[str, int]:
        """How many runs wait now, by status (``paused``, ``input_required``, ``waiting``): one read of the
        index; a run past its ``expires`` (``pause_ttl``) is counted as ``expired``."""
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        for rec in await self.store.read(self.waiting_prefix, prefix=True):
            status = rec.metadata.get("status", "")
            try:
                expires = float(rec.metadata.get("expires", "0"))
            except ValueError:
                expires = 0.0
            if expires and now >= expires:
                status = "expired"
            counts[status] = counts.get(status, 0) + 1
        return counts

    async def waiting(self) -> builtins.list[str]:
        """Ids of every waiting run of the agent, oldest first."""
        keys = await self.store.list(self.waiting_prefix)
        return sorted(k.rsplit("#", 1)[1] for k in keys)


def pause_token(run: AgentRun) -> str:
    """The fingerprint of the pause ``run`` waits in: its resume count and each pending call's id, tool and input.

    A decision that names it (``ResumeRequest.pause``, a dashboard form) is refused once the run has
    paused again: call ids alone may repeat across pauses (a provider without tool-call ids numbers
    them from ``call_0`` in every response).
    """
    calls = [[p.call_id, p.tool, p.input] for p in run.pending]
    raw = msgspec.json.encode([run.resumes, calls], order="deterministic")
    return hashlib.sha256(raw).hexdigest()[:16]
