"""``Flow``: a broker subscriber that runs one model step over services for every event.

Per event on the trigger topic: decode it, run the deterministic ``steps``,
render the prompt from the event, run the agent tool loop over the flow's
services (or hand the prompt to a named agent's ``Agent.Chat``), run the
``after`` steps, and record the run. The run record is the checkpoint: a step
or tool call that completed in an earlier attempt is not run again, and an
event whose run completed is acknowledged without running. Every tool call
carries an ``idempotency-key`` (event id + tool + arguments) in its metadata,
so a service can make the one side effect that may have happened before a
crash happen only once. On a durable broker (``nats+js://``) the event is
acknowledged only after its record is written; a failure is retried with
backoff up to the broker's ``max_deliver``, then lands in ``dlq.<topic>``.
A tool call that fails transiently (``Unavailable``, ``Timeout``,
``ResourceExhausted``, ``Internal``, ``Unknown``, ``Cancelled``) ends the run as
such a failure; other tool errors (``BadRequest``, ``NotFound``…) go back to
the model as ``is_error`` results. A template error or a step result that
cannot be recorded is deterministic: the run is ``failed`` and acknowledged,
not retried. Other brokers never deliver an event twice, so there a failed run
is ``failed`` at once.

The model step runs on the agents' run engine (:mod:`micro.agent.engine`): its run
is an agent run record, ``agent/{flow}/runs/{event id}``. With ``needs_approval``
(or an ``approve`` hook answering ``"ask"``, or the model's ``request_input``
question) it can wait for a person: the flow run is then ``paused`` (or
``input_required``), the event acknowledged once that is recorded, and the same
commands as for agents continue it (``micro agent pending|approve|answer|cancel
FLOW``, ``Agent.Resume`` on the flow's service): the model step goes on from its
checkpoint, then the ``after`` steps run and the flow run completes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Unpack

import anyio
import msgspec

from micro import idempotency, telemetry
from micro._proto.micro.agent import CancelRequest, ChatResponse, ResumeRequest
from micro.agent import agent as _agent_api
from micro.agent.engine import (
    DEFAULT_PAUSE_TTL,
    Answer,
    Approval,
    Checkpoint,
    RunEngine,
    request_decisions,
    response_of,
    restore,
)
from micro.agent.loop import Approve, Decision, EndRun, Limits, Run, system_prompt
from micro.agent.record import STATUSES, WAITING, AgentRun, AgentRuns
from micro.agent.tools import REQUEST_INPUT, Toolset, request_input_tool, tool_name
from micro.ai import Message, Model, from_provider
from micro.broker import Message as BrokerMessage
from micro.errors import (
    BadRequest,
    Cancelled,
    Error,
    Internal,
    NotFound,
    ResourceExhausted,
    ServiceNotFound,
    Timeout,
    Unavailable,
    Unknown,
    UsageError,
)
from micro.service import Service, ServiceOptions

from .record import FlowRun, RunStore, ToolCallResult, now
from .template import TemplateError, render

log = logging.getLogger("micro.flow")

Step = Callable[[dict[str, Any], FlowRun], Awaitable[Any] | Any]

_current_run: contextvars.ContextVar[tuple[FlowRun, RunStore] | None] = contextvars.ContextVar(
    "micro_flow_run", default=None)
_decode_any = msgspec.json.Decoder().decode


TRANSIENT: tuple[type[Error], ...] = (Unavailable, Timeout, ResourceExhausted, Internal, Unknown, Cancelled)
"""Tool errors that end a flow's run so the event is delivered again; other errors go to the model."""


class FlowRetry(Exception):
    """The event should be delivered again (its run did not complete)."""


class StepResultError(TypeError):
    """A step returned a value the run record cannot hold (deterministic: the run fails, not retried)."""


class AgentWaits(Exception):
    """The agent a flow hands its prompt to paused its run for a person (deterministic: the flow run
    fails, and says which agent run waits; the agent's own commands decide that run)."""


class FlowPaused(Exception):
    """The model step waits for a person (its agent run record says for what)."""

    def __init__(self, run: AgentRun) -> None:
        super().__init__(f"run {run.id} waits for {run.waits_for()}")
        self.run = run


class Flow(Service):
    """Event-driven orchestration: every message on ``trigger`` runs one model step.

    Args:
        name: the flow's service name (also its durable consumer and queue group).
        trigger: the topic that starts a run (wildcards allowed).
        prompt: the prompt template, filled from the event (``{field}``, ``{a.b}``, and ``{data}``: the
            whole event as JSON, or the event's own ``data`` field if it has one; see :func:`render`).
        services: the services whose endpoints the model step may use.
        provider / model: as for agents (default ``$MICRO_PROVIDER`` or ``"anthropic"``).
        agent: hand the rendered prompt to this agent's ``Agent.Chat`` instead of a model here.
        steps / after: deterministic ``async def step(event, run) -> result`` before / after
            the model step. Each result (JSON-able data: dict, list, str, number, bool, None or a
            msgspec Struct) is checkpointed in ``run.steps`` under its place and name
            (``before[0]:prepare``, ``after[1]:notify``), so a retried event does not run it again.
        max_concurrency: events handled at once by this process (default 4).
        system: an optional system prompt for the model step.
        needs_approval: tool-name patterns whose calls wait for a person (as for agents); the
            run is then ``paused`` until ``micro agent approve FLOW RUN_ID`` (or ``Flow.resume``).
        builtins: the built-in tools of the model step (default none; ``["request_input"]`` lets
            the model ask a person a question).
        pause_ttl: seconds a run may wait for a person before it expires (default 7 days).

    Example::

        flow = micro.NewFlow("onboard-user", trigger="events.user.created",
                             prompt="New user created: {data}. Send a welcome email.",
                             services=["email"], provider="anthropic")
    """

    def __init__(self, name: str, *, trigger: str, prompt: str = "", services: Sequence[str] = (),
                 provider: str | Model | None = None, model: str | None = None, agent: str | None = None,
                 steps: Sequence[Step] = (), after: Sequence[Step] = (), max_concurrency: int = 4,
                 system: str | None = None, max_steps: int = 10, loop_limit: int = 3,
                 tool_timeout: float | None = 60.0, model_timeout: float | None = 120.0,
                 approve: Approve | None = None, needs_approval: Sequence[str] = (),
                 builtins: Sequence[str] = (), pause_ttl: float = DEFAULT_PAUSE_TTL,
                 metadata: Mapping[str, str] | None = None,
                 **service_options: Unpack[ServiceOptions]) -> None:
        if not trigger:
            raise UsageError(f"flow {name}: give it a trigger topic, e.g. trigger='events.user.created'")
        if not prompt and agent is None and not steps and not after:
            raise UsageError(f"flow {name}: give it a prompt (and services), an agent, or steps")
        if max_concurrency < 1:
            raise UsageError(f"flow {name}: max_concurrency must be at least 1")
        if isinstance(needs_approval, str):
            raise UsageError(f"flow {name}: needs_approval must be a list of tool-name patterns, "
                             f"e.g. [{needs_approval!r}]")
        if isinstance(builtins, str) or set(builtins) - {REQUEST_INPUT}:
            raise UsageError(f"flow {name}: builtins must be a list of built-in tools ({REQUEST_INPUT!r}), "
                             f"not {builtins!r}")
        self.trigger = trigger
        self.prompt = prompt
        self.services = list(services)
        self.agent = agent
        self.system = system
        self.steps = list(steps)
        self.after = list(after)
        self.max_concurrency = max_concurrency
        self.limits = Limits(max_steps, loop_limit, tool_timeout, model_timeout)
        self.approve = approve
        self.needs_approval = tuple(needs_approval)
        self.builtins = tuple(builtins)
        self.pause_ttl = pause_ttl
        self.model: Model | None = None
        if prompt and agent is None:
            import os

            chosen = provider if provider is not None else os.environ.get("MICRO_PROVIDER", "anthropic")
            self.model = from_provider(chosen, model=model)
        meta = {"type": "flow", "trigger": trigger, "services": ",".join(self.services),
                "agent": agent or "", "model": self.model.model if self.model else "", **(metadata or {})}
        super().__init__(name, metadata=meta, **service_options)
        self.handle(_FlowRuns(self), name="Flow")
        if self.model is not None:  # its model step's runs can wait: the agents' commands reach them
            self.handle(_FlowWaits(self), name="Agent")
            self.handle(_FlowWaitsInfo(self), name="AgentInfo")
        self._toolset: _CheckpointedToolset | None = None
        self._runs: RunStore | None = None
        self._model_runs: AgentRuns | None = None
        self._engine: RunEngine | None = None
        self._claimed: dict[str, tuple[Checkpoint, dict[str, Decision]]] = {}
        self.active = 0
        self.peak = 0
        self._inflight: dict[str, anyio.Event] = {}
        for _ in range(max_concurrency):
            # one event at a time per subscription, none held back: a graceful stop gives nothing back to
            # JetStream, where every message given back counts as a delivery towards max_deliver
            self.subscribe(trigger, self._on_event, queue=name, durable=name, prefetch=1)

    @property
    def runs(self) -> RunStore:
        if self._runs is None:
            self._runs = RunStore(self.runtime.store, self.name)
        return self._runs

    @property
    def model_runs(self) -> AgentRuns:
        """The agent run records of the model step (``agent/{flow}/runs/{event id}``)."""
        if self._model_runs is None:
            self._model_runs = AgentRuns(self.runtime.store, self.name)
        return self._model_runs

    @property
    def engine(self) -> RunEngine:
        """The run engine of the model step (the agents')."""
        if self._engine is None:
            self._engine = RunEngine(self.name, self.model_runs, owner=lambda: self.id, nodes=self._nodes,
                                     pause_ttl=self.pause_ttl)
        return self._engine

    async def _nodes(self) -> set[str]:
        try:
            records = await self.runtime.registry.get(self.name)
        except ServiceNotFound:
            return set()
        return {n.id for r in records for n in r.nodes}

    async def stop(self) -> None:
        await super().stop()
        self._toolset = None
        self._runs = None
        self._model_runs = None
        self._engine = None

    async def resume(self, run_id: str, *, approve: Approval = None, answer: Answer = None, reason: str = "",
                     partial: bool = False) -> ChatResponse:
        """Continue a run whose model step waits for a person (as :meth:`micro.Agent.resume`); then its
        ``after`` steps run and the flow run completes. Returns where the model step's run is."""
        engine = self.engine
        record, version = await engine.claimable(run_id)
        decisions = engine.decide(record, approve, answer, reason, partial)
        if len(decisions) < len(record.pending):
            return response_of(await engine.record_decisions(record, version, decisions))
        flow_run = await self.runs.get(run_id)
        if flow_run is None:
            raise NotFound(f"flow {self.name} has no run {run_id!r} (`micro flow runs {self.name}` lists them)")
        version = await engine.claim(record, version, record.status, decisions)
        await self.model_runs.unmark_waiting(record)
        self._claimed[run_id] = (Checkpoint(self.model_runs, record, version), decisions)
        try:
            # nothing delivers it again: this attempt is its last
            await self.run_event(run_id, flow_run.topic, flow_run.event, last_attempt=True)
        except Exception:
            pass  # recorded in the flow run and the model step's run
        finally:
            self._claimed.pop(run_id, None)
        latest = await self.model_runs.get(run_id)
        return response_of(latest or record)

    async def cancel(self, run_id: str, *, reason: str = "") -> ChatResponse:
        """Cancel a run whose model step waits; the flow run is ``cancelled`` too."""
        record = await self.engine.cancel(run_id, reason)
        flow_run = await self.runs.get(run_id)
        if flow_run is not None:
            flow_run.status, flow_run.error_kind, flow_run.error = "cancelled", "cancelled", record.error
            flow_run.finished = now()
            await self.runs.put(flow_run)
        return response_of(record)

    async def _on_event(self, message: BrokerMessage) -> None:
        event = _event_of(message.data)
        await self.run_event(message.id or hashlib.sha1(message.data).hexdigest(), message.topic, event,
                             last_attempt=message.last_attempt)

    async def run_event(self, run_id: str, topic: str, event: Any, *, replay_of: str = "",
                        last_attempt: bool = False) -> FlowRun:
        """Run (or resume, or skip) the event with this id; returns its record.

        A failure is recorded as ``retrying`` and raised (the caller delivers the event again),
        or as ``failed`` when ``last_attempt``; a cancellation is recorded as ``cancelled`` and
        re-raised; a deterministic failure (template, step result) is ``failed`` and returned.
        """
        runs = self.runs
        busy = self._inflight.get(run_id)
        if busy is not None:
            # a redelivery while the first delivery still runs here (e.g. ack_wait ran out under load):
            # let the first one finish and record; this one is then a duplicate
            await busy.wait()
            done = await runs.get(run_id)
            if done is not None and done.status == "completed":
                return done
            raise FlowRetry(f"flow {self.name}: event {run_id} did not complete; retrying")
        self._inflight[run_id] = anyio.Event()
        try:
            with telemetry.span(f"flow {self.name}", "internal", {"micro.flow": self.name, "micro.run_id": run_id,
                                                                  "messaging.destination.name": topic}):
                return await self._run_event(runs, run_id, topic, event, replay_of, last_attempt)
        finally:
            self._inflight.pop(run_id).set()

    async def _run_event(self, runs: RunStore, run_id: str, topic: str, event: Any, replay_of: str,
                         last_attempt: bool) -> FlowRun:
        run = await runs.get(run_id)
        if run is not None and run.status == "completed":
            log.info("flow %s: event %s already completed; skipping", self.name, run_id)
            return run
        if run is not None and run.status in WAITING and run_id not in self._claimed:
            log.info("flow %s: event %s waits for a person; skipping", self.name, run_id)
            return run
        if run is None:
            run = FlowRun(id=run_id, flow=self.name, topic=topic, event=event, started=now(), replay_of=replay_of)
        run.attempts += 1
        run.status = "running"
        run.error = run.error_kind = ""
        await runs.put(run)
        self.active += 1
        self.peak = max(self.peak, self.active)
        token = _current_run.set((run, runs))
        try:
            await self._pipeline(run, event if isinstance(event, dict) else {"data": event})
        except FlowPaused as paused:
            run.status = paused.run.status  # type: ignore[assignment]
            await runs.put(run)  # recorded: now the event may be acknowledged
            return run
        except (TemplateError, StepResultError, AgentWaits) as exc:
            run.status, run.error = "failed", str(exc)
            run.error_kind = ("template" if isinstance(exc, TemplateError)
                              else "agent_waits" if isinstance(exc, AgentWaits) else "step_result")
            await runs.put(run)  # a deterministic failure: recorded, acknowledged, not retried
            log.warning("flow %s: event %s: %s", self.name, run_id, exc)
            return run
        except anyio.get_cancelled_exc_class():
            run.status, run.error_kind = "cancelled", "cancelled"
            run.error = ("the run was cancelled before it completed (the process stopped, or a replay's "
                         "deadline ran out); a durable broker delivers the event again, or replay it with "
                         f"`micro flow replay {run_id}`")
            with anyio.CancelScope(shield=True):
                await runs.put(run)
            raise
        except Exception as exc:
            # the broker retries with backoff; after its last attempt the event goes to its dead-letter topic
            run.status = "failed" if last_attempt else "retrying"
            if isinstance(exc, EndRun):  # a tool call failed transiently: say which, and with what
                run.error, run.error_kind = str(exc), type(exc.error).__name__
            else:
                run.error, run.error_kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
            await runs.put(run)
            raise
        finally:
            _current_run.reset(token)
            self.active -= 1
        run.status, run.finished = "completed", now()
        await runs.put(run)
        return run

    async def _pipeline(self, run: FlowRun, event: dict[str, Any]) -> None:
        for i, step in enumerate(self.steps):
            await self._step(run, f"before[{i}]:{_step_name(step)}", step, event)
        if self.prompt or self.agent:
            run.prompt = render(self.prompt, event) if self.prompt else msgspec.json.encode(event).decode()
            if self.agent is not None:
                run.reply = await self._delegate(run)
            else:
                run.reply = await self._model_step(run)
        for i, step in enumerate(self.after):
            await self._step(run, f"after[{i}]:{_step_name(step)}", step, event)

    async def _step(self, run: FlowRun, key: str, step: Step, event: dict[str, Any]) -> None:
        if key in run.steps:
            return  # done in an earlier attempt
        result = step(event, run)
        if inspect.isawaitable(result):
            result = await result
        try:
            run.steps[key] = msgspec.to_builtins(result)
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            raise StepResultError(
                f"step {key} returned a {type(result).__name__} the run record cannot "
                f"hold ({exc}); a step must return JSON-able data (dict, list, str, number, bool, None or "
                "a msgspec Struct)") from None
        await self.runs.put(run)

    async def _delegate(self, run: FlowRun) -> str:
        if _AGENT_STEP in run.steps:
            return str(run.steps[_AGENT_STEP])
        rsp = await self.client.call(self.agent, "Agent.Chat", {"message": run.prompt, "parent_id": run.id},
                                     metadata={"idempotency-key": f"{run.id}:agent"})
        status, agent_run = rsp.get("status") or "completed", rsp.get("run_id", "")
        if status != "completed":
            # a flow waits through its own model step (needs_approval=), not through another agent's run
            raise AgentWaits(
                f"flow {self.name}: agent {self.agent} {status} its run {agent_run} (waiting for a person); the "
                f"flow run cannot continue from it. Decide it with `micro agent pending {self.agent}`, or give "
                "the flow its own prompt and needs_approval= so that it waits itself")
        reply = str(rsp.get("reply", ""))
        run.steps[_AGENT_STEP] = reply
        await self.runs.put(run)
        return reply

    async def _model_step(self, run: FlowRun) -> str:
        assert self.model is not None
        if self._toolset is None:
            functions = {REQUEST_INPUT: request_input_tool()} if REQUEST_INPUT in self.builtins else {}
            self._toolset = _CheckpointedToolset(self.client, self.services, functions)
        # the tools enforce tool_timeout as their call's deadline, so a timeout is a Timeout they can end
        # the run with (a transient failure), not an is_error result the loop makes up
        self._toolset.timeout = self.limits.tool_timeout
        limits = dataclasses.replace(self.limits, tool_timeout=None)
        claimed = self._claimed.get(run.id)
        if claimed is not None:  # resumed by a person's decision
            checkpoint, decisions = claimed
        else:
            found = await self.model_runs.load(run.id)
            if found is not None and found[0].status == "completed":
                return found[0].reply  # done in an earlier attempt
            if found is not None and found[0].status in WAITING:
                raise FlowPaused(found[0])
            # a new model step, or one an earlier attempt left failed or unfinished: it starts again (its
            # completed tool calls are answered from the flow run's checkpoint, in-flight ones keyed alike)
            record = AgentRun(run.id, self.name, run.prompt, status="running", model=self.model.model,
                              started=now(), messages=[Message.user(run.prompt)], key=run.id, owner=self.id)
            checkpoint = Checkpoint(self.model_runs, record, found[1] if found is not None else 0)
            await checkpoint.save()
            decisions = {}
        loop = Run(self.model, system_prompt(self.system), self._toolset.tools, limits, self.approve,
                   needs_approval=self.needs_approval, checkpoint=checkpoint.save, decisions=decisions)
        restore(checkpoint.record, loop)
        checkpoint.run = loop
        try:
            reply = await loop.drive([])
        except BaseException as exc:
            await self.engine.fail(checkpoint, exc)
            raise
        if loop.pending:
            await self.engine.park(checkpoint)
            raise FlowPaused(checkpoint.record)
        await self.engine.finish(checkpoint, reply)
        return reply


_AGENT_STEP = "agent"
"""The checkpoint of the delegated agent's reply (step keys start with ``before[`` or ``after[``)."""


def _step_name(step: Step) -> str:
    """A name for a step that is the same in every process: its function's name."""
    fn: Any = step
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


class _CheckpointedToolset(Toolset):
    """Tools whose results are recorded in the current run and reused when it is retried.

    A call that fails with a :data:`TRANSIENT` error is recorded and ends the run (:class:`EndRun`),
    so the event is delivered again and the call made again with the same idempotency key; any
    other error is recorded and goes back to the model.
    """

    timeout: float | None = None

    def _caller(self, service: str, endpoint: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
        name = tool_name(service, endpoint)  # as agents and the MCP gateway name it

        async def run(args: dict[str, Any]) -> Any:
            current = _current_run.get()
            if current is None:
                return await self.client.call(service, endpoint, args, timeout=self.timeout)
            flow_run, runs = current
            key = idempotency.derived_key(flow_run.id, service, endpoint, args)
            done = flow_run.tool_result(key)
            if done is not None:
                return _decode_any(done.result) if done.result[:1] in "{[" else done.result
            t0 = time.perf_counter()
            try:
                value = await self.client.call(service, endpoint, args, metadata={"idempotency-key": key},
                                               timeout=self.timeout)
            except Error as exc:
                flow_run.tool_calls.append(ToolCallResult(
                    key, name, args, f"{type(exc).__name__}: {exc.message}", is_error=True,
                    seconds=time.perf_counter() - t0))
                await runs.put(flow_run)
                if isinstance(exc, TRANSIENT):
                    raise EndRun(name, exc) from exc
                raise
            flow_run.tool_calls.append(ToolCallResult(
                key, name, args, msgspec.json.encode(value).decode(), seconds=time.perf_counter() - t0))
            await runs.put(flow_run)
            return value

        return run


def _event_of(data: bytes) -> Any:
    try:
        return _decode_any(data)
    except msgspec.DecodeError:
        return {"data": data.decode("utf-8", "replace")}


class RunsRequest(msgspec.Struct):
    limit: int = 20


class RunRequest(msgspec.Struct):
    id: str


class RunsResponse(msgspec.Struct):
    runs: list[FlowRun]


class RunResponse(msgspec.Struct):
    run: FlowRun | None = None


class _FlowRuns:
    """The ``Flow`` handler: a flow's run history, over RPC."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    async def Runs(self, req: RunsRequest) -> RunsResponse:
        """The flow's most recent runs, newest first."""
        return RunsResponse(runs=await self._flow.runs.list(req.limit))

    async def Show(self, req: RunRequest) -> RunResponse:
        """One run by id (the event id)."""
        return RunResponse(run=await self._flow.runs.get(req.id))

    async def Replay(self, req: RunRequest) -> RunResponse:
        """Run a recorded event again, as a new run ``{id}-replay-{n}``; not while it still runs."""
        from micro.errors import NotFound

        old = await self._flow.runs.get(req.id)
        if old is None:
            raise NotFound(f"flow {self._flow.name} has no run {req.id!r}")
        if old.status in ("running", "retrying", "paused", "input_required"):
            # a replay now would repeat the side effects the run is making (or will make when redelivered)
            raise BadRequest(
                f"flow {self._flow.name}: run {req.id!r} is {old.status}; replaying it now would run its "
                f"steps and tool calls twice. Wait until it is completed or failed (`micro flow show {req.id}`), "
                "then replay it")
        n = 1
        while await self._flow.runs.get(f"{req.id}-replay-{n}") is not None:
            n += 1
        try:
            # nothing delivers a replay again: its first failure is its last
            return RunResponse(run=await self._flow.run_event(f"{req.id}-replay-{n}", old.topic, old.event,
                                                              replay_of=req.id, last_attempt=True))
        except Exception:  # recorded in the replay's run record
            return RunResponse(run=await self._flow.runs.get(f"{req.id}-replay-{n}"))




class _FlowWaits:
    """The ``Agent`` handler of a flow: its model step's waiting runs, decided as an agent's are."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    async def Resume(self, req: ResumeRequest) -> ChatResponse:
        """Continue a run whose model step waits for a person: decisions on its pending calls, or the answer."""
        approve, answer = request_decisions(self._flow.name, req)
        return await self._flow.resume(req.run_id, approve=approve, answer=answer, reason=req.reason,
                                       partial=req.partial)

    async def Cancel(self, req: CancelRequest) -> ChatResponse:
        """Cancel a run whose model step waits; its pending calls are refused and the flow run is cancelled."""
        return await self._flow.cancel(req.run_id, reason=req.reason)


class _FlowWaitsInfo:
    """The ``AgentInfo`` handler of a flow: its model step's runs (``micro agent pending|runs FLOW``)."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    async def Pending(self, req: _agent_api.PendingRequest) -> _agent_api.RunsResponse:
        """The runs whose model step waits for a person, oldest first."""
        return _agent_api.RunsResponse(runs=await self._flow.engine.pending())

    async def Runs(self, req: _agent_api.RunsRequest) -> _agent_api.RunsResponse:
        """The model step's most recent runs, newest first (optionally with some statuses)."""
        if req.status is not None and set(req.status) - set(STATUSES):
            raise BadRequest(f"flow {self._flow.name}: the run statuses are {', '.join(STATUSES)}")
        engine = self._flow.engine
        owners = await engine.owners()
        return _agent_api.RunsResponse(runs=await self._flow.model_runs.list(
            req.limit, status=req.status, effective=lambda r: engine.effective(r, owners)))
