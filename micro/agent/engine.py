"""The run engine: runs that wait for a person, resume in any process, and never repeat a finished call.

One engine for every run micro keeps (an agent's ask, a flow's model step): the run
record (:mod:`micro.agent.record`) is its checkpoint, rewritten at each step boundary
by a :class:`Checkpoint`; the loop (:class:`micro.agent.loop.Run`) is rebuilt from it
to continue. What the engine adds to the loop:

- **Writes that cannot lose a race.** Every write names the version it read (the
  store's compare-and-set). A resumer *claims* a waiting run by writing it back as
  ``running`` with itself as ``owner``; of two resumers exactly one write succeeds,
  the other gets :class:`micro.errors.Conflict` naming the run and what it is now.
- **Decisions checked before anything changes.** :meth:`RunEngine.decide` turns an
  ``approve=`` / ``answer=`` into per-call decisions or a ``BadRequest`` that names the
  run and what it waits for; nothing is written until they are complete.
- **What a run is now.** A ``running`` run whose owner (a service node) is gone from
  the registry is ``interrupted``; a waiting run past ``expires`` is ``expired``
  (:meth:`RunEngine.effective`), and is written so when next met.

Agents use it in :mod:`micro.agent.agent`; flows in :mod:`micro.flow.flow`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import msgspec

from micro import metrics
from micro._proto.micro.agent import ChatResponse, ResumeRequest, ToolCall
from micro._proto.micro.agent import PendingCall as PendingMessage
from micro.ai import Usage
from micro.errors import BadRequest, Conflict, NotFound, VersionConflict

from .loop import Decision, Run, ToolCallRecord
from .record import WAITING, AgentRun, AgentRuns, PendingCall, RunToolCall, RunUsage, pause_token

log = logging.getLogger("micro.agent")

DEFAULT_PAUSE_TTL = 7 * 24 * 3600.0
"""Seconds a run may wait for a person before it expires (7 days)."""

Approval = bool | Mapping[str, bool | str] | None
"""``approve=`` of a resume: True / False for every pending call, or ``{call_id: True | False | "reason"}``
(a string denies with that reason)."""

Answer = str | Mapping[str, str] | None
"""``answer=`` of a resume: the text for the run's one question, or ``{call_id: text}``."""


class Checkpoint:
    """Writes one run's record at its step boundaries, conditionally on the version it last wrote.

    Concurrent tool calls of a turn save as they finish; saves that arrive while one is being
    written are folded into the next write (one store write in flight per run, never a lock
    across a tool call). While other calls of the run are still in flight, a save lets the
    loop run once before it takes its snapshot: results that came in together (one read of
    the wire answers many calls) are written together, and each saver returns once the write
    that carries its result has ended. A write that finds another version means another process
    claimed the run (it took this one's process for dead): the run stops with :class:`Conflict`,
    and this checkpoint writes nothing more. Other store failures are logged once per write and
    the run goes on: every saver that write carried returns as if it had succeeded (its
    ``tool_end`` goes out without its result written) and the record lags until the next write
    succeeds (the next step's, or the run's end); a ``strict`` save raises the failure instead
    (one that a failed write carried writes again itself). A write cancelled before it ended
    leaves its savers to write themselves.
    """

    def __init__(self, runs: AgentRuns, record: AgentRun, version: int) -> None:
        self.runs = runs
        self.record = record
        self.version = version
        self.run: Run | None = None
        self.lost = False
        self._lock = asyncio.Lock()
        self._asked = 0
        self._written = 0  # the last save a successful write carried
        self._ended = 0  # the last save a write carried that ended (succeeded, or failed and was logged)
        self._gathering: asyncio.Event | None = None  # set once the write still taking saves is done

    def snapshot(self) -> None:
        """Copy the loop's state (messages, calls, turns, usage) into the record."""
        run = self.run
        if run is None:
            return
        rec = self.record
        rec.messages = list(run.new_messages)
        rec.tool_calls = [RunToolCall(c.id, c.name, c.input, c.result, c.is_error, c.started, c.seconds, _state(c),
                                      paused=c.paused)
                          for c in run.calls]
        rec.turns = list(run.turns)
        u = run.usage
        rec.usage = RunUsage(u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens)

    async def save(self, *, strict: bool = False) -> None:
        """Write the record as it is now (or let a write already queued carry it).

        ``strict``: raise a store failure instead of logging it (a pause must be written to count).
        """
        if self.lost:
            raise self._conflict()
        self._asked += 1
        mine = self._asked
        gathering = self._gathering
        if gathering is not None:  # a write has yet to take its snapshot: it carries this save
            await gathering.wait()
            if self.lost:
                raise self._conflict()
            if self._written >= mine or (self._ended >= mine and not strict):
                return
            # that write was cancelled (or failed, and this save must be written to count): write it here
        async with self._lock:
            if self._written >= mine or (self._ended >= mine and not strict):
                return
            done: asyncio.Event | None = None
            run = self.run
            # (the calls in flight are the latest turn's, at the end: found at once while there are any)
            if run is not None and any(c.state == "running" for c in reversed(run.calls)):
                done = self._gathering = asyncio.Event()
            try:
                if done is not None:
                    await asyncio.sleep(0)  # the calls answered by the same read record their results first
                    self._gathering = None
                upto = self._asked
                self.snapshot()
                try:
                    self.version = await self.runs.save(self.record, self.version)
                except VersionConflict:
                    self.lost = True
                    raise self._conflict() from None
                except Exception:
                    if strict:
                        raise
                    self._ended = max(self._ended, upto)
                    log.exception("agent %s: could not write the checkpoint of run %s", self.record.agent,
                                  self.record.id,
                                  extra={"micro_run_id": self.record.id, "micro_agent": self.record.agent})
                    return
                self._written = self._ended = upto
            finally:
                if done is not None:
                    if self._gathering is done:
                        self._gathering = None
                    done.set()

    def _conflict(self) -> Conflict:
        return Conflict(f"agent {self.record.agent}: run {self.record.id} was taken over by another process "
                        "(resumed as interrupted); this process stopped working on it")


def _keep(run: AgentRun, decisions: Mapping[str, Decision]) -> None:
    for p in run.pending:
        d = decisions.get(p.call_id)
        if d is not None:
            p.decided, p.approved, p.answer = True, d.approved, d.answer or ""
            if not d.approved and d.answer is None:
                p.reason = d.reason


def decisions_of(run: AgentRun) -> dict[str, Decision]:
    """The decisions a record keeps (partial ones, or those of a claim a crash interrupted)."""
    return {p.call_id: (Decision(answer=p.answer) if p.kind == "question" else Decision(p.approved, p.reason))
            for p in run.pending if p.decided}


def response_of(record: AgentRun) -> ChatResponse:
    """The ``ChatResponse`` that says where a run is: its reply, or what it waits for."""
    waiting = record.status in ("paused", "input_required")
    return ChatResponse(
        reply=record.reply, agent=record.agent, run_id=record.id, parent_id=record.parent_id,
        tool_calls=[ToolCall(id=c.id, name=c.name, input=msgspec.json.encode(c.input).decode(), result=c.result,
                             is_error=c.is_error) for c in record.tool_calls if c.state == "done"],
        status=record.status,
        pending=[PendingMessage(call_id=p.call_id, tool=p.tool, input=msgspec.json.encode(p.input).decode(),
                                reason=p.reason, kind=p.kind, question=p.question)
                 for p in record.pending] if waiting else [],
    )


def request_decisions(name: str, req: ResumeRequest) -> tuple[Approval, Answer]:
    """``approve=`` / ``answer=`` of a resume from an ``Agent.Resume`` request (``BadRequest`` if contradictory)."""
    if req.approve_all and req.deny_all:
        raise BadRequest(f"agent {name}: run {req.run_id}: approve_all and deny_all contradict each other")
    approvals: dict[str, bool | str] = {}
    answers: dict[str, str] = {}
    for d in req.decisions:
        if not d.call_id:
            raise BadRequest(f"agent {name}: run {req.run_id}: a decision without a call_id")
        if d.answer:
            answers[d.call_id] = d.answer
        else:
            approvals[d.call_id] = True if d.approve else (d.reason or req.reason or False)
    if (req.approve_all or req.deny_all) and approvals:
        raise BadRequest(f"agent {name}: run {req.run_id}: give decisions per call or approve_all/deny_all, not both")
    if req.answer and answers:
        raise BadRequest(f"agent {name}: run {req.run_id}: give `answer` or answers per call, not both")
    approve: Approval = True if req.approve_all else False if req.deny_all else (approvals or None)
    answer: Answer = req.answer or (answers or None)
    return approve, answer


def _state(c: ToolCallRecord) -> Any:
    return c.state


def restore(record: AgentRun, run: Run) -> None:
    """Load a record's messages, calls, turns and usage into a fresh loop ``run``."""
    run.new_messages = list(record.messages)
    run.calls = [ToolCallRecord(c.id, c.name, c.input, c.result, c.is_error, c.started, c.seconds, c.state,
                                paused=c.paused)
                 for c in record.tool_calls]
    run.turns = list(record.turns)
    for p in record.pending:
        for c in reversed(run.calls):
            if c.id == p.call_id and c.state == "pending":
                c.kind, c.reason = p.kind, (p.question if p.kind == "question" else p.reason)
                c.ask_state = dict(p.state)
                break
    u = record.usage
    run.usage = Usage(u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens)


def pending_of(run: Run) -> list[PendingCall]:
    """The pending calls of a loop that stopped to wait, as the record keeps them."""
    out = []
    for c in run.pending:
        # the question a tool asked (AskPerson), or request_input's argument
        question = (c.reason or str(c.input.get("question", ""))) if c.kind == "question" else ""
        out.append(PendingCall(c.id, c.name, dict(c.input), c.reason if c.kind != "question" else "",
                               "question" if c.kind == "question" else "approval", question,
                               state=dict(c.ask_state)))
    return out


class RunEngine:
    """The run lifecycle for one agent (or flow) named ``name``: claims, decisions, expiry, liveness.

    Args:
        name: the service whose runs these are (its registry nodes own running runs).
        runs: the run records.
        owner: this process's node id (the service's ``id``).
        nodes: returns the node ids the registry has for ``name`` now.
        pause_ttl: seconds a run may wait for a person.
    """

    def __init__(self, name: str, runs: AgentRuns, *, owner: Callable[[], str],
                 nodes: Callable[[], Awaitable[set[str]]], pause_ttl: float = DEFAULT_PAUSE_TTL) -> None:
        self.name = name
        self.runs = runs
        self.owner = owner
        self.nodes = nodes
        self.pause_ttl = pause_ttl

    def clock(self) -> float:
        """Now, by the store's clock (tests move it to expire a run)."""
        return self.runs.store.clock()

    # -- what a run is now ----------------------------------------------------------------------

    async def owners(self) -> set[str]:
        """The nodes alive now (this process's included)."""
        return {*await self.nodes(), self.owner()}

    def effective(self, run: AgentRun, owners: set[str] | None, now: float | None = None) -> AgentRun:
        """``run`` as it is now: ``interrupted`` if its owner is gone, ``expired`` if it waited too long."""
        if run.status == "running" and owners is not None and run.owner not in owners:
            return msgspec.structs.replace(run, status="interrupted")
        if run.status in WAITING and run.expires and (now if now is not None else self.clock()) >= run.expires:
            return msgspec.structs.replace(run, status="expired")
        return run

    async def load(self, run_id: str) -> tuple[AgentRun, int]:
        found = await self.runs.load(run_id)
        if found is None:
            raise NotFound(f"agent {self.name} has no run {run_id!r} (`micro agent runs {self.name}` lists them)")
        return found

    async def expire(self, run: AgentRun, version: int) -> None:
        """Write a waiting run that outlived ``pause_ttl`` as ``expired``: its pending calls are refused."""
        waited = [p.call_id for p in run.pending]
        for c in run.tool_calls:
            if c.id in waited and c.state == "pending":
                c.state, c.is_error = "done", True
                c.result = "the call was refused: nobody decided before the run expired"
        run.status, run.error_kind = "expired", "expired"
        run.error = (f"the run waited for {run.waits_for()} longer than pause_ttl={self.pause_ttl:g}s and "
                     "expired; its pending calls were refused")
        run.pending, run.finished = [], time.time()
        try:
            await self.runs.save(run, version)
        except VersionConflict:
            return  # someone else changed it meanwhile; they wrote what it is
        await self.runs.unmark_waiting(run)

    async def check_session(self, session: str) -> None:
        """Refuse a new message to a session with a run that waits (``BadRequest`` naming it)."""
        for run_id in await self.runs.waiting_in(session):
            found = await self.runs.load(run_id)
            if found is None:
                continue
            run, version = found
            now = self.effective(run, None)
            if now.status == "expired":
                await self.expire(run, version)
                continue
            if run.status not in WAITING:
                await self.runs.unmark_waiting(run)  # an index entry a crash left behind
                continue
            where = f"session {session!r}" if session else "the default session"
            verb = ("answer it: micro agent answer {a} {r} \"…\"" if run.status == "input_required"
                    else "approve or deny it: micro agent approve {a} {r} [--deny --reason …]")
            raise BadRequest(
                f"agent {self.name}: {where} has run {run.id} waiting for {run.waits_for()}; a new message "
                f"would interleave with it. First {verb.format(a=self.name, r=run.id)}, or cancel it: "
                f"micro agent cancel {self.name} {run.id}")

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, run: AgentRun, approve: Approval, answer: Answer, reason: str,
               partial: bool, pause: str = "") -> dict[str, Decision]:
        """The decisions ``approve`` / ``answer`` make on ``run``'s pending calls (and any it recorded before).

        Raises ``BadRequest`` naming the run and what it waits for when they name calls it does not
        wait for, answer a run that asked nothing, approve a question, or (unless ``partial``) leave
        a pending call undecided. Raises ``Conflict`` when ``pause`` (:func:`~micro.agent.record.pause_token`
        of the pause the decisions were made against, e.g. by a page) is not the pause the run waits in
        now, or when a decision differs from one already recorded on that call (a stale page, a second
        tab, another person): a recorded decision is never reversed. The same decision again (a retry,
        a double click) is accepted. ``approve=True``/``False`` (approve or deny all) decides the calls still
        undecided and leaves the recorded ones as they are. Nothing is written here.
        """
        where = f"agent {self.name}: run {run.id} waits for {run.waits_for()}"
        if pause and pause != pause_token(run):
            raise Conflict(f"agent {self.name}: run {run.id} no longer waits in the pause these decisions were "
                           f"made against (it has resumed and paused again since); it now waits for "
                           f"{run.waits_for()}: look again and decide on what it waits for now")
        pending = {p.call_id: p for p in run.pending}
        approvals = [p for p in run.pending if p.kind == "approval"]
        questions = [p for p in run.pending if p.kind == "question"]
        recorded = decisions_of(run)
        out = dict(recorded)
        if approve is not None:
            if not approvals:
                raise BadRequest(f"{where}; it asked a question and needs an answer, not an approval "
                                 f"(micro agent answer {self.name} {run.id} \"…\")")
            if isinstance(approve, bool):  # all of them: the ones still undecided (a recorded one stands)
                for p in approvals:
                    if p.call_id not in recorded:
                        out[p.call_id] = Decision(approve, "" if approve else reason)
            else:
                for call_id, verdict in approve.items():
                    found = pending.get(call_id)
                    if found is None or found.kind != "approval":
                        raise BadRequest(f"{where}; it has no pending approval {call_id!r}")
                    if isinstance(verdict, str):
                        out[call_id] = Decision(False, verdict or reason)
                    elif isinstance(verdict, bool):
                        out[call_id] = Decision(verdict, "" if verdict else reason)
                    else:
                        raise BadRequest(f"{where}; the decision on {call_id!r} must be true, false or a reason "
                                         f"(text), not {verdict!r}")
        if answer is not None:
            if not questions:
                raise BadRequest(f"{where}; it asked no question, so there is nothing to answer "
                                 f"(micro agent approve {self.name} {run.id}, or --deny)")
            if isinstance(answer, str):
                if len(questions) > 1:
                    raise BadRequest(f"{where}; it asked {len(questions)} questions: answer each by call id")
                answers: Mapping[str, str] = {questions[0].call_id: answer}
            else:
                answers = answer
            for call_id, text in answers.items():
                asked = pending.get(call_id)
                if asked is None or asked.kind != "question":
                    raise BadRequest(f"{where}; it asked no question as call {call_id!r}")
                if not isinstance(text, str) or not text.strip():
                    raise BadRequest(f"{where}; the answer to {asked.question!r} is empty")
                out[call_id] = Decision(answer=text)
        if approve is None and answer is None:
            raise BadRequest(f"{where}; say what to do: approve (or deny) its pending calls, or answer its question")
        for call_id, was in recorded.items():
            p = pending[call_id]
            same = out[call_id].answer == was.answer if p.kind == "question" else out[call_id].approved == was.approved
            if same:  # the decision already recorded, again (a retry, a double click): keep the first
                out[call_id] = was
            else:
                how = (f"answered {was.answer!r}" if p.kind == "question" else "approved" if was.approved
                       else f"denied ({was.reason})" if was.reason else "denied")
                raise Conflict(f"agent {self.name}: run {run.id}: call {call_id} ({p.tool}) was already {how}; "
                               "a recorded decision is not changed (another person or page decided it): "
                               "look again and decide the calls still undecided")
        missing = [p for p in run.pending if p.call_id not in out]
        if missing and not partial:
            names = ", ".join(f"{p.call_id} ({p.tool})" for p in missing)
            raise BadRequest(f"{where}; no decision on {names}: decide every pending call, or record these "
                             "decisions and resume later with partial=True (--call on the command line)")
        return out

    # -- claims ---------------------------------------------------------------------------------

    async def claim(self, run: AgentRun, version: int, was: str,
                    decisions: Mapping[str, Decision] | None = None) -> int:
        """Take ``run`` (read at ``version``, status ``was``) as ``running`` here; exactly one claimer wins.

        ``decisions`` are kept in the record's pending calls, so a crash before they are carried out
        loses none of them.
        """
        if decisions:
            _keep(run, decisions)
        run.status, run.owner = "running", self.owner()
        run.error = run.error_kind = ""
        run.expires = 0.0
        run.resumes += 1
        try:
            return await self.runs.save(run, version)
        except VersionConflict:
            now = await self.runs.get(run.id)
            status = now.status if now is not None else "gone"
            raise Conflict(f"agent {self.name}: run {run.id} was {was} but another resumer took it first; "
                           f"it is now {status}") from None

    async def claimable(self, run_id: str) -> tuple[AgentRun, int]:
        """Load a run that waits for a person (``NotFound``, or ``Conflict`` naming what it is instead)."""
        run, version = await self.load(run_id)
        now = self.effective(run, None)
        if now.status == "expired" and run.status != "expired":
            await self.expire(run, version)
            raise Conflict(f"agent {self.name}: run {run.id} expired: {run.error} Start a new run instead")
        if run.status not in ("paused", "input_required"):
            hint = {"running": "it is running (another resumer may have taken it)",
                    "completed": "it has completed", "interrupted": "its process died: resume it with "
                    f"micro agent resume {self.name} --interrupted"}.get(run.status, f"it is {run.status}")
            raise Conflict(f"agent {self.name}: run {run.id} is {run.status}, not waiting for a decision or an "
                           f"answer ({hint}); nothing was changed")
        return run, version

    async def record_decisions(self, run: AgentRun, version: int, decisions: dict[str, Decision]) -> AgentRun:
        """Keep partial decisions in the waiting run (conditionally); it stays waiting for the rest."""
        _keep(run, decisions)
        try:
            await self.runs.save(run, version)
        except VersionConflict:
            now = await self.runs.get(run.id)
            status = now.status if now else "gone"
            raise Conflict(f"agent {self.name}: run {run.id} changed while the decisions were recorded; it is "
                           f"now {status}: look again (micro agent pending {self.name})") from None
        return run

    async def cancel(self, run_id: str, reason: str = "") -> AgentRun:
        """End a waiting or interrupted run as ``cancelled`` (its pending calls refused)."""
        run, version = await self.load(run_id)
        now = self.effective(run, await self.owners())
        if now.status not in (*WAITING, "interrupted"):
            raise Conflict(f"agent {self.name}: run {run.id} is {now.status}; only a run that waits or was "
                           "interrupted can be cancelled")
        for c in run.tool_calls:
            if c.state != "done":
                c.state, c.is_error = "done", True
                c.result = f"the call was refused: the run was cancelled{f' ({reason})' if reason else ''}"
        run.status, run.error_kind = "cancelled", "cancelled"
        run.error = f"cancelled by a person{f': {reason}' if reason else ''}"
        run.pending, run.finished = [], time.time()
        try:
            await self.runs.save(run, version)
        except VersionConflict:
            latest = await self.runs.get(run.id)
            raise Conflict(f"agent {self.name}: run {run.id} changed while it was being cancelled; it is now "
                           f"{latest.status if latest else 'gone'}") from None
        await self.runs.unmark_waiting(run)
        return run

    # -- how a drive ends -------------------------------------------------------------------------

    async def park(self, checkpoint: Checkpoint) -> None:
        """The loop stopped with pending calls: write the run as ``paused`` / ``input_required``."""
        run, record = checkpoint.run, checkpoint.record
        assert run is not None
        record.status = "input_required" if all(c.kind == "question" for c in run.pending) else "paused"
        record.pending = pending_of(run)
        record.pause = pause_token(record)
        record.expires = self.clock() + self.pause_ttl
        await self.runs.mark_waiting(record)  # before the record: a listing checks the record's status
        await checkpoint.save(strict=True)
        metrics.agent_run(record.agent, record.status, ())
        log.info("%s run %s %s: waits for %s", self.name, record.id, record.status, record.waits_for(),
                 extra={"micro_run_id": record.id, "micro_agent": self.name})

    async def finish(self, checkpoint: Checkpoint, reply: str) -> None:
        """The loop answered: write the run as ``completed``."""
        record = checkpoint.record
        record.status, record.reply, record.pending = "completed", reply, []
        record.finished = time.time()
        await checkpoint.save()
        metrics.agent_run(record.agent, record.status, record.tool_calls)

    async def fail(self, checkpoint: Checkpoint, exc: BaseException) -> None:
        """The drive raised (or was cancelled): write how the run ended, unless another process owns it now."""
        if checkpoint.lost:
            return
        record = checkpoint.record
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        record.status = "cancelled" if cancelled else "failed"
        record.error_kind = "cancelled" if cancelled else type(exc).__name__
        record.error = ("the run was cancelled (its caller went away, or its process stopped)" if cancelled
                        else str(exc) or type(exc).__name__)
        record.finished = time.time()
        with anyio.move_on_after(5, shield=True):
            try:
                await checkpoint.save()
            except Conflict:
                pass
        metrics.agent_run(record.agent, record.status, record.tool_calls)

    async def pending(self) -> list[AgentRun]:
        """The runs that wait for a person (paused or input_required), oldest first."""
        out = []
        for run_id in await self.runs.waiting():
            run = await self.runs.get(run_id)
            if run is not None:
                run = self.effective(run, None)
                if run.status in ("paused", "input_required"):
                    out.append(run)
        return out

    async def report_waiting(self, every: float = 15.0) -> None:
        """While metrics are on, set ``micro_runs_waiting`` for this agent or flow from the index: now, when
        this process marks or unmarks a waiting run, and every ``every`` seconds for the other processes'
        (its owner's background task; a failed read is logged and tried next time)."""
        while True:
            changed = self.runs.changed
            if metrics.enabled():
                try:
                    counts = await self.runs.waiting_counts(self.clock())
                except Exception:
                    log.warning("%s: counting the waiting runs failed", self.name, exc_info=True)
                else:
                    for status in WAITING:
                        metrics.gauge("runs_waiting", counts.get(status, 0), self.name, status)
            with anyio.move_on_after(every):
                await changed.wait()

    async def interrupted(self) -> list[tuple[AgentRun, int]]:
        """The runs whose owner is gone while they ran, oldest first, with their versions."""
        owners = await self.owners()
        out = []
        for rec in await self.runs.store.read(self.runs.prefix, prefix=True):
            run = msgspec.json.decode(rec.value, type=AgentRun)
            if run.status == "running" and run.owner not in owners:
                out.append((run, rec.version))
        return out
