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
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Unpack, cast, overload

import anyio
import msgspec

from micro import idempotency, metrics, telemetry
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
from micro.agent.record import STATUSES, WAITING, AgentRun, AgentRuns, PendingCall, new_run_id
from micro.agent.tools import REQUEST_INPUT, Toolset, request_input_tool, tool_name
from micro.ai import Message, Model, from_provider
from micro.broker import CONSUMER_HEADER, ERROR_HEADER, PUBLISHED_HEADER, TOPIC_HEADER, Subscription
from micro.broker import Message as BrokerMessage
from micro.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    Error,
    Internal,
    NotFound,
    ResourceExhausted,
    Timeout,
    Unavailable,
    Unknown,
    UsageError,
    VersionConflict,
)
from micro.service import Service, ServiceOptions
from micro.store import Record
from micro.tasks import BackgroundTasks

from .record import STATUSES as RUN_STATUSES
from .record import WAITS as WAIT_STATUSES
from .record import FlowRun, RunStore, StepInfo, ToolCallResult, Waiting, now
from .schedule import Schedule, tick_id
from .steps import LLM, Await, Call, Dispatch, Fn, Loop, State, Verify, as_steps, check_steps, is_stepped
from .steps import Step as StepKind
from .template import TemplateError, render

DEAD_LETTERS = "dead-letters"
"""The flow's consumer of its trigger's dead letters is ``<flow>-dead-letters-<8 hex>`` (an Await step on a topic
may not be named ``dead-letters`` or ``dead-letters-…``: its consumer is ``<flow>-<step>``)."""

log = logging.getLogger("micro.flow")

Step = Callable[[dict[str, Any], FlowRun], Awaitable[Any] | Any]
FlowStep = Step | StepKind | Callable[[State], Awaitable[Any] | Any]
"""What ``steps=`` takes: ``(event, run)`` functions around a model step, or a stepped flow's steps
(:mod:`micro.flow.steps`) and ``(state)`` functions."""

_current_run: contextvars.ContextVar[tuple[FlowRun, RunStore] | None] = contextvars.ContextVar(
    "micro_flow_run", default=None)
_key_base: contextvars.ContextVar[str | None] = contextvars.ContextVar("micro_flow_key_base", default=None)
_decode_any = msgspec.json.Decoder().decode
_NO_INPUT: Any = object()


TRANSIENT: tuple[type[Error], ...] = (Unavailable, Timeout, ResourceExhausted, Internal, Unknown, Cancelled)
"""Tool errors that end a flow's run so the event is delivered again; other errors go to the model."""


class FlowRetry(Exception):
    """The event should be delivered again (its run did not complete)."""


class StepResultError(TypeError):
    """A step returned a value the run record cannot hold (deterministic: the run fails, not retried)."""


class AgentWaits(Exception):
    """The agent a flow hands its prompt to paused its run for a person (deterministic: the flow run
    fails, and says which agent run waits; the agent's own commands decide that run)."""


class StepFailed(Exception):
    """A step failed deterministically (a service refused its call, a Verify ran out of attempts, an Await
    timed out…): the run is ``failed`` with the step named, not retried."""


class FlowWaiting(Exception):
    """An ``Await`` step suspended the run (its record says for what)."""


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
        schedule / every: run the flow on a schedule too: a cron expression (UTC; ``"0 2 * * *"``)
            or a period (``"15m"``); exactly one replica fires each tick (see :mod:`micro.flow.schedule`).
            A scheduled flow needs no ``trigger``.
        catch_up: ``"one"`` (default): after downtime, fire the most recent missed tick once at start;
            ``"none"``: wait for the next tick.

    A **stepped flow** gives ``steps`` as step kinds (:mod:`micro.flow.steps`: ``Call``, ``LLM``,
    ``Dispatch``, ``Await``, ``Loop``, ``Verify``, and plain functions ``(state) -> output``) instead of
    a prompt: each step's output is checkpointed in ``run.steps`` under its name before the next
    starts, so a redelivered, resumed or replayed run continues at its first unfinished step. An
    ``Await`` records the run as ``waiting`` on the agents' run engine and acknowledges the event;
    :meth:`resume` (``Flow.Resume``, ``micro flow resume``) continues it, with exactly one winner.

    Example::

        flow = micro.NewFlow("onboard-user", trigger="events.user.created",
                             prompt="New user created: {data}. Send a welcome email.",
                             services=["email"], provider="anthropic")
    """

    def __init__(self, name: str, *, trigger: str = "", prompt: str = "", services: Sequence[str] = (),
                 provider: str | Model | None = None, model: str | None = None, agent: str | None = None,
                 steps: Sequence[FlowStep] = (), after: Sequence[Step] = (), max_concurrency: int = 4,
                 system: str | None = None, max_steps: int = 10, loop_limit: int = 3,
                 tool_timeout: float | None = 60.0, model_timeout: float | None = 120.0,
                 approve: Approve | None = None, needs_approval: Sequence[str] = (),
                 builtins: Sequence[str] = (), pause_ttl: float = DEFAULT_PAUSE_TTL,
                 schedule: str | None = None, every: str | float | None = None, catch_up: str = "one",
                 metadata: Mapping[str, str] | None = None,
                 **service_options: Unpack[ServiceOptions]) -> None:
        self.schedule = (Schedule(name, cron=schedule, every=every, catch_up=catch_up)
                         if schedule is not None or every is not None else None)
        if not trigger and self.schedule is None:
            raise UsageError(f"flow {name}: give it a trigger topic, e.g. trigger='events.user.created', "
                             "or a schedule (schedule='0 2 * * *' or every='15m')")
        # a scheduled flow of plain functions is stepped too: there is no event for (event, run) functions
        self.stepped = is_stepped(steps) or (self.schedule is not None and not prompt and agent is None
                                             and not after and bool(steps))
        self.plan: list[StepKind] = []
        if self.stepped:
            if prompt or agent is not None or after:
                raise UsageError(f"flow {name}: a flow with step kinds takes all its work as steps: put the prompt "
                                 "in an LLM step, the agent in a Dispatch step, and the after functions at the end "
                                 "of steps")
            if approve is not None or needs_approval or builtins:
                raise UsageError(f"flow {name}: in a flow with step kinds, wait for a person with an Await step "
                                 "(approve=, needs_approval= and builtins= are for the single model step)")
            self.plan = as_steps(steps)
            check_steps(name, self.plan)
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
        self.steps: list[Step] = [] if self.stepped else [cast(Step, s) for s in steps]
        self.after = list(after)
        self.max_concurrency = max_concurrency
        self.limits = Limits(max_steps, loop_limit, tool_timeout, model_timeout)
        self.approve = approve
        self.needs_approval = tuple(needs_approval)
        self.builtins = tuple(builtins)
        self.pause_ttl = pause_ttl
        self.model: Model | None = None
        if (prompt and agent is None) or (self.stepped and _any(self.plan, lambda s: s.needs_model())):
            import os

            chosen = provider if provider is not None else os.environ.get("MICRO_PROVIDER", "anthropic")
            self.model = from_provider(chosen, model=model)
        meta = {"type": "flow", "trigger": trigger, "services": ",".join(self.services),
                "agent": agent or "", "model": self.model.model if self.model else "",
                "schedule": schedule or "", "every": f"{self.schedule.every:g}" if self.schedule and
                self.schedule.every else "", "steps": ",".join(s.name for s in self.plan), **(metadata or {})}
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
        self._toolsets: dict[tuple[str, ...], _CheckpointedToolset] = {}
        self._controls: dict[str, tuple[AgentRun, int]] = {}
        self._background: BackgroundTasks | None = None
        self._dead_letters: Subscription | None = None  # the trigger's dead-letter topic (durable brokers)
        self.wait_check_interval = 5.0
        """Seconds between looks for ``Await`` steps whose timeout passed (when the flow has such steps)."""
        self.active = 0
        self.peak = 0
        self._inflight: dict[str, anyio.Event] = {}
        for _ in range(max_concurrency if trigger else 0):
            # one event at a time per subscription, none held back: a graceful stop gives nothing back to
            # JetStream, where every message given back counts as a delivery towards max_deliver
            self.subscribe(trigger, self._on_event, queue=name, durable=name, prefetch=1)
        for step in _walk(self.plan):
            if isinstance(step, Await) and step.topic is not None:
                if step.name == DEAD_LETTERS or step.name.startswith(f"{DEAD_LETTERS}-"):  # the dead-letter one's
                    raise UsageError(
                        f"flow {name}: step {step.name}: an Await step on a topic cannot be named "
                        f"{DEAD_LETTERS!r} or {DEAD_LETTERS}-…: its durable consumer would be {name}-{step.name}, "
                        f"like the flow's consumer of its trigger's dead letters ({name}-{DEAD_LETTERS}-<8 hex>); "
                        "give the step another name")
                self.subscribe(step.topic, self._await_subscriber(step), queue=f"{name}-{step.name}",
                               durable=f"{name}-{step.name}", prefetch=1)

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
            self._engine = RunEngine(self.name, self.model_runs, owner=lambda: self.id, nodes=self.node_ids,
                                     pause_ttl=self.pause_ttl)
        return self._engine

    async def start(self) -> None:
        """Start the service, and the schedule and the Await timeouts' watch when the flow has them; with
        metrics on, report its waiting runs."""
        await super().start()
        dead_letters = self.runtime.broker.dead_letter_topic(self.trigger) if self.trigger else None
        if dead_letters is not None:
            # the events the broker dead-letters without handing them here again (earlier attempts died
            # unsettled: a crash, an OOM, a hang past ack_wait): their runs say so, and can be replayed
            # named by the trigger too: the dead-letter stream outlives a trigger's, and a durable consumer
            # is bound to one topic (a flow whose trigger changed would not start under the old name)
            consumer = f"{self.name}-{DEAD_LETTERS}-{hashlib.sha256(dead_letters.encode()).hexdigest()[:8]}"
            try:
                self._dead_letters = await self.runtime.broker.subscribe(
                    dead_letters, self._on_dead_letter, queue=consumer, durable=consumer, prefetch=1)
            except BaseException:
                await super().stop()
                raise
        timeouts = any(isinstance(s, Await) and s.timeout is not None for s in _walk(self.plan))
        if self.schedule is None and not timeouts and not metrics.enabled():
            return
        background = BackgroundTasks(f"flow {self.name}", log)
        try:
            tg = await background.start()
            if self.schedule is not None:
                tg.start_soon(self._schedule_loop, self.schedule)
            if timeouts:
                tg.start_soon(self._timeout_loop)
            if metrics.enabled():
                tg.start_soon(self.engine.report_waiting)
        except BaseException:
            await background.aclose()
            await self._stop_dead_letters()
            await super().stop()
            raise
        self._background = background

    async def _stop_dead_letters(self) -> None:
        sub, self._dead_letters = self._dead_letters, None
        if sub is not None:
            await sub.unsubscribe()

    async def stop(self) -> None:
        background, self._background = self._background, None
        if background is not None:
            await background.aclose()
        await self._stop_dead_letters()
        await super().stop()
        self._toolset = None
        self._toolsets = {}
        self._runs = None
        self._model_runs = None
        self._engine = None

    @overload
    async def resume(self, run_id: str, input: Any) -> FlowRun: ...

    @overload
    async def resume(self, run_id: str, *, approve: Approval = None, answer: Answer = None, reason: str = "",
                     partial: bool = False, pause: str = "") -> ChatResponse: ...

    async def resume(self, run_id: str, input: Any = _NO_INPUT, *, approve: Approval = None,
                     answer: Answer = None, reason: str = "", partial: bool = False,
                     pause: str = "") -> FlowRun | ChatResponse:
        """Continue a waiting run.

        ``resume(run_id, input)``: a stepped flow's run waiting at an ``Await`` step; ``input`` (checked
        against the step's ``schema``) becomes the step's output and the run goes on here, to its end or
        its next ``Await``. Returns the flow run. ``BadRequest`` for input that does not fit (the run
        still waits), ``Conflict`` for a run that is not waiting (or that another resumer took first),
        ``NotFound`` for an unknown run.

        ``resume(run_id, approve=… | answer=…)``: a run whose model step waits for a person (as
        :meth:`micro.Agent.resume`); then its ``after`` steps run and the flow run completes. Returns
        where the model step's run is; ``pause`` as :meth:`micro.Agent.resume`'s.
        """
        if input is not _NO_INPUT:
            return await self._resume_await(run_id, input)
        engine = self.engine
        record, version = await engine.claimable(run_id)
        decisions = engine.decide(record, approve, answer, reason, partial, pause)
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

    # -- direct runs, waits, timeouts and schedules (stepped flows) ---------------------------------------

    @overload
    def run(self) -> None: ...

    @overload
    def run(self, data: Any) -> Coroutine[Any, Any, FlowRun]: ...

    def run(self, data: Any = _NO_INPUT) -> Coroutine[Any, Any, FlowRun] | None:
        """``await flow.run(data)``: run the flow now on ``data`` (as if it were an event), with the same
        records and durability; returns the run (``completed``, ``waiting`` or ``failed`` with its error).

        ``flow.run()`` without data runs the flow's service as a program (as :meth:`Service.run`).
        """
        if data is _NO_INPUT:
            super().run()
            return None
        return self._run_now(new_run_id(), "direct", data)

    async def _run_now(self, run_id: str, topic: str, data: Any) -> FlowRun:
        try:
            return await self.run_event(run_id, topic, data, last_attempt=True)
        except Exception:
            found = await self.runs.get(run_id)
            if found is None:
                raise
            return found  # its record says how it failed

    def _await_at(self, path: str) -> Await:
        """The ``Await`` step a run waits at, from its path (``refine[2].approve``)."""
        steps: Sequence[StepKind] = self.plan
        found: StepKind | None = None
        for part in path.split("."):
            base = part.split("[")[0]
            if base == "on_timeout" and isinstance(found, Await):
                steps = found.on_timeout
                continue
            found = next((s for s in steps if s.name == base), None)
            if found is None:
                break
            bodies = found.bodies()
            steps = bodies[0][1] if bodies else []
        if not isinstance(found, Await):
            raise Conflict(f"flow {self.name}: the run waits at step {path!r}, which this version of the flow does "
                           "not have as an Await; deploy the flow that started it to continue it")
        return found

    async def _waiting_run(self, run_id: str) -> tuple[FlowRun, Waiting, AgentRun, int]:
        found = await self.model_runs.load(run_id)
        flow_run = await self.runs.get(run_id)
        if flow_run is None:
            raise NotFound(f"flow {self.name} has no run {run_id!r} (`micro flow runs {self.name}` lists them)")
        if found is None or found[0].status != "waiting" or flow_run.waiting is None:
            raise Conflict(f"flow {self.name}: run {run_id} is {flow_run.status}, not waiting for input; "
                           "nothing was changed")
        return flow_run, flow_run.waiting, found[0], found[1]

    async def _resume_await(self, run_id: str, value: Any) -> FlowRun:
        flow_run, waiting, record, version = await self._waiting_run(run_id)
        step = self._await_at(waiting.step)
        value = step.validate(self.name, run_id, value)  # before anything changes
        if waiting.until and self.engine.clock() >= waiting.until:
            await self._time_out(run_id)
            raise Conflict(f"flow {self.name}: run {run_id} waited at {waiting.step} past its timeout; it took its "
                           f"timeout path instead (`micro flow show {run_id}`); the input was not used")
        version = await self.engine.claim(record, version, "waiting")  # exactly one resumer gets past here
        flow_run.steps[waiting.step] = value
        return await self._continue(flow_run, waiting, record, version)

    async def _continue(self, flow_run: FlowRun, waiting: Waiting, record: AgentRun, version: int) -> FlowRun:
        """Go on with a run this process has claimed (resumed, or timed out)."""
        await self.model_runs.unmark_waiting(record)
        if waiting.topic:
            await self.runtime.store.delete(self._await_key(waiting.name, waiting.value, flow_run.id))
        info = flow_run.trace.get(waiting.step)
        if info is not None and waiting.step in flow_run.steps:
            info.status, info.seconds = "completed", self.engine.clock() - waiting.since
        flow_run.status = "running"
        if waiting.step in flow_run.steps:
            flow_run.waiting = None
        await self.runs.put(flow_run)
        self._controls[flow_run.id] = (record, version)
        try:
            return await self._run_now(flow_run.id, flow_run.topic, flow_run.event)
        finally:
            self._controls.pop(flow_run.id, None)

    async def _time_out(self, run_id: str) -> bool:
        """Take a run whose ``Await`` timed out on its timeout path (``on_timeout`` steps, or failing);
        False if another process took it first."""
        try:
            flow_run, waiting, record, version = await self._waiting_run(run_id)
            version = await self.engine.claim(record, version, "waiting")
        except (Conflict, NotFound):
            return False
        waiting.timed_out = True
        await self._continue(flow_run, waiting, record, version)
        return True

    async def expire_waits(self) -> list[str]:
        """Take every run whose ``Await`` timeout has passed (by the store's clock) on its timeout path;
        the ids of those this process took. The flow calls it every ``wait_check_interval`` seconds."""
        taken = []
        clock = self.engine.clock()
        for run_id in await self.model_runs.waiting():
            record = await self.model_runs.get(run_id)
            if (record is not None and record.status == "waiting" and record.expires and clock >= record.expires
                    and await self._time_out(run_id)):
                taken.append(run_id)
        return taken

    async def _timeout_loop(self) -> None:
        while True:
            await anyio.sleep(self.wait_check_interval)
            try:
                await self.expire_waits()
            except Exception:
                log.exception("flow %s: looking for timed-out waits failed", self.name)

    def _await_key(self, name: str, value: str, run_id: str = "") -> str:
        digest = hashlib.sha256(value.encode()).hexdigest()[:24]
        return f"flow/{self.name}/awaits/{name}/{digest}#{run_id}"

    def _await_subscriber(self, step: Await) -> Callable[[BrokerMessage], Awaitable[None]]:
        async def on_event(message: BrokerMessage) -> None:
            await self._on_await_event(step, message)

        return on_event

    async def _on_await_event(self, step: Await, message: BrokerMessage) -> None:
        event = _event_of(message.data)
        value = event.get(step.match) if isinstance(event, dict) and step.match else None
        if value is None:
            log.warning("flow %s: an event on %s has no field %r to pair it with a run waiting at %s; ignored",
                        self.name, message.topic, step.match, step.name)
            return
        keys = await self.runtime.store.list(self._await_key(step.name, _match_value(value)))
        for key in keys:
            run_id = key.rsplit("#", 1)[1]
            try:
                await self._resume_await(run_id, event)
            except (Conflict, NotFound):
                continue  # resumed by another replica or another event meanwhile
            except BadRequest as exc:
                log.warning("flow %s: an event on %s does not fit %s: %s", self.name, message.topic, step.name, exc)

    async def fire(self, tick: float, *, wait: bool = True) -> bool:
        """Fire the schedule's ``tick`` (unix seconds) if no replica has: a create-if-absent write of the
        tick's key decides. True if this process fired it; with ``wait``, after the run ended (or waits)."""
        assert self.schedule is not None, "fire() is for scheduled flows"
        store = self.runtime.store
        period = self.schedule.next_after(tick) - tick
        try:
            await store.write(Record(f"flow/{self.name}/ticks/{tick_id(tick)}", f"{tick}".encode()),
                              ttl=max(3600.0, 10 * period), if_version=0)
        except VersionConflict:
            return False  # another replica fired it
        await store.write(Record(f"flow/{self.name}/schedule/last", f"{tick}".encode()))
        event = {"tick": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tick)), "scheduled": tick}
        if wait or self._background is None:
            await self._run_now(tick_id(tick), "schedule", event)
        else:
            self._background.start_soon(self._run_now, tick_id(tick), "schedule", event)
        return True

    async def last_tick(self) -> float | None:
        """The last tick any replica fired (None if none has)."""
        from micro.errors import RecordNotFound

        try:
            (rec,) = await self.runtime.store.read(f"flow/{self.name}/schedule/last")
        except RecordNotFound:
            return None
        return float(rec.value)

    async def _schedule_loop(self, schedule: Schedule) -> None:
        start = time.time()
        if schedule.catch_up == "one":
            last = await self.last_tick()
            missed = schedule.latest(start)
            if last is not None and missed > last:
                log.info("flow %s: catching up the tick of %s", self.name, time.ctime(missed))
                await self.fire(missed, wait=False)
        tick = schedule.next_after(start)
        while True:
            await anyio.sleep(max(0.0, tick - time.time()))
            try:
                await self.fire(tick, wait=False)
            except Exception:
                log.exception("flow %s: firing the tick of %s failed", self.name, time.ctime(tick))
            tick = schedule.next_after(max(tick, time.time()))  # fell behind: the next tick to come

    async def _on_event(self, message: BrokerMessage) -> None:
        event = _event_of(message.data)
        # a durable broker's delivery (it can be settled): its last attempt failing dead-letters the event,
        # unless the event is a dead letter itself (a flow on the dead-letter topic: its failures are dropped)
        dead_letter = (message.settlement is not None
                       and self.runtime.broker.dead_letter_topic(message.topic) is not None)
        await self.run_event(message.id or hashlib.sha1(message.data).hexdigest(), message.topic, event,
                             last_attempt=message.last_attempt, dead_letter=dead_letter)

    async def _on_dead_letter(self, message: BrokerMessage) -> None:
        """The broker dead-lettered an event of the trigger: a run it did not record as failed (its attempts
        died unsettled, so the handler was not called again) is now ``failed`` and ``dead_lettered``.

        Only this flow's own dead letters count (``Micro-Consumer`` names the flow: every flow on the trigger
        has its own deliveries, and another flow giving up says nothing of this one's run), and only a run
        recorded ``running`` or ``retrying`` (or not recorded at all): not one being handled in this process, not
        one whose record was written within the broker's ``ack_wait`` (its owner is alive: the broker would
        have redelivered it otherwise), and not one a concurrent write changed meanwhile (a version check)."""
        if message.headers.get(CONSUMER_HEADER) != self.name:
            return  # another subscriber's dead letter (another flow on the same trigger)
        run_id = message.id or hashlib.sha1(message.data).hexdigest()
        if run_id in self._inflight:
            return  # still being handled here: it records its own end
        found = await self.runs.get_versioned(run_id)
        why = message.headers.get(ERROR_HEADER, "") or "its deliveries were used up"
        version = 0  # create only: a record written meanwhile wins
        if found is None:  # its process died before the run's first record
            try:
                started = float(message.headers.get(PUBLISHED_HEADER, ""))
            except ValueError:
                started = now()
            run = FlowRun(id=run_id, flow=self.name, topic=message.headers.get(TOPIC_HEADER, self.trigger),
                          event=_event_of(message.data), started=started)
        else:
            run, version, updated = found
            if run.dead_lettered or run.status not in ("running", "retrying"):
                return  # recorded by its failed last attempt; or done, failed, cancelled or waiting
            ack_wait = float(getattr(self.runtime.broker, "ack_wait", 0.0))
            if now() - updated < ack_wait:
                log.warning("flow %s: event %s was dead-lettered (%s) but its run was recorded %.1f s ago, within "
                            "ack_wait: left to its owner", self.name, run_id, why, now() - updated)
                return
        run.status, run.error_kind, run.dead_lettered, run.finished = "failed", "dead_lettered", True, now()
        run.error = f"the broker dead-lettered the event: {why}"
        try:
            await self.runs.put(run, if_version=version)
        except VersionConflict:
            return  # written meanwhile (by its owner): that record stands
        log.warning("flow %s: event %s was dead-lettered unfinished (%s); replay it with `micro flow replay %s`",
                    self.name, run_id, why, run_id)

    async def run_event(self, run_id: str, topic: str, event: Any, *, replay_of: str = "",
                        last_attempt: bool = False, dead_letter: bool = False) -> FlowRun:
        """Run (or resume, or skip) the event with this id; returns its record.

        A failure is recorded as ``retrying`` and raised (the caller delivers the event again),
        or as ``failed`` when ``last_attempt``; a cancellation is recorded as ``cancelled`` and
        re-raised; a deterministic failure (template, step result) is ``failed`` and returned.
        ``dead_letter``: the caller (a durable broker) dead-letters the event when this attempt raises;
        a failed last attempt is then recorded ``dead_lettered`` (``Flow.Runs`` lists them; ``Flow.Replay``
        runs one again).
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
                run = await self._run_event(runs, run_id, topic, event, replay_of, last_attempt, dead_letter)
            await self._settle(run)
            return run
        except BaseException:
            with anyio.CancelScope(shield=True):
                latest = await runs.get(run_id)
                if latest is not None:
                    await self._settle(latest)
            raise
        finally:
            self._inflight.pop(run_id).set()

    async def _settle(self, run: FlowRun) -> None:
        """A resumed run ended (or waits again): its engine record says so (unless another process took it)."""
        claimed = self._controls.pop(run.id, None)
        if claimed is None or run.status == "waiting":
            return  # not resumed here; or waiting again: the Await rewrote the engine record
        record, version = claimed
        record.status = run.status if run.status in ("completed", "failed", "cancelled") else "failed"
        record.error, record.error_kind, record.pending, record.finished = run.error, run.error_kind, [], now()
        try:
            await self.model_runs.save(record, version)
        except VersionConflict:
            log.warning("flow %s: run %s was taken by another process meanwhile", self.name, run.id)

    async def _run_event(self, runs: RunStore, run_id: str, topic: str, event: Any, replay_of: str,
                         last_attempt: bool, dead_letter: bool = False) -> FlowRun:
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
        except FlowWaiting:
            run.status = "waiting"
            await runs.put(run)  # recorded: now the event may be acknowledged
            return run
        except (TemplateError, StepResultError, StepFailed, AgentWaits) as exc:
            run.status, run.error = "failed", str(exc)
            run.error_kind = ("template" if isinstance(exc, TemplateError) else "step" if isinstance(exc, StepFailed)
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
            run.dead_lettered = last_attempt and dead_letter  # the broker moves it to its dead-letter topic
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
        if self.stepped:
            await self._steps(run, self.plan, {}, "", run.event)
            return
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

    async def _model_step(self, run: FlowRun, *, record_id: str | None = None, prompt: str | None = None,
                          services: Sequence[str] | None = None, system: str | None = None) -> str:
        """The model loop (on the run engine) of the flow's model step, or of an ``LLM`` step (``record_id``,
        ``prompt``, ``services``, ``system`` given: its own agent run record, no waiting for a person)."""
        assert self.model is not None
        if services is None:
            if self._toolset is None:
                functions = {REQUEST_INPUT: request_input_tool()} if REQUEST_INPUT in self.builtins else {}
                self._toolset = _CheckpointedToolset(self.client, self.services, functions)
            toolset = self._toolset
        else:
            toolset = self._toolsets.get(tuple(services)) or _CheckpointedToolset(self.client, list(services), {})
            self._toolsets[tuple(services)] = toolset
        # the tools enforce tool_timeout as their call's deadline, so a timeout is a Timeout they can end
        # the run with (a transient failure), not an is_error result the loop makes up
        toolset.timeout = self.limits.tool_timeout
        limits = dataclasses.replace(self.limits, tool_timeout=None)
        rid = record_id or run.id
        text = prompt if prompt is not None else run.prompt
        claimed = self._claimed.get(run.id) if record_id is None else None
        if claimed is not None:  # resumed by a person's decision
            checkpoint, decisions = claimed
        else:
            found = await self.model_runs.load(rid)
            if found is not None and found[0].status == "completed":
                return found[0].reply  # done in an earlier attempt
            if found is not None and found[0].status in WAITING:
                raise FlowPaused(found[0])
            # a new model step, or one an earlier attempt left failed or unfinished: it starts again (its
            # completed tool calls are answered from the flow run's checkpoint, in-flight ones keyed alike)
            record = AgentRun(rid, self.name, text, status="running", model=self.model.model, started=now(),
                              messages=[Message.user(text)], key=rid, owner=self.id,
                              parent_id=run.id if record_id is not None else "")
            checkpoint = Checkpoint(self.model_runs, record, found[1] if found is not None else 0)
            await checkpoint.save()
            decisions = {}
        loop = Run(self.model, system_prompt(system if record_id is not None else self.system), toolset.tools, limits,
                   self.approve, needs_approval=self.needs_approval, checkpoint=checkpoint.save, decisions=decisions)
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


    # -- stepped flows ------------------------------------------------------------------------------------

    async def _steps(self, run: FlowRun, steps: Sequence[StepKind], scope: dict[str, Any], prefix: str, data: Any,
                     feedback: str | None = None, iteration: int = 0, verifying: bool = False) -> Any:
        """Run ``steps`` in order from the first unfinished one; the last one's output."""
        for step in steps:
            path = prefix + step.name
            if path in run.steps:
                out = run.steps[path]  # done in an earlier attempt, or the input a resume gave it
            else:
                out = await self._do_step(run, step, path, State(run.id, run.event, scope, data, feedback, iteration,
                                                                      verifying))
            scope[step.name] = out
            data = out
        return data

    async def _do_step(self, run: FlowRun, step: StepKind, path: str, state: State) -> Any:
        info = run.trace.get(path)
        if info is None:
            info = run.trace[path] = StepInfo(kind=step.kind, started=now())
        info.status, info.error = "running", ""
        delay = 0.2
        retries = 0
        while True:
            info.attempts += 1
            t0 = time.perf_counter()
            try:
                out = await self._execute(run, step, path, state)
                break
            except FlowWaiting:
                info.status = "waiting"
                raise
            except (TemplateError, StepResultError, StepFailed) as exc:
                info.status, info.error, info.seconds = "failed", str(exc), time.perf_counter() - t0
                raise
            except Error as exc:
                info.seconds = time.perf_counter() - t0
                if not isinstance(exc, TRANSIENT):  # the service refused the request: it would refuse it again
                    info.status = "failed"
                    info.error = f"step {path}: {type(exc).__name__}: {exc.message}"
                    raise StepFailed(info.error) from exc
                if retries < step.retry:
                    retries += 1
                    log.info("flow %s: run %s: step %s failed (%s); retry %d of %d", self.name, run.id, path,
                             type(exc).__name__, retries, step.retry)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                info.status, info.error = "failed", f"step {path}: {type(exc).__name__}: {exc.message}"
                raise EndRun(path, exc) from exc
            except Exception as exc:
                info.status, info.error = "failed", f"step {path}: {type(exc).__name__}: {exc}"
                info.seconds = time.perf_counter() - t0
                raise
        try:
            value = msgspec.to_builtins(out)
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            info.status = "failed"
            info.error = (f"step {path} returned a {type(out).__name__} the run record cannot hold ({exc}); a step "
                          "must return JSON-able data (dict, list, str, number, bool, None or a msgspec Struct)")
            raise StepResultError(info.error) from None
        run.steps[path] = value
        info.status, info.seconds = "completed", time.perf_counter() - t0
        await self.runs.put(run)  # the checkpoint: this step never runs again for this run
        return value

    async def _execute(self, run: FlowRun, step: StepKind, path: str, state: State) -> Any:
        key = f"{run.id}:{path}"
        if isinstance(step, Fn):
            out = step.fn(state)
            return await out if inspect.isawaitable(out) else out
        if isinstance(step, Call):
            req: Any
            if callable(step.request):
                req = step.request(state)
                if inspect.isawaitable(req):
                    req = await req
            elif step.request is None:
                req = state.data
            elif isinstance(step.request, str):
                text = state.render(step.request, f"step {path}: request")
                try:
                    req = _decode_any(text)
                except msgspec.DecodeError:
                    raise TemplateError(f"step {path}: the request template gave {text[:80]!r}, which is not "
                                        "JSON; use a dict template or a function") from None
            else:
                req = state.render_value(step.request, f"step {path}: request")
            return await self.client.call(step.service, step.endpoint, req, metadata={idempotency.KEY: key},
                                          timeout=step.timeout)
        if isinstance(step, Dispatch):
            message = state.render(step.message, f"step {path}: message")
            rsp = await self.client.call(step.agent, "Agent.Chat", {"message": message, "parent_id": run.id},
                                         metadata={idempotency.KEY: key})
            return str(rsp.get("reply", ""))
        if isinstance(step, LLM):
            prompt = state.render(step.prompt, f"step {path}: prompt")
            reply = await self._llm(run, path, prompt, step.services, step.system)
            if step.output is None:
                return reply
            try:
                return msgspec.json.decode(_json_part(reply), type=step.output)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StepFailed(f"step {path}: the model's reply does not fit "
                                 f"{getattr(step.output, '__name__', step.output)}: {exc}; it answered "
                                 f"{reply[:200]!r}") from None
        if isinstance(step, Await):
            return await self._await(run, step, path, state)
        if isinstance(step, Loop):
            return await self._loop(run, step, path, state)
        if isinstance(step, Verify):
            return await self._verify(run, step, path, state)
        raise StepFailed(f"step {path}: unknown step kind {type(step).__name__}")

    async def _llm(self, run: FlowRun, path: str, prompt: str, services: Sequence[str], system: str | None) -> str:
        token = _key_base.set(f"{run.id}:{path}")  # tool calls keyed per (run, step, attempt)
        try:
            return await self._model_step(run, record_id=f"{run.id}.{re.sub(r'[^A-Za-z0-9_-]', '-', path)}",
                                          prompt=prompt, services=services, system=system)
        finally:
            _key_base.reset(token)

    async def _ask(self, run: FlowRun, path: str, question: str) -> bool:
        """A yes/no question to the model (a Loop's ``until``)."""
        reply = await self._llm(run, path, f"{question}\n\nAnswer with one word: yes or no.", (), None)
        return reply.strip().lower().lstrip("*\"' ").startswith("yes")

    async def _loop(self, run: FlowRun, step: Loop, path: str, state: State) -> Any:
        out: Any = state.data
        for i in range(step.max):
            scope = dict(state.steps)
            out = await self._steps(run, step.body, scope, f"{path}[{i}].", out, iteration=i)
            if step.until is None:
                continue
            check_key = f"{path}[{i}]:until"
            if check_key in run.steps:
                stop = bool(run.steps[check_key])
            else:
                inner = State(run.id, run.event, scope, out, iteration=i)
                if isinstance(step.until, str):
                    stop = await self._ask(run, check_key, inner.render(step.until, f"step {path}: until"))
                else:
                    verdict = step.until(inner)
                    stop = bool(await verdict if inspect.isawaitable(verdict) else verdict)
                run.steps[check_key] = stop
                await self.runs.put(run)
            if stop:
                return out
        if step.until is not None:
            raise StepFailed(f"step {path}: the loop ran its max={step.max} iterations and its until condition never "
                             "held; raise max, or check the body")
        return out

    async def _verify(self, run: FlowRun, step: Verify, path: str, state: State) -> Any:
        feedback: str | None = None
        for i in range(step.attempts):
            scope = dict(state.steps)
            out = await self._steps(run, step.body, scope, f"{path}[{i}].", state.data, feedback, i, verifying=True)
            check_key = f"{path}[{i}]:check"
            if check_key in run.steps:
                verdict = run.steps[check_key]
            else:
                inner = State(run.id, run.event, scope, out, feedback, i, verifying=True)
                ok, fb = await self._grade(run, step, check_key, inner)
                verdict = run.steps[check_key] = {"ok": ok, "feedback": fb}
                await self.runs.put(run)
            if verdict["ok"]:
                return out
            feedback = verdict["feedback"] or f"attempt {i + 1} did not pass the check"
        raise StepFailed(f"step {path}: no attempt passed the check in {step.attempts} attempts; the last feedback: "
                         f"{feedback}")

    async def _grade(self, run: FlowRun, step: Verify, key: str, state: State) -> tuple[bool, str]:
        if isinstance(step.check, str):
            shown = state.data if isinstance(state.data, str) else msgspec.json.encode(state.data).decode()
            instructions = state.render(step.check, f"step {step.name}: check")
            reply = await self._llm(run, key, f"{instructions}\n\nThe output to grade:\n{shown}\n\nAnswer only "
                                    'with JSON: {"ok": true or false, "feedback": "what to change"}', (), None)
            try:
                graded = _decode_any(_json_part(reply))
                return bool(graded["ok"]), str(graded.get("feedback", ""))
            except (msgspec.DecodeError, KeyError, TypeError):
                return False, reply
        verdict = step.check(state)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if isinstance(verdict, bool):
            return verdict, ""
        if isinstance(verdict, tuple) and len(verdict) == 2 and isinstance(verdict[0], bool):
            return verdict[0], str(verdict[1] or "")
        raise StepFailed(f"step {step.name}: check returned {verdict!r}; it must return a bool or (bool, feedback)")

    async def _await(self, run: FlowRun, step: Await, path: str, state: State) -> Any:
        waiting = run.waiting
        if waiting is not None and waiting.step == path and waiting.timed_out:
            if not step.on_timeout:
                raise StepFailed(f"step {path}: nobody gave it input within its timeout of {step.timeout:g}s (waiting "
                                 f"since {time.ctime(waiting.since)}); give the Await on_timeout= steps to go on "
                                 "instead of failing")
            out = await self._steps(run, step.on_timeout, dict(state.steps), f"{path}.on_timeout.", state.data)
            run.waiting = None
            return out
        prompt = state.render(step.prompt, f"step {path}: prompt") if step.prompt else ""
        value = ""
        if step.match is not None:
            found = run.event.get(step.match) if isinstance(run.event, dict) else None
            if found is None:
                raise StepFailed(f"step {path}: the run's event has no field {step.match!r} to pair it with an event "
                                 f"on {step.topic}")
            value = _match_value(found)
        since = self.engine.clock()
        until = since + step.timeout if step.timeout is not None else 0.0
        run.waiting = Waiting(step=path, name=step.name, prompt=prompt, since=since, until=until,
                              topic=step.topic or "", match=step.match or "", value=value,
                              schema=step.input_schema())
        found_rec = await self.model_runs.load(run.id)
        record = found_rec[0] if found_rec is not None else AgentRun(run.id, self.name, prompt, started=now(),
                                                                      key=run.id)
        record.status, record.owner, record.expires, record.message = "waiting", self.id, until, prompt
        record.pending = [PendingCall(path, f"await:{step.name}", {}, kind="question",
                                      question=prompt or f"input for {step.name}")]
        await self.model_runs.mark_waiting(record)  # before the record: a listing checks the record's status
        if step.topic is not None:
            await self.runtime.store.write(Record(self._await_key(step.name, value, run.id), run.id.encode()))
        try:
            await self.model_runs.save(record, found_rec[1] if found_rec is not None else 0)
        except VersionConflict:
            raise Conflict(f"flow {self.name}: run {run.id} was taken by another process while it came to "
                           f"{path}") from None
        await self.runs.put(run)  # waiting is recorded before the event is acknowledged
        log.info("flow %s: run %s waits at %s", self.name, run.id, path,
                 extra={"micro_run_id": run.id, "micro_flow": self.name})
        raise FlowWaiting(path)


def _json_part(text: str) -> str:
    """The JSON in a model's reply (inside a ```json fence, or the reply)."""
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    return (m.group(1) if m else text).strip()


def _match_value(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _walk(steps: Sequence[StepKind]) -> list[StepKind]:
    out: list[StepKind] = []
    for s in steps:
        out.append(s)
        for _, body in s.bodies():
            out.extend(_walk(body))
    return out


def _any(steps: Sequence[StepKind], test: Callable[[StepKind], bool]) -> bool:
    return any(test(s) for s in _walk(steps))


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
            key = idempotency.derived_key(_key_base.get() or flow_run.id, service, endpoint, args)
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
    status: list[str] | None = None
    dead_lettered: bool = False  # only the runs whose event the broker dead-lettered


class StartRequest(msgspec.Struct):
    data: Any = None


class ResumeFlowRequest(msgspec.Struct):
    id: str
    input: Any = None


class RunRequest(msgspec.Struct):
    id: str


class RunsResponse(msgspec.Struct):
    runs: list[FlowRun]


class RunResponse(msgspec.Struct):
    run: FlowRun | None = None
    replays: list[FlowRun] = []  # Flow.Show: the run's replays, in order


class ReplayRequest(msgspec.Struct):
    id: str
    seen: int = -1
    """How many replays of the run the caller saw (a page: those it shows); if there are more now (a stale
    page, a second click) the replay is refused with ``Conflict`` naming the latest. -1: not checked."""


class OverviewRequest(msgspec.Struct):
    limit: int = 20
    status: list[str] | None = None  # the runs list: only these statuses


class OverviewResponse(msgspec.Struct):
    runs: list[FlowRun]  # the newest runs (of ``status``)
    waiting: list[FlowRun]  # those that wait for an event or a person
    dead_lettered: list[FlowRun]  # those whose event the broker dead-lettered
    replays: dict[str, list[FlowRun]]  # run id -> its replays, for every run above


class _FlowRuns:
    """The ``Flow`` handler: a flow's run history, over RPC."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    def _check(self, status: list[str] | None) -> None:
        if status is not None and set(status) - set(RUN_STATUSES):
            raise BadRequest(f"flow {self._flow.name}: unknown status {sorted(set(status) - set(RUN_STATUSES))}; "
                             f"the run statuses are {', '.join(RUN_STATUSES)}")

    async def Runs(self, req: RunsRequest) -> RunsResponse:
        """The flow's most recent runs, newest first (optionally only some statuses, or the dead-lettered ones)."""
        self._check(req.status)
        return RunsResponse(runs=await self._flow.runs.list(req.limit, status=req.status,
                                                            dead_lettered=req.dead_lettered))

    async def Overview(self, req: OverviewRequest) -> OverviewResponse:
        """What the dashboard's flow page shows, from one read of the runs: the newest runs (optionally only some
        statuses), the waiting ones, the dead-lettered ones, and each one's replays."""
        self._check(req.status)
        found = await self._flow.runs.overview(req.limit, req.status, WAIT_STATUSES)
        return OverviewResponse(found.runs, found.waiting, found.dead_lettered, found.replays)

    async def Run(self, req: StartRequest) -> RunResponse:
        """Run the flow now on ``data`` (as if it were an event); the run as it ended (or waits)."""
        return RunResponse(run=await self._flow.run(req.data))

    async def Resume(self, req: ResumeFlowRequest) -> RunResponse:
        """Continue a run waiting at an ``Await`` step with ``input`` (its output); the run as it ended (or waits)."""
        return RunResponse(run=await self._flow.resume(req.id, req.input))

    async def Show(self, req: RunRequest) -> RunResponse:
        """One run by id (the event id), with its replays."""
        run = await self._flow.runs.get(req.id)
        return RunResponse(run=run, replays=await self._flow.runs.replays_of(req.id) if run is not None else [])

    async def Replay(self, req: ReplayRequest) -> RunResponse:
        """Run a recorded event again, as a new run ``{id}-replay-{n}``; not while it still runs. With ``seen``
        (the replays the caller knew of): refused if the run was replayed since (a stale page, a second click)."""
        from micro.errors import Conflict, NotFound

        old = await self._flow.runs.get(req.id)
        if old is None:
            raise NotFound(f"flow {self._flow.name} has no run {req.id!r}")
        if old.status in ("running", "retrying", "paused", "input_required"):
            # a replay now would repeat the side effects the run is making (or will make when redelivered)
            raise BadRequest(
                f"flow {self._flow.name}: run {req.id!r} is {old.status}; replaying it now would run its "
                f"steps and tool calls twice. Wait until it is completed or failed (`micro flow show {req.id}`), "
                "then replay it")
        earlier = await self._flow.runs.replays_of(req.id)
        if 0 <= req.seen < len(earlier):
            last = earlier[-1]
            raise Conflict(f"flow {self._flow.name}: run {req.id!r} was replayed since you looked: {last.id} is "
                           f"{last.status} ({len(earlier)} replays in all); look at it before replaying again "
                           f"(`micro flow show {last.id}`)")
        n = len(earlier) + 1
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
                                       partial=req.partial, pause=req.pause)

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
