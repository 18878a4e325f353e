"""The A2A gateway: every agent in the registry, reachable by any Agent2Agent (protocol v1.0) client.

Routes (an ASGI app, :func:`app`; ``micro a2a`` serves it):

- ``GET /agents``: the Agent Card of every agent in the registry (it follows the registry);
- ``GET /agents/{name}/.well-known/agent-card.json``: one agent's card (name, description from its
  prompt's summary, a skill per endpoint of the services it manages, streaming, the JSON-RPC
  interface ``/agents/{name}``, and the bearer scheme when the gateway has a token);
- ``POST /agents/{name}``: the JSON-RPC binding, dispatched by the official ``a2a-sdk``
  (``SendMessage``, ``SendStreamingMessage`` over SSE, ``GetTask``, ``ListTasks``, ``CancelTask``,
  ``SubscribeToTask``); push notifications are not offered (the card says so); protocol v0.3
  clients (``message/send``, ``tasks/get``, … without an ``A2A-Version`` header) are served too,
  through the SDK's compatibility adapter;
- ``/agents/{name}/rest/…``: the HTTP+JSON binding of the same (``POST message:send``,
  ``message:stream``, ``GET tasks/{id}``, ``tasks``, ``POST tasks/{id}:cancel``, ``tasks/{id}:subscribe``),
  by the SDK's REST dispatcher over the same handler.

**Tasks are runs** (:mod:`micro.a2a.tasks`): a new message starts a run of the agent whose id the
gateway chooses (``ChatRequest.run_id``), so the task id *is* the run id, and the context id is
the run's session. The task store is the agents' run records, read through their
``AgentInfo.Run`` / ``AgentInfo.Runs`` endpoints: the gateway keeps no task of its own, so it can
restart, and several gateways can serve the same tasks. A run that waits for a person
(``paused`` / ``input_required``) is an ``input-required`` task; a message sent on that task
answers the question or decides the approvals (``"approve"``, ``"deny: reason"``, or a data part)
and resumes the run through ``Agent.StreamResume``.

A message sent again (its ``messageId`` seen in its context: a client's retry) starts nothing: it
gets the task the first send started, which the gateway remembers in its runtime's store.

What a gateway holds in memory is only the runs it is driving right now (so that streams,
resubscriptions and cancels reach them); a task driven by another gateway is followed through
its record. A gateway that stops lets them finish first (``drain_timeout``, refusing new
messages meanwhile), then cancels the rest, as a service drains its calls. Cancelling a task
that waits (or was interrupted) cancels its run anywhere; a running task can be cancelled
through the gateway driving it.

Security is the HTTP gateway's (:mod:`micro.gateway.http`): ``token`` requires
``Authorization: Bearer`` on every JSON-RPC call (cards and probes stay public, so clients can
discover the scheme, which the cards declare), ``Origin`` and ``Host`` checks against browsers and
DNS rebinding, a body limit, and no caller metadata is passed on to the agents.

Its lifespan runs the runtime and the task group the runs it drives live in: mounted in
another Starlette app (``Mount("/a2a", gateway)``, which does not run a sub-app's lifespan),
enter ``gateway.router.lifespan_context(gateway)`` from the parent's lifespan.

Example::

    import uvicorn
    import micro
    from micro.gateway.a2a import app

    uvicorn.run(app(micro.Runtime(), token="s3cret"), host="127.0.0.1", port=4000)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from micro import idempotency
from micro._proto.micro.agent import ChatEvent
from micro.a2a import tasks
from micro.agent.agent import RunResponse, RunsResponse
from micro.agent.record import AgentRun, PendingCall, new_run_id
from micro.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    Error,
    NotFound,
    RecordNotFound,
    ServiceNotFound,
    Timeout,
    Unavailable,
    UsageError,
    VersionConflict,
)
from micro.gateway import micro_version
from micro.gateway.http import DEFAULT_MAX_BODY, BearerAuth, BrowserGuard, error_body, probe_routes
from micro.resource import aclose
from micro.store import Record

try:
    from a2a.server.context import ServerCallContext
    from a2a.server.request_handlers import RequestHandler
    from a2a.server.request_handlers.response_helpers import agent_card_to_dict, build_error_response
    from a2a.server.routes import DefaultServerCallContextBuilder, create_rest_routes
    from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
    from a2a.types import a2a_pb2 as pb
    from a2a.utils import errors as a2a_errors
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the A2A gateway needs the a2a-sdk: pip install 'micro[a2a]'", name=exc.name) from exc

if TYPE_CHECKING:
    from micro.runtime import Runtime

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DEFAULT_TIMEOUT", "A2AHandler", "app"]

log = logging.getLogger("micro.gateway.a2a")

DEFAULT_TIMEOUT = 300.0
"""Seconds one run may take (an agent's run may call many tools)."""
DEFAULT_DRAIN_TIMEOUT = 10.0
"""Seconds a stopping gateway lets the runs it drives finish before it cancels them (a service's default)."""

CARD_PATH = "/.well-known/agent-card.json"
_ENDS = frozenset({pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELED,
                   pb.TASK_STATE_INPUT_REQUIRED})
_BUFFER = 256  # events a subscriber may lag behind before it is dropped (it can resubscribe)
_FOLLOW_EVERY = 0.25  # seconds between reads of a record driven by another gateway
CLAIM_GRACE = 60.0
"""Seconds a message's claim may name a run that does not exist yet (its send is starting it) before a
retry of the message takes the claim over (the gateway that claimed it stopped before the run began)."""
_UNCLAIM_TIMEOUT = 10.0  # seconds a refused message's claim gets to be deleted (shielded from cancellation)

Event = pb.Task | pb.Message | pb.TaskStatusUpdateEvent | pb.TaskArtifactUpdateEvent


def a2a_error(exc: Error, *, action: str = "") -> a2a_errors.A2AError:
    """The protocol's error for a micro error (its message kept: which agent, which run, what to do)."""
    if isinstance(exc, ServiceNotFound):
        return a2a_errors.InvalidParamsError(message=exc.message)
    if isinstance(exc, NotFound):
        return a2a_errors.TaskNotFoundError(message=exc.message)
    if isinstance(exc, BadRequest):
        return a2a_errors.InvalidParamsError(message=exc.message)
    if isinstance(exc, Conflict):
        if action == "cancel":
            return a2a_errors.TaskNotCancelableError(message=exc.message)
        return a2a_errors.UnsupportedOperationError(message=exc.message)
    return a2a_errors.InternalError(message=f"{exc.code}: {exc.message}")


class _Drive:
    """A run this gateway is driving: its events go to every subscriber (streams, waiting sends)."""

    def __init__(self, agent: str, task_id: str, context_id: str) -> None:
        self.agent = agent
        self.task_id = task_id
        self.context_id = context_id
        self.subscribers: list[MemoryObjectSendStream[Event]] = []
        self.scope = anyio.CancelScope()
        self.started = anyio.Event()
        self.finished = anyio.Event()
        self.error: a2a_errors.A2AError | None = None
        self.chunks = 0
        self.cancelled = False
        self.new = False
        """A new run (its id chosen here), not a resume: a record of it is this drive's run."""
        self.claim: str | None = None
        """The store key of the message's claim (:meth:`A2AHandler._claim`): deleted if the agent refuses it."""
        self.ended = False
        """A final status (completed, failed, input-required) was published."""

    def subscribe(self) -> MemoryObjectReceiveStream[Event]:
        send, recv = anyio.create_memory_object_stream[Event](_BUFFER)
        if self.finished.is_set():
            send.close()
        else:
            self.subscribers.append(send)
        return recv

    def publish(self, event: Event) -> None:
        if isinstance(event, pb.TaskStatusUpdateEvent | pb.Task) and event.status.state in _ENDS:
            self.ended = True
        for s in list(self.subscribers):
            try:
                s.send_nowait(event)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                # a subscriber that stopped reading (or left) must not hold the run up
                self.subscribers.remove(s)
                s.close()

    def close(self) -> None:
        for s in self.subscribers:
            s.close()
        self.subscribers.clear()
        self.started.set()
        self.finished.set()


class A2AHandler(RequestHandler):
    """The ``a2a-sdk`` request handler over micro's agents: tasks are runs (see the module docstring).

    The agent a request is for is ``context.state["agent"]`` (the ``{name}`` of the route).
    Background work (the runs being driven) lives in ``task_group``, owned by the app's lifespan.
    """

    def __init__(self, runtime: Runtime, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.runtime = runtime
        self.timeout = timeout
        self.drives: dict[str, _Drive] = {}
        self.task_group: anyio.abc.TaskGroup | None = None
        self.draining = False
        """Stopping: new messages are refused while the runs being driven finish (:meth:`drain`); the
        owner of :attr:`task_group` resets it when it starts again."""

    async def drain(self, timeout: float) -> None:
        """Refuse new messages and let the runs being driven finish, up to ``timeout`` seconds; the owner
        of :attr:`task_group` then cancels what is left (their agents record them as cancelled)."""
        self.draining = True
        drives = list(self.drives.values())
        if not drives:
            return
        log.info("a2a: stopping: %d runs it drives get up to %g s to finish", len(drives), timeout)
        with anyio.move_on_after(timeout):
            for drive in drives:
                await drive.finished.wait()
        left = [f"{d.agent} task {d.task_id}" for d in drives if not d.finished.is_set()]
        if left:
            log.warning("a2a: %d runs did not finish within %g s of the gateway stopping: cancelled (%s)", len(left),
                        timeout, ", ".join(left[:10]) + (", …" if len(left) > 10 else ""))

    # -- reading runs ------------------------------------------------------------------------------

    async def _record(self, agent: str, task_id: str) -> AgentRun:
        if not task_id:
            raise a2a_errors.InvalidParamsError(message="the task id is empty")
        try:
            rsp = await self.runtime.client.call(agent, "AgentInfo.Run", {"id": task_id}, response_type=RunResponse,
                                                 timeout=30)
        except Error as exc:
            raise a2a_error(exc) from None
        run: AgentRun = rsp.run
        return run

    async def on_get_task(self, params: pb.GetTaskRequest, context: ServerCallContext) -> pb.Task | None:
        run = await self._record(_agent(context), params.id)
        return tasks.task_of(run, history_length=_history(params))

    async def on_list_tasks(self, params: pb.ListTasksRequest, context: ServerCallContext) -> pb.ListTasksResponse:
        agent = _agent(context)
        size = params.page_size if params.HasField("page_size") else 50
        if not 1 <= size <= 100:
            raise a2a_errors.InvalidParamsError(message=f"pageSize must be 1..100, not {size}")
        offset = 0
        if params.page_token:
            if not params.page_token.isdigit():
                raise a2a_errors.InvalidParamsError(message=f"pageToken {params.page_token!r} is not one this "
                                                            "gateway gave (use nextPageToken)")
            offset = int(params.page_token)
        request: dict[str, Any] = {"limit": offset + size + 1}
        if params.context_id:
            request["session"] = params.context_id
        if params.status:
            if params.status not in tasks.STATUSES_OF:  # submitted, rejected, auth-required: no run is
                return pb.ListTasksResponse(page_size=size, total_size=0)
            request["status"] = list(tasks.STATUSES_OF[params.status])
        try:
            rsp = await self.runtime.client.call(agent, "AgentInfo.Runs", request, response_type=RunsResponse,
                                                 timeout=30)
        except Error as exc:
            raise a2a_error(exc) from None
        runs: list[AgentRun] = rsp.runs
        page = runs[offset:offset + size]
        history = _history(params)
        out = pb.ListTasksResponse(tasks=[tasks.task_of(r, history_length=history,
                                                        artifacts=params.include_artifacts) for r in page],
                                   page_size=size, total_size=len(runs))
        if len(runs) > offset + size:
            out.next_page_token = str(offset + size)
        return out

    # -- cancelling --------------------------------------------------------------------------------

    async def on_cancel_task(self, params: pb.CancelTaskRequest, context: ServerCallContext) -> pb.Task | None:
        agent = _agent(context)
        run = await self._record(agent, params.id)
        if tasks.STATE.get(run.status) in tasks.FINAL_STATES:
            raise a2a_errors.TaskNotCancelableError(message=f"task {run.id} is {run.status}: it has ended")
        drive = self.drives.get(run.id)
        if drive is not None:  # driven here: stop it; the agent records the run as cancelled
            drive.cancelled = True
            drive.scope.cancel()
            await drive.finished.wait()
            return tasks.task_of(await self._ended(agent, run.id))
        if run.status in ("paused", "input_required", "interrupted"):
            try:
                await self.runtime.client.call(agent, "Agent.Cancel",
                                               {"run_id": run.id, "reason": "cancelled over A2A"}, timeout=30)
            except Error as exc:
                raise a2a_error(exc, action="cancel") from None
            return tasks.task_of(await self._record(agent, run.id))
        raise a2a_errors.TaskNotCancelableError(
            message=f"task {run.id} is working in another gateway or process; cancel it through that gateway, "
                    "or once it waits for input")

    async def _ended(self, agent: str, task_id: str) -> AgentRun:
        """The record of a run whose stream this gateway cancelled, once its process wrote how it ended.

        The agent writes ``cancelled`` as its run unwinds, which may be just after the stream
        closed; the record is read again for a short while, then shown as cancelled regardless.
        """
        run = await self._record(agent, task_id)
        with anyio.move_on_after(5):
            while run.status == "running":
                await anyio.sleep(0.02)
                run = await self._record(agent, task_id)
        if run.status == "running":
            run = msgspec.structs.replace(run, status="cancelled", error="cancelled over A2A")
        return run

    # -- sending -----------------------------------------------------------------------------------

    async def on_message_send(self, params: pb.SendMessageRequest, context: ServerCallContext) -> pb.Task | pb.Message:
        agent = _agent(context)
        started = await self._start(agent, params)
        history = _history(params.configuration)
        if isinstance(started, str):  # sent before (a retry): the task it started, once that stops working
            if not params.configuration.return_immediately:
                await self._stopped(agent, started)
            return tasks.task_of(await self._record(agent, started), history_length=history)
        drive, events = started
        if params.configuration.return_immediately:
            events.close()
            return tasks.task_of(await self._record(agent, drive.task_id), history_length=history)
        with events:
            async for _ in events:
                pass
        await drive.finished.wait()
        return tasks.task_of(await self._record(agent, drive.task_id), history_length=history)

    async def on_message_send_stream(self, params: pb.SendMessageRequest,
                                     context: ServerCallContext) -> AsyncGenerator[Event, None]:
        agent = _agent(context)
        started = await self._start(agent, params)
        if isinstance(started, str):  # sent before (a retry): its task from now on, as a resubscription
            async for event in self._subscribe(agent, started, ended=True):
                yield event
            return
        _, events = started
        with events:
            async for event in events:
                yield event

    async def on_subscribe_to_task(self, params: pb.SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[Event, None]:
        async for event in self._subscribe(_agent(context), params.id, ended=False):
            yield event

    async def _subscribe(self, agent: str, task_id: str, *, ended: bool) -> AsyncGenerator[Event, None]:
        """The task, then its events until it stops working; an ended task is refused unless ``ended``
        (then it is sent alone)."""
        drive = self.drives.get(task_id)
        events = drive.subscribe() if drive is not None else None  # before the snapshot: no event missed
        try:
            run = await self._record(agent, task_id)
            state = tasks.STATE.get(run.status)
            if state in tasks.FINAL_STATES:
                if not ended:
                    raise a2a_errors.UnsupportedOperationError(
                        message=f"task {run.id} is {run.status}: there is nothing more to stream (GetTask reads it)")
                yield tasks.task_of(run)
                return
            yield tasks.task_of(run)
            if events is not None:
                async for event in events:
                    yield event
            elif state == pb.TASK_STATE_WORKING and run.status == "running":
                async for event in self._follow(agent, run):
                    yield event
        finally:
            if events is not None:
                events.close()

    async def _stopped(self, agent: str, task_id: str) -> None:
        """Wait until a task stops working: its drive here ends, or its record (driven elsewhere) says so."""
        drive = self.drives.get(task_id)
        if drive is not None:
            await drive.finished.wait()
            return
        run = await self._record(agent, task_id)
        if run.status == "running":
            async for _ in self._follow(agent, run):
                pass

    async def _follow(self, agent: str, run: AgentRun) -> AsyncIterator[Event]:
        """Status updates of a run driven elsewhere, from its record, until it stops running."""
        seen = run.status
        while True:
            await anyio.sleep(_FOLLOW_EVERY)
            run = await self._record(agent, run.id)
            if run.status == seen:
                continue
            seen = run.status
            if run.status == "completed":
                yield pb.TaskArtifactUpdateEvent(task_id=run.id, context_id=run.session, last_chunk=True,
                                                 artifact=pb.Artifact(artifact_id=tasks.REPLY_ARTIFACT,
                                                                      name=tasks.REPLY_ARTIFACT,
                                                                      parts=[tasks.text_part(run.reply)]))
            yield pb.TaskStatusUpdateEvent(task_id=run.id, context_id=run.session, status=tasks.status_of(run))
            if run.status != "running":
                return

    async def _start(self, agent: str,
                     params: pb.SendMessageRequest) -> tuple[_Drive, MemoryObjectReceiveStream[Event]] | str:
        """Start (or resume) the run a message asks for; returns once it runs, or raises what refused it.

        A message sent before (its ``messageId`` in its context, a client's retry) starts nothing: the
        id of the task the first one started is returned instead (see :meth:`_claim`)."""
        if self.task_group is None:
            raise a2a_errors.InternalError(message="the A2A gateway is not started (its app's lifespan did not run)")
        if self.draining:
            raise _stopping()
        message = params.message
        text, data = tasks.message_content(message)
        if not message.task_id and not text.strip():
            raise a2a_errors.InvalidParamsError(message="the message has no text: send a text part (or a data "
                                                        "part) saying what the agent should do")
        task_id = message.task_id or new_run_id()
        key = _message_key(agent, message) if message.message_id else None
        claimed = False
        made: list[_Drive] = []  # the drive _begin adds, once it does
        try:
            if key is not None:
                earlier = await self._claim(agent, key, message.message_id, task_id, _content(message),
                                            new=not message.task_id)
                if isinstance(earlier, str):
                    return earlier
                claimed, task_id = True, earlier[0]
            return await self._begin(agent, message, text, data, task_id, made, key)
        finally:
            # refused before its drive began: nothing reached the agent, the message may be sent again. Once
            # the drive began, it is the drive's to forget the message if the agent refuses it (see _failed):
            # a caller that left meanwhile does not know how the start ends
            if claimed and not made:
                assert key is not None
                await self._unclaim(key)

    async def _claim(self, agent: str, key: str, message_id: str, task_id: str, content: str, *,
                     new: bool) -> str | tuple[str]:
        """Record that the message of ``key`` is task ``task_id``: ``(task_id,)``, or the id of the task an
        earlier send of it started. One conditional write in the store (create-if-absent): of two sends of a
        message, to this gateway or to replicas sharing its store, one starts the run; the record lasts a day.

        The record keeps a digest of the message's parts: the same ``messageId`` with other content is
        refused. A claim naming a new run that no agent has written after :data:`CLAIM_GRACE` seconds (the
        gateway that claimed it stopped first) is taken over, with a write conditional on its version (one
        retry takes it), keeping its task id (an agent refuses a run id a second time)."""
        store = self.runtime.store
        try:
            for _ in range(5):
                try:
                    await self._write_claim(Record(key, _claim_value(task_id, content, new)), if_version=0)
                    return (task_id,)
                except VersionConflict:
                    pass
                try:
                    (rec,) = await store.read(key)
                except RecordNotFound:
                    continue  # the earlier send was refused meanwhile: this one goes ahead
                earlier = _claim_of(rec.value)
                if earlier.get("content", content) != content:
                    raise a2a_errors.InvalidParamsError(
                        message=f"messageId {message_id!r} was sent before with other content: a message sent "
                                "again must be the same; a new message needs a new messageId")
                task = str(earlier["task"])
                if not earlier.get("new") or task in self.drives:
                    return task
                if await self._run_exists(agent, task):
                    return task
                left = CLAIM_GRACE - (time.time() - float(earlier.get("at", 0)))
                if left > 0:  # being started (here or by a replica): its record is on its way
                    if await self._started(agent, key, rec.version, task, left):
                        return task
                    continue  # refused meanwhile (the claim is gone), or it is time to take it over
                try:  # its gateway stopped before the run began: this send starts it
                    await self._write_claim(Record(key, _claim_value(task, content, True)), if_version=rec.version)
                except VersionConflict:
                    continue  # another retry took it over first
                log.info("a2a: message %s named task %s, which never started: sending it again", key, task)
                return (task,)
        except Error as exc:
            raise a2a_error(exc) from None
        raise a2a_errors.InternalError(message=f"the record of message {key!r} kept changing; send it again")

    async def _started(self, agent: str, key: str, version: int, task_id: str, within: float) -> bool:
        """Wait (up to ``within`` seconds) for the run a claim names to exist; ``False`` if the claim was
        deleted or changed meanwhile (its send was refused), or the time ran out."""
        with anyio.move_on_after(within):
            while True:
                await anyio.sleep(_FOLLOW_EVERY)  # pacing reads of the store and the agent (another process)
                if task_id in self.drives or await self._run_exists(agent, task_id):
                    return True
                try:
                    (rec,) = await self.runtime.store.read(key)
                except RecordNotFound:
                    return False
                if rec.version != version:
                    return False
        return False

    async def _write_claim(self, record: Record, *, if_version: int) -> None:
        """Write a claim shielded from a caller leaving: once written, the caller knows it is (and unclaims
        it if nothing started); a write that reached the store but whose caller was cancelled would stay."""
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(_UNCLAIM_TIMEOUT):
                await self.runtime.store.write(record, ttl=idempotency.DEFAULT_TTL, if_version=if_version)
        except TimeoutError:
            raise a2a_errors.InternalError(
                message=f"the store did not answer within {_UNCLAIM_TIMEOUT:g} s; send the message again "
                        f"(if it was recorded, a retry gets its task, or starts it after {CLAIM_GRACE:g} s)") from None

    async def _run_exists(self, agent: str, task_id: str) -> bool:
        """Whether the agent has a record of the run (an error other than "not found" counts as yes)."""
        try:
            await self._record(agent, task_id)
        except a2a_errors.TaskNotFoundError:
            return False
        except a2a_errors.A2AError:
            return True  # not known: as if it started (a retry gets what reading it says)
        return True

    async def _unclaim(self, key: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_UNCLAIM_TIMEOUT) as bounded:
            try:
                await self.runtime.store.delete(key)
            except Error as exc:
                log.warning("a2a: could not forget refused message %s (a retry of it waits %g s, then sends it): %s",
                            key, CLAIM_GRACE, exc)
        if bounded.cancelled_caught:
            log.warning("a2a: could not forget refused message %s within %g s (a retry of it waits %g s, then "
                        "sends it)", key, _UNCLAIM_TIMEOUT, CLAIM_GRACE)

    async def _begin(self, agent: str, message: pb.Message, text: str, data: Any, task_id: str,
                     made: list[_Drive], key: str | None) -> tuple[_Drive, MemoryObjectReceiveStream[Event]]:
        assert self.task_group is not None
        if message.task_id:
            self._check_idle(message.task_id)  # refused before any I/O; checked again where the drive is added
            run = await self._record(agent, message.task_id)
            if message.context_id and message.context_id != run.session:
                raise a2a_errors.InvalidParamsError(
                    message=f"contextId {message.context_id!r} is not the context of task {run.id} ({run.session!r})")
            if run.status not in ("paused", "input_required"):
                raise a2a_errors.UnsupportedOperationError(
                    message=f"task {run.id} is {run.status}: only a task that needs input takes a message; send a "
                            "new message without taskId (the same contextId continues the conversation)")
            endpoint, request = "Agent.StreamResume", tasks.resume_request(run, text, data)
            context_id = run.session
        else:
            context_id = message.context_id or uuid.uuid4().hex
            endpoint = "Agent.StreamChat"
            request = {"message": text, "session": context_id, "run_id": task_id}
        # check and add with no await between: of two messages on one waiting task, one drives it; the
        # other is refused here (it read the record before the first one's drive was added)
        self._check_idle(task_id)
        if self.draining:  # began before the gateway stopped: drain() waits only for the drives it saw
            raise _stopping()
        drive = _Drive(agent, task_id, context_id)
        drive.new = not message.task_id
        drive.claim = key
        self.drives[task_id] = drive
        made.append(drive)
        events = drive.subscribe()
        self.task_group.start_soon(self._drive, drive, endpoint, request)
        try:
            await drive.started.wait()
        except BaseException:  # the caller left: the run goes on without this subscriber
            events.close()
            raise
        if drive.error is not None:
            events.close()
            raise drive.error
        return drive, events

    def _check_idle(self, task_id: str) -> None:
        if task_id in self.drives:
            raise a2a_errors.UnsupportedOperationError(
                message=f"task {task_id} is working; wait for it (SubscribeToTask) before sending more")

    async def _drive(self, drive: _Drive, endpoint: str, request: dict[str, Any]) -> None:
        first = True
        items = self.runtime.client.stream(drive.agent, endpoint, request, response_type=ChatEvent,
                                           timeout=self.timeout)
        try:
            with drive.scope:
                try:
                    async for ev in items:
                        if first and ev.type == "error":
                            continue  # a refusal before the run started: the stream raises it next
                        if first:  # the task first, as the protocol wants; refusals came before it
                            first = False
                            drive.publish(await self._snapshot(drive))
                            drive.started.set()
                        for out in self._events(drive, ev):
                            drive.publish(out)
                    if first:
                        first = await self._failed(drive, a2a_errors.InternalError(
                            message=f"agent {drive.agent}: its stream ended before the run started"), "",
                            answered=True)
                except Error as exc:
                    # a transport error (no answer in time, the connection lost) says nothing of whether
                    # the agent got the message: only the agent's own answer is a refusal
                    first = await self._failed(drive, a2a_error(exc) if first else None, exc.message,
                                               answered=not isinstance(exc, Unavailable | Timeout | Cancelled))
                except Exception as exc:
                    log.exception("a2a: agent %s task %s: the run's stream failed", drive.agent, drive.task_id)
                    first = await self._failed(
                        drive, a2a_errors.InternalError(message="the gateway failed (details in its log)")
                        if first else None, f"the gateway failed: {exc}", answered=False)
            if drive.cancelled and not first:
                drive.publish(self._status(drive, pb.TASK_STATE_CANCELED, "cancelled over A2A"))
        finally:
            with anyio.CancelScope(shield=True):  # closing the stream is what stops the run (in process too)
                await aclose(items)
            if self.drives.get(drive.task_id) is drive:  # only this drive's own entry
                del self.drives[drive.task_id]
            drive.close()

    async def _failed(self, drive: _Drive, refusal: a2a_errors.A2AError | None, text: str, *,
                      answered: bool) -> bool:
        """A run's stream failed: say so once. Before any event (``refusal`` given), a new run whose record
        exists failed as a task (the task is returned or streamed as failed); with no record, the agent
        refused the message (``refusal`` is the JSON-RPC error). Returns whether no task was published.

        A refused message is forgotten (its claim deleted: it may be sent again) when the refusal is the
        agent's own answer (``answered``) and no record of its run exists; after a transport error the
        claim stays (the run may have started: a retry finds it, or takes the claim over after
        :data:`CLAIM_GRACE`)."""
        if refusal is None:
            if not drive.ended:  # the agent's own error event said it already
                drive.publish(self._status(drive, pb.TASK_STATE_FAILED, text))
            return False
        run = None
        absent = True  # a resume's run exists; the refusal says the message changed nothing
        if drive.new:
            try:
                run = await self._record(drive.agent, drive.task_id)
            except a2a_errors.TaskNotFoundError:
                pass
            except a2a_errors.A2AError:
                absent = False  # not known
        if run is None:
            drive.error = refusal
            if drive.claim is not None and answered and absent:
                await self._unclaim(drive.claim)
            return True
        task = tasks.task_of(run, artifacts=False)
        if task.status.state not in _ENDS:  # written as running, and its stream broke: it failed here
            task.status.CopyFrom(self._status(drive, pb.TASK_STATE_FAILED, text or refusal.message).status)
        drive.publish(task)
        drive.started.set()
        return False

    async def _snapshot(self, drive: _Drive) -> pb.Task:
        """The task a stream starts with: working (the record's history, not its status, which the run
        may already have moved past: the events that follow say what it did)."""
        try:
            task = tasks.task_of(await self._record(drive.agent, drive.task_id), artifacts=False)
        except a2a_errors.A2AError:  # the record is the agent's to write; the task is working meanwhile
            task = pb.Task(id=drive.task_id, context_id=drive.context_id)
        task.status.CopyFrom(pb.TaskStatus(state=pb.TASK_STATE_WORKING))
        task.status.timestamp.GetCurrentTime()
        return task

    def _status(self, drive: _Drive, state: int, text: str = "", data: Any = None) -> pb.TaskStatusUpdateEvent:
        status = pb.TaskStatus(state=state)  # type: ignore[arg-type]
        status.timestamp.GetCurrentTime()
        parts = ([tasks.text_part(text)] if text else []) + ([tasks.data_part(data)] if data is not None else [])
        if parts:
            status.message.CopyFrom(tasks.agent_message(drive.task_id, drive.context_id, parts, uuid.uuid4().hex))
        return pb.TaskStatusUpdateEvent(task_id=drive.task_id, context_id=drive.context_id, status=status)

    def _events(self, drive: _Drive, ev: ChatEvent) -> list[Event]:
        """The A2A events of one of the agent's stream events."""
        if ev.type == "text":
            drive.chunks += 1
            return [pb.TaskArtifactUpdateEvent(
                task_id=drive.task_id, context_id=drive.context_id, append=drive.chunks > 1, last_chunk=False,
                artifact=pb.Artifact(artifact_id=tasks.REPLY_ARTIFACT, name=tasks.REPLY_ARTIFACT,
                                     parts=[tasks.text_part(ev.text)]))]
        if ev.type in ("tool_start", "tool_end") and ev.tool_call is not None:
            call = ev.tool_call
            args = _json(call.input)
            if ev.type == "tool_start":
                text = f"→ {call.name}({json.dumps(args, ensure_ascii=False)})"
                data = {"tool_call": {"id": call.id, "name": call.name, "input": args, "phase": "start"}}
            else:
                text = f"{'✗' if call.is_error else '←'} {call.name}: {_short(call.result)}"
                data = {"tool_call": {"id": call.id, "name": call.name, "result": call.result,
                                      "is_error": call.is_error, "phase": "end"}}
            return [self._status(drive, pb.TASK_STATE_WORKING, text, data)]
        if ev.type == "done" and ev.response is not None:
            return [pb.TaskArtifactUpdateEvent(
                        task_id=drive.task_id, context_id=drive.context_id, append=False, last_chunk=True,
                        artifact=pb.Artifact(artifact_id=tasks.REPLY_ARTIFACT, name=tasks.REPLY_ARTIFACT,
                                             parts=[tasks.text_part(ev.response.reply)])),
                    self._status(drive, pb.TASK_STATE_COMPLETED)]
        if ev.type in ("paused", "input_required") and ev.response is not None:
            pending = [PendingCall(p.call_id, p.tool, _json(p.input) or {}, p.reason,
                                   "question" if p.kind == "question" else "approval", p.question)
                       for p in ev.response.pending]
            text, waits = tasks.waiting_message(pending)
            return [self._status(drive, pb.TASK_STATE_INPUT_REQUIRED, text, {"pending": waits})]
        if ev.type == "error":
            return [self._status(drive, pb.TASK_STATE_FAILED, ev.text)]
        return []

    # -- what the SDK's interface has and micro does not offer -------------------------------------

    async def on_create_task_push_notification_config(self, params: pb.TaskPushNotificationConfig,
                                                      context: ServerCallContext) -> pb.TaskPushNotificationConfig:
        raise a2a_errors.PushNotificationNotSupportedError(message=_NO_PUSH)

    async def on_get_task_push_notification_config(self, params: pb.GetTaskPushNotificationConfigRequest,
                                                   context: ServerCallContext) -> pb.TaskPushNotificationConfig:
        raise a2a_errors.PushNotificationNotSupportedError(message=_NO_PUSH)

    async def on_list_task_push_notification_configs(
            self, params: pb.ListTaskPushNotificationConfigsRequest,
            context: ServerCallContext) -> pb.ListTaskPushNotificationConfigsResponse:
        raise a2a_errors.PushNotificationNotSupportedError(message=_NO_PUSH)

    async def on_delete_task_push_notification_config(self, params: pb.DeleteTaskPushNotificationConfigRequest,
                                                      context: ServerCallContext) -> None:
        raise a2a_errors.PushNotificationNotSupportedError(message=_NO_PUSH)

    async def on_get_extended_agent_card(self, params: pb.GetExtendedAgentCardRequest,
                                         context: ServerCallContext) -> pb.AgentCard:
        raise a2a_errors.ExtendedAgentCardNotConfiguredError(
            message="micro's agents have one card, the public one (GET /agents/{name}/.well-known/agent-card.json)")


_NO_PUSH = "this gateway sends no push notifications: stream the task (SendStreamingMessage, SubscribeToTask)"


def _message_key(agent: str, message: pb.Message) -> str:
    """The store key remembering which task a message started: its agent, context, task and ``messageId``."""
    return idempotency.store_key(agent, "SendMessage",
                                 json.dumps([message.context_id, message.task_id, message.message_id]))


def _content(message: pb.Message) -> str:
    """A digest of a message's parts: a message sent again with the same ``messageId`` must match it."""
    digest = hashlib.sha256()
    for part in message.parts:
        data = part.SerializeToString(deterministic=True)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _claim_value(task_id: str, content: str, new: bool) -> bytes:
    return json.dumps({"task": task_id, "content": content, "new": new, "at": time.time()}).encode()


def _claim_of(value: bytes) -> dict[str, Any]:
    """A claim record's fields (one written by an earlier version holds the task id alone)."""
    text = value.decode()
    try:
        claim = json.loads(text)
    except ValueError:
        claim = None
    return claim if isinstance(claim, dict) and "task" in claim else {"task": text}


def _stopping() -> a2a_errors.A2AError:
    # a2a-sdk's clients retry nothing themselves: the message says what to do (docs/a2a.md)
    return a2a_errors.InternalError(message="this A2A gateway is stopping: send the message to another one (or "
                                            "again once it has restarted); nothing of it was started")


def _agent(context: ServerCallContext) -> str:
    agent: str = context.state["agent"]
    return agent


def _history(params: Any) -> int | None:
    if params.HasField("history_length"):
        if params.history_length < 0:
            raise a2a_errors.InvalidParamsError(message=f"historyLength must be >= 0, not {params.history_length}")
        return int(params.history_length)
    return None


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# -- the app ----------------------------------------------------------------------------------------


class _Context(DefaultServerCallContextBuilder):
    """The SDK's call context, plus the agent of the route (``/agents/{name}``); caller headers stay here."""

    def build(self, request: Request) -> ServerCallContext:
        ctx = super().build(request)
        ctx.state["agent"] = request.path_params["name"]
        return ctx


class _A2AGateway:
    def __init__(self, runtime: Runtime, *, max_body: int, timeout: float, token: bool,
                 public_url: str | None, drain_timeout: float) -> None:
        if max_body <= 0:
            raise UsageError(f"max_body must be a positive number of bytes, not {max_body}")
        if timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout}")
        if drain_timeout < 0:
            raise UsageError(f"drain_timeout must be >= 0 seconds, not {drain_timeout}")
        self.runtime = runtime
        self.drain_timeout = drain_timeout
        self.token = token
        self.public_url = public_url.rstrip("/") if public_url else None
        self.handler = A2AHandler(runtime, timeout=timeout)
        self.dispatcher = JsonRpcDispatcher(self.handler, context_builder=_Context(), enable_v0_3_compat=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.runtime.acquire()
        try:
            async with anyio.create_task_group() as tg:
                self.handler.task_group = tg
                self.handler.draining = False  # a second lifespan (a restarted server) takes messages again
                try:
                    yield
                    await self.handler.drain(self.drain_timeout)  # a stop, not a failure: as a service drains
                finally:
                    self.handler.task_group = None
                    tg.cancel_scope.cancel()  # the runs still driven: their agents record them as cancelled
        finally:
            await self.runtime.release()

    def _base(self, request: Request) -> str:
        if self.public_url:
            return self.public_url
        # root_path: where the app is mounted (Mount("/a2a", gateway)), which base_url leaves out
        return f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}".rstrip("/")

    async def _agents(self) -> list[Any]:
        records = await self.runtime.registry.list()
        agents: dict[str, Any] = {}
        for rec in records:
            if rec.metadata.get("type") == "agent":
                agents.setdefault(rec.name, rec)
        return [agents[n] for n in sorted(agents)]

    async def _card(self, name: str, base: str) -> pb.AgentCard | None:
        try:
            records = await self.runtime.registry.get(name)
        except ServiceNotFound:
            return None
        agent = next((r for r in records if r.metadata.get("type") == "agent"), None)
        if agent is None:
            return None
        services = []
        for s in [s for s in agent.metadata.get("services", "").split(",") if s]:
            try:
                services.extend((await self.runtime.registry.get(s))[:1])
            except ServiceNotFound:
                continue  # not running now: its endpoints are not skills until it is
        return tasks.card_of(agent, services, f"{base}/agents/{name}", micro_version(), token=self.token)

    async def _unknown(self, name: str) -> Response:
        names = [r.name for r in await self._agents()]
        listed = ", ".join(names) if names else "none is running"
        return Response(error_body("NOT_FOUND", f"no agent {name!r} in the registry (agents: {listed}; "
                                                "GET /agents lists their cards)"),
                        status_code=404, media_type="application/json")

    async def list_cards(self, request: Request) -> Response:
        base = self._base(request)
        cards = []
        for rec in await self._agents():
            card = await self._card(rec.name, base)
            if card is not None:
                cards.append(agent_card_to_dict(card))
        return JSONResponse(cards)

    async def card(self, request: Request) -> Response:
        name = request.path_params["name"]
        card = await self._card(name, self._base(request))
        if card is None:
            return await self._unknown(name)
        return JSONResponse(agent_card_to_dict(card))

    async def rpc(self, request: Request) -> Response:
        name = request.path_params["name"]
        if await self._card_record(name) is None:
            return await self._unknown(name)
        return await self.dispatcher.handle_requests(request)

    async def _card_record(self, name: str) -> Any:
        try:
            records = await self.runtime.client.lookup(name)  # the watched cache: no I/O
        except ServiceNotFound:
            return None
        return next((r for r in records if r.metadata.get("type") == "agent"), None)


class _BodyLimit:
    """ASGI middleware: a POST body over ``limit`` bytes gets 413 (with a JSON-RPC error body) before the
    app sees any of it; a body within the limit is read first, then handed to the app as it came."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = next((bytes(v) for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(f"the request body of {int(declared)} bytes is over this gateway's {limit}-byte "
                               "limit", scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > limit:
                await self._refuse(f"the request body is over this gateway's {limit}-byte limit", scope, receive,
                                   send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's own: a stream sees it leave

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(text: str, scope: Scope, receive: Receive, send: Send) -> None:
        rsp = JSONResponse(build_error_response(None, a2a_errors.InvalidRequestError(message=text)), status_code=413)
        await rsp(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        detail = (f"no route {request.method} {request.url.path}: GET /agents, GET /agents/{{name}}{CARD_PATH}, "
                  "or JSON-RPC at POST /agents/{name}")
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path} (allowed: {(exc.headers or {}).get('Allow')})"
    else:
        detail = f"{exc.detail}: {request.method} {request.url.path}"
    code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(exc.status_code, "UNKNOWN")
    return Response(error_body(code, detail), status_code=exc.status_code, media_type="application/json",
                    headers=exc.headers)


def _public(path: str) -> bool:
    """Discovery needs no token: the list of cards and each card (which declares the scheme)."""
    return path == "/agents" or (path.startswith("/agents/") and path.endswith(CARD_PATH))


def app(runtime: Runtime, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT, allowed_hosts: Iterable[str] | None = None,
        allowed_origins: Iterable[str] = (), public_url: str | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> Starlette:
    """The A2A gateway as an ASGI app on ``runtime`` (mount it anywhere; its lifespan must run).

    Args:
        runtime: the runtime whose registry lists the agents and whose client calls them.
        token: when given, every JSON-RPC call needs ``Authorization: Bearer <token>`` and the cards
            declare that scheme; the cards themselves stay public. The caller's headers are never
            passed on to the agents.
        max_body: the largest JSON-RPC body accepted, in bytes (larger: 413 with a JSON-RPC error).
        timeout: seconds one run may take.
        allowed_hosts / allowed_origins: as :func:`micro.gateway.http.app` (DNS rebinding, browsers).
        public_url: the URL clients reach the gateway at, for the cards' interface URLs (default:
            the URL each request came to).
        drain_timeout: seconds the runs the gateway drives get to finish when it stops (its lifespan
            ends): new messages are refused meanwhile; what is still running then is cancelled.

    Example::

        gateway = app(micro.Runtime(), token=os.environ["MICRO_A2A_TOKEN"])
    """
    gw = _A2AGateway(runtime, max_body=max_body, timeout=timeout, token=token is not None, public_url=public_url,
                     drain_timeout=drain_timeout)
    rest = [r for r in create_rest_routes(gw.handler, context_builder=_Context(), path_prefix="/agents/{name}/rest")
            if isinstance(r, Route)]  # the SDK's /{tenant} mount left out: micro has no tenants
    routes = [
        Route("/agents", gw.list_cards, methods=["GET"]),
        Route("/agents/{name}" + CARD_PATH, gw.card, methods=["GET"]),
        Route("/agents/{name}", gw.rpc, methods=["POST"]),
        *rest,
        *probe_routes(runtime),
    ]
    origins = list(allowed_origins)
    middleware = [Middleware(BrowserGuard, hosts=allowed_hosts, origins=origins)]
    if origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                        allow_headers=["authorization", "content-type", "a2a-version"]))
    if token is not None:
        middleware.append(Middleware(BearerAuth, token=token, public=_public))
    middleware.append(Middleware(_BodyLimit, limit=max_body))
    return Starlette(routes=routes, middleware=middleware, lifespan=gw.lifespan,
                     exception_handlers={HTTPException: _http_error})

