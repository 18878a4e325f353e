"""``Agent``: a service whose endpoints are ``Agent.Chat`` and ``Agent.StreamChat``, run by a model.

An agent knows its services; the services do not know their agent. It is a real
service: registered with ``type=agent`` and the services it manages, served on
its own gRPC port (``proto/agent.proto``), callable with ``micro call``, any gRPC
client, or ``await agent.ask(...)`` in process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, Unpack, overload

import anyio
import anyio.abc
import msgspec

from micro import context, idempotency, metrics, telemetry
from micro._proto.micro.agent import (
    CancelRequest,
    ChatEvent,
    ChatRequest,
    ChatResponse,
    ResumeInterruptedRequest,
    ResumeInterruptedResponse,
    ResumeRequest,
    ToolCall,
)
from micro.ai import Message, Model, from_provider
from micro.errors import BadRequest, Conflict, NotFound, Timeout, Unavailable, UsageError, VersionConflict
from micro.resource import redact
from micro.service import AgentServiceOptions, Service
from micro.tasks import BackgroundTasks

from .delegation import DEFAULT_MAX_DEPTH, delegate_tool, describe_remote, is_remote
from .engine import (
    DEFAULT_PAUSE_TTL,
    Answer,
    Approval,
    Checkpoint,
    RunEngine,
    decisions_of,
    request_decisions,
    response_of,
    restore,
)
from .loop import Approve, Decision, Event, Limits, Run, system_prompt
from .memory import Memory, StoreMemory, check_session
from .record import STATUSES, AgentRun, AgentRuns, RunToolCall, check_run_id, new_run_id
from .tools import REQUEST_INPUT, RUN_ID, Tool, Toolset, function_tool, request_input_tool

log = logging.getLogger("micro.agent")

DEFAULT_PROVIDER_ENV = "MICRO_PROVIDER"

_F = TypeVar("_F", bound=Callable[..., Any])


class Agent(Service):
    """An agent: a model that uses its services' endpoints as tools.

    Args:
        name: the agent's service name (``micro call NAME Agent.Chat ...``).
        services: the services whose endpoints become its tools.
        prompt: the system prompt: the agent's domain knowledge.
        provider: ``"anthropic"``, ``"openai"``, ``"scripted"``, ``"name:model"``, or a
            :class:`micro.ai.Model` (default ``$MICRO_PROVIDER`` or ``"anthropic"``). A model
            the agent builds from a name is closed when the agent stops; one passed in is not.
        model: the model id for the provider.
        api_key / base_url: for the provider (default: its environment variables).
        max_steps: model calls that may ask for tools in one run.
        loop_limit: calls of one tool with the same arguments allowed in one run.
        tool_timeout / model_timeout: seconds per tool call / per model call.
        approve: ``approve(tool, args)`` (sync or async), asked before every tool call: ``True`` allows,
            ``False`` / ``(False, reason)`` refuses, ``"ask"`` / ``("ask", reason)`` pauses the run until
            a person decides (:meth:`resume`).
        needs_approval: tool-name patterns (``fnmatch``: ``"ledger_*_Delete*"``) whose calls wait for a
            person's approval: the run pauses (``status="paused"``, ``pending``) and :meth:`resume`
            continues it, in this process or any other sharing the store.
        builtins: the built-in tools to offer (default ``["request_input"]``: the model may ask the
            person a question; the run becomes ``input_required`` until :meth:`resume` answers).
        pause_ttl: seconds a run may wait for a person before it expires (default 7 days).
        resume_interrupted: on start, continue the runs a crash of this agent's process left
            unfinished (see :meth:`resume_interrupted`).
        history_limit: messages of history sent to the model (the window of the default memory).
        memory: the conversation memory (:class:`~micro.agent.memory.Memory`); default
            ``StoreMemory(window=history_limit)``: the runtime's store, compacted past 400
            messages (see :mod:`micro.agent.memory`).
        agents: other agents this one may ask through its built-in ``delegate(agent, message)``
            tool (see :mod:`micro.agent.delegation`): registry names, or ``http(s)://`` URLs of
            remote A2A agents; ``max_delegation_depth`` bounds the chain.
        forward: metadata keys of the incoming call passed on to tool calls and delegations,
            e.g. ``["authorization"]``; nothing else of the caller's metadata is forwarded (and
            none of it to remote A2A agents).
        remote_headers: HTTP headers to send to a remote A2A agent among ``agents``, by its URL
            (``{"https://partner.example.com/agents/billing": {"Authorization": "Bearer …"}}``).
        **service_options: what :class:`micro.Service` takes (``runtime=``, ``address=``, …).

    Example::

        async with micro.NewAgent("task-mgr", services=["task", "project"],
                                  prompt="You manage tasks and projects.") as agent:
            rsp = await agent.ask("What tasks are overdue for Alice?")
            print(rsp.reply)
    """

    def __init__(self, name: str, *, services: Sequence[str] = (), prompt: str = "",
                 provider: str | Model | None = None, model: str | None = None,
                 api_key: str | None = None, base_url: str | None = None,
                 max_steps: int = 10, loop_limit: int = 3, tool_timeout: float | None = 60.0,
                 model_timeout: float | None = 120.0, max_tokens: int | None = None,
                 approve: Approve | None = None, history_limit: int = 50,
                 agents: Sequence[str] = (), max_delegation_depth: int = DEFAULT_MAX_DEPTH,
                 forward: Sequence[str] = (), needs_approval: Sequence[str] = (),
                 builtins: Sequence[str] | None = None, pause_ttl: float = DEFAULT_PAUSE_TTL,
                 resume_interrupted: bool = False, memory: Memory | None = None,
                 remote_headers: Mapping[str, Mapping[str, str]] | None = None,
                 metadata: Mapping[str, str] | None = None,
                 **service_options: Unpack[AgentServiceOptions]) -> None:
        if isinstance(services, str):
            raise UsageError(f"agent {name}: services must be a list of names, e.g. [{services!r}]")
        if isinstance(agents, str):
            raise UsageError(f"agent {name}: agents must be a list of names, e.g. [{agents!r}]")
        if name in agents:
            raise UsageError(f"agent {name}: an agent cannot delegate to itself")
        if isinstance(needs_approval, str):
            raise UsageError(f"agent {name}: needs_approval must be a list of tool-name patterns, "
                             f"e.g. [{needs_approval!r}]")
        chosen = [REQUEST_INPUT] if builtins is None else list(builtins)
        if isinstance(builtins, str) or set(chosen) - {REQUEST_INPUT}:
            raise UsageError(f"agent {name}: builtins must be a list of built-in tools ({REQUEST_INPUT!r}), "
                             f"not {builtins!r}")
        if not pause_ttl > 0:
            raise UsageError(f"agent {name}: pause_ttl must be a positive number of seconds, not {pause_ttl!r}")
        provider = provider if provider is not None else os.environ.get(DEFAULT_PROVIDER_ENV, "anthropic")
        self._provider = (provider, model, api_key, base_url)
        self.model: Model = from_provider(provider, model=model, api_key=api_key, base_url=base_url)
        self.services = list(services)
        self.prompt = prompt
        self.limits = Limits(max_steps, loop_limit, tool_timeout, model_timeout, max_tokens)
        self.approve = approve
        self.history_limit = history_limit
        if memory is not None and not isinstance(memory, Memory):
            raise UsageError(f"agent {name}: memory must implement micro.agent.Memory, not {memory!r}")
        if isinstance(history_limit, bool) or not isinstance(history_limit, int) or history_limit < 1:
            raise UsageError(f"agent {name}: history_limit must be a number of messages >= 1, not {history_limit!r}")
        self.memory: Memory = memory if memory is not None else StoreMemory(history_limit)
        self.functions: dict[str, Tool] = {}
        self.agents = list(agents)
        self.forward = tuple(k.lower() for k in forward)
        self.needs_approval = tuple(needs_approval)
        self.pause_ttl = pause_ttl
        self.recover = resume_interrupted
        if REQUEST_INPUT in chosen:
            self.functions[REQUEST_INPUT] = request_input_tool()
        meta = {
            "type": "agent",
            "services": ",".join(self.services),
            "prompt": prompt.strip().splitlines()[0][:200] if prompt.strip() else "",
            "provider": self.model.name,
            "model": self.model.model,
            **(metadata or {}),
        }
        super().__init__(name, metadata=meta, **service_options)
        self._toolset: Toolset | None = None
        self._history: Memory | None = None
        self._runs: AgentRuns | None = None
        self._engine: RunEngine | None = None
        self._background: BackgroundTasks | None = None
        self._max_depth = max_delegation_depth
        self.remote_headers = {url: dict(h) for url, h in (remote_headers or {}).items()}
        unknown = sorted(set(self.remote_headers) - set(self.agents))
        if unknown:
            raise UsageError(f"agent {name}: remote_headers names {', '.join(unknown)}, which are not among its "
                             "agents")
        if self.agents:
            self.functions["delegate"] = delegate_tool(
                lambda: self.client, name, self.agents, max_depth=max_delegation_depth, forward=self.forward,
                remote_headers=self.remote_headers)
        self.handle(_AgentHandler(self), name="Agent")
        # a keyed Agent.Chat (a flow's delegation, a client's retry) answers a repeat from the store,
        # and the run's own tool calls carry keys derived from it (Toolset)
        idempotency.enable(self, endpoints=["Agent.Chat"])
        self.handle(_AgentInfoHandler(self), name="AgentInfo")

    # -- tools --------------------------------------------------------------------------------

    @overload
    def tool(self, fn: _F, /) -> _F: ...

    @overload
    def tool(self, fn: None = None, /, *, name: str | None = None,
             description: str | None = None) -> Callable[[_F], _F]: ...

    def tool(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             description: str | None = None) -> Any:
        """Register a Python function (sync or async) as a tool; a decorator, with or without arguments.

        Its parameters' annotations are the tool's input schema, its docstring the
        description. A plain function runs in a worker thread.

        Example::

            @agent.tool
            async def convert(amount: float, currency: Literal["EUR", "USD"]) -> float:
                '''Convert an amount into another currency.'''
                return amount * await rate(currency)
        """

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            t = function_tool(f, name=name, description=description)
            self.functions[t.name] = t
            return f

        return register(fn) if fn is not None else register

    @property
    def toolset(self) -> Toolset:
        if self._toolset is None:
            self._toolset = Toolset(self.client, self.services, self.functions, forward=self.forward)
        return self._toolset

    @property
    def history(self) -> Memory:
        """The agent's memory, bound to its store, name, model and task group."""
        if self._history is None:
            self._history = self.memory.bind(self.runtime.store, self.name, self.model, self._task_group)
        return self._history

    async def forget(self, session: str) -> None:
        """Delete everything of ``session`` (``""``: the default conversation): its messages,
        summaries and archives, and its run records.

        Example::

            await agent.forget("alice")
        """
        check_session(session)
        await self.history.forget(session)
        runs = self.runs
        for run in await runs.list(1_000_000_000, session=session):
            await runs.unmark_waiting(run)
            await runs.store.delete(runs.key(run.id))

    @property
    def runs(self) -> AgentRuns:
        """The agent's run records (``agent/{name}/runs/…`` in the runtime's store)."""
        if self._runs is None:
            # the memory's retention covers the run records too: they hold the conversation's messages
            retention = self.memory.retention if isinstance(self.memory, StoreMemory) else None
            self._runs = AgentRuns(self.runtime.store, self.name, retention=retention)
        return self._runs

    @property
    def engine(self) -> RunEngine:
        """The run engine over :attr:`runs` (claims, decisions, expiry, liveness)."""
        if self._engine is None:
            self._engine = RunEngine(self.name, self.runs, owner=lambda: self.id, nodes=self.node_ids,
                                     pause_ttl=self.pause_ttl)
        return self._engine

    async def start(self) -> None:
        """Start serving (see :meth:`Service.start`); with ``resume_interrupted=True``, then continue the
        runs a crash left unfinished, in the background; with metrics on, report its waiting runs."""
        await super().start()
        urls = [a for a in self.agents if is_remote(a)]
        if urls:  # the remote agents' cards tell the model what each does
            described = await describe_remote(urls, headers=self.remote_headers)
            self.functions["delegate"] = delegate_tool(
                lambda: self.client, self.name, self.agents, max_depth=self._max_depth, forward=self.forward,
                remote=described, remote_headers=self.remote_headers)
        if self.recover or metrics.enabled():
            self._background = BackgroundTasks(f"agent {self.name}", log)
            await self._background.start()
            if self.recover:
                self._background.start_soon(self._recover)
            if metrics.enabled():
                self._background.start_soon(self.engine.report_waiting)

    async def _recover(self) -> None:
        try:
            done = await self.resume_interrupted()
        except Exception:
            log.exception("agent %s: resuming interrupted runs failed", self.name)
            return
        if done:
            log.info("agent %s: resumed %d interrupted runs", self.name, len(done))

    async def stop(self) -> None:
        """Stop serving (see :meth:`Service.stop`) and close the model if the agent built it."""
        background, self._background = self._background, None
        if background is not None:
            await background.aclose()
        await super().stop()
        self._toolset = None
        if self._history is not None:
            await self._history.aclose()
        self._history = None
        self._runs = None
        self._engine = None
        provider, model, api_key, base_url = self._provider
        if not isinstance(provider, Model):
            await self.model.aclose()
            # constructing does no I/O: a fresh client, in case the agent is started again
            self.model = from_provider(provider, model=model, api_key=api_key, base_url=base_url)

    # -- asking -------------------------------------------------------------------------------

    async def ask(self, message: str, *, session: str = "", parent_id: str = "",
                  timeout: float | None = None, run_id: str = "") -> ChatResponse:
        """Run the agent on one message and return its reply, tool calls and run id.

        When the run waits for a person, ``status`` is ``"paused"`` (tool calls that need approval)
        or ``"input_required"`` (the model asked a question) and ``pending`` lists them; continue
        it with :meth:`resume`. A session with a waiting run refuses new messages (``BadRequest``).

        ``run_id`` names the new run (:func:`micro.agent.record.new_run_id`'s form; the A2A
        gateway's task ids are run ids): its record is written at once, so the run is visible
        as ``running`` from the start, and only if no run has that id (else ``Conflict``).

        Example::

            rsp = await agent.ask("What tasks are overdue for Alice?")
            print(rsp.reply, [c.name for c in rsp.tool_calls])
        """
        return await self._ask(message, session, parent_id, timeout, None, run_id)

    async def resume(self, run_id: str, *, approve: Approval = None, answer: Answer = None, reason: str = "",
                     partial: bool = False, timeout: float | None = None, pause: str = "") -> ChatResponse:
        """Continue a run that waits for a person, here, whichever process paused it.

        Args:
            approve: ``True`` / ``False`` for every pending call, or ``{call_id: True | False | "reason"}``
                (a string denies with that reason). A denied call's result tells the model it was
                refused and why; the run goes on.
            answer: the answer to the run's question (``{call_id: text}`` if it asked several).
            reason: the reason given with a denial.
            partial: record decisions on some pending calls only; the run keeps waiting for the rest.
            pause: the run's ``pause`` (:func:`micro.agent.record.pause_token`) as the decider saw it: the
                decisions are refused (``Conflict``) if the run has resumed and paused again since.

        A decision on a call that already has one (a partial decision recorded earlier) must be the same
        (a retry: accepted) or it is refused with ``Conflict``; a recorded decision is never reversed.

        Raises ``NotFound`` for an unknown run, ``Conflict`` for a run that does not wait (another
        resumer won, it completed, it expired), ``BadRequest`` for decisions that do not fit what it
        waits for; in each case nothing in the run changed.

        Example::

            rsp = await agent.ask("Transfer 5 EUR to Bob")
            if rsp.status == "paused":
                rsp = await agent.resume(rsp.run_id, approve={rsp.pending[0].call_id: True})
        """
        return await self._resume(run_id, approve, answer, reason, partial, timeout, None, pause)

    async def stream_resume(self, run_id: str, *, approve: Approval = None, answer: Answer = None,
                            reason: str = "", partial: bool = False, timeout: float | None = None,
                            pause: str = "") -> AsyncIterator[ChatEvent]:
        """:meth:`resume`, yielding events as :meth:`stream` does."""
        async for ev in self._streamed(lambda emit: self._resume(run_id, approve, answer, reason, partial, timeout,
                                                                 emit, pause)):
            yield ev

    async def cancel(self, run_id: str, *, reason: str = "") -> ChatResponse:
        """End a run that waits (or that a crash interrupted) as ``cancelled``; its pending calls are refused."""
        return self._response(await self.engine.cancel(run_id, reason))

    async def pending(self) -> list[AgentRun]:
        """The runs that wait for a person (paused or input_required), oldest first."""
        return await self.engine.pending()

    async def resume_interrupted(self, *, timeout: float | None = None) -> list[ChatResponse]:
        """Continue every run whose process died mid-way (its owner is gone from the registry).

        Each continues from its checkpoint: completed tool calls are not made again (their results
        come from the record); calls that were in flight are made again with the same idempotency
        key, so a service that honours keys does the work once. A run another process claims first
        is left to it. Returns the responses of the runs resumed here.
        """
        found = await self.engine.interrupted()
        out: list[ChatResponse] = []

        async def one(run: AgentRun, version: int) -> None:
            decisions = decisions_of(run)
            try:
                version = await self.engine.claim(run, version, "interrupted", decisions)
            except Conflict:
                return  # another process resumed it first
            try:
                out.append(await self._execute(Checkpoint(self.runs, run, version), None, timeout, decisions))
            except Exception as exc:  # its record says how it ended
                log.warning("agent %s: resumed run %s failed: %s", self.name, run.id, exc)
                latest = await self.runs.get(run.id)
                out.append(self._response(latest or run))

        async with anyio.create_task_group() as tg:
            for run, version in found:
                tg.start_soon(one, run, version)
        return out

    async def stream(self, message: str, *, session: str = "", parent_id: str = "",
                     timeout: float | None = None, run_id: str = "") -> AsyncIterator[ChatEvent]:
        """Like :meth:`ask`, yielding events as the run goes: ``text`` deltas from the model,
        ``tool_start`` / ``tool_end`` around each tool call, then ``done`` with the response
        (or ``error``, after which the error is raised).

        Example::

            async for ev in agent.stream("What is overdue?"):
                if ev.type == "text":
                    print(ev.text, end="")
        """
        async for ev in self._streamed(lambda emit: self._ask(message, session, parent_id, timeout, emit,
                                                                         run_id)):
            yield ev

    async def _streamed(self, start: Callable[[Any], Any]) -> AsyncIterator[ChatEvent]:
        send, recv = anyio.create_memory_object_stream[ChatEvent](64)
        scope = anyio.CancelScope()
        agent = self.name
        failure: list[Exception] = []
        finished = False

        async def emit(ev: Event) -> None:
            await send.send(_event(ev, agent))

        async def produce() -> None:
            # The run lives in the runtime's task group, not in this generator, so that
            # no cancel scope spans a yield; leaving the generator cancels it.
            with scope, send:
                try:
                    rsp = await start(emit)
                    kind = rsp.status if rsp.status in ("paused", "input_required") else "done"
                    final = ChatEvent(type=kind, response=rsp, agent=agent)
                except Exception as exc:
                    failure.append(exc)  # before `send` closes: the consumer raises it
                    final = ChatEvent(type="error", text=str(exc), agent=agent)
                try:
                    await send.send(final)
                except anyio.BrokenResourceError:
                    pass  # the consumer has gone

        self._task_group.start_soon(produce)
        try:
            with recv:
                async for ev in recv:
                    finished = ev.type in ("done", "error", "paused", "input_required")
                    yield ev
        finally:
            scope.cancel()
        if failure:
            raise failure[0]
        if not finished:
            raise Unavailable(f"agent {agent}: the run was cancelled (is the agent stopping?)")

    @property
    def _task_group(self) -> anyio.abc.TaskGroup:
        return self.runtime.task_group

    async def _ask(self, message: str, session: str, parent_id: str, timeout: float | None,
                   emit: Any, run_id: str = "") -> ChatResponse:
        if not message.strip():
            raise BadRequest(f"{self.name} Agent.Chat: message is empty")
        try:
            message.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{self.name} Agent.Chat: message is not valid Unicode text (a lone surrogate?)") from None
        check_session(session)  # BadRequest for a malformed session id, before any work
        if run_id:
            check_run_id(self.name, run_id)
        await self.engine.check_session(session)
        chosen = bool(run_id)
        run_id = run_id or new_run_id()
        # the base of the run's tool calls' idempotency keys: the caller's key, or the run's own
        key = idempotency.current_key() or f"{self.name}/{run_id}"
        record = AgentRun(run_id, self.name, message, parent_id, session, status="running", model=self.model.model,
                          started=time.time(), messages=[Message.user(message)], key=key, owner=self.id)
        # first written at the first step boundary (the model's first turn asking for tools), or at the end:
        # a run that dies before made no call, so there is nothing to recover (its caller saw the error)
        version = 0
        if chosen:  # the caller will look the run up by its id at once (an A2A task): write it now
            try:
                version = await self.runs.save(record, 0)
            except VersionConflict:
                raise Conflict(f"agent {self.name}: a run {run_id} exists already; a new run needs a new id "
                               "(or none: the agent picks one)") from None
            if emit is not None:  # a stream says so at once: the run is accepted, and can be looked up
                await emit(Event("started", text=run_id))
        checkpoint = Checkpoint(self.runs, record, version)
        return await self._execute(checkpoint, emit, timeout, {})

    async def _resume(self, run_id: str, approve: Approval, answer: Answer, reason: str, partial: bool,
                      timeout: float | None, emit: Any, pause: str = "") -> ChatResponse:
        engine = self.engine
        run, version = await engine.claimable(run_id)
        decisions = engine.decide(run, approve, answer, reason, partial, pause)
        if len(decisions) < len(run.pending):
            return self._response(await engine.record_decisions(run, version, decisions))
        version = await engine.claim(run, version, run.status, decisions)
        await self.runs.unmark_waiting(run)
        return await self._execute(Checkpoint(self.runs, run, version), emit, timeout, decisions)

    async def _execute(self, checkpoint: Checkpoint, emit: Any, timeout: float | None,
                       decisions: dict[str, Decision]) -> ChatResponse:
        """Drive the run in ``checkpoint`` (claimed by this process) until it answers, waits or fails."""
        record = checkpoint.record
        run = Run(self.model, system_prompt(self.prompt), self.toolset.tools, self.limits, self.approve, emit,
                  needs_approval=self.needs_approval, checkpoint=checkpoint.save, decisions=decisions)
        restore(record, run)
        checkpoint.run = run
        deadline = context.effective_deadline(timeout)
        attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": self.name,
                                 "gen_ai.provider.name": self.model.name, "gen_ai.request.model": self.model.model,
                                 "micro.run_id": record.id, "micro.parent_id": record.parent_id}
        if record.session:
            attrs["gen_ai.conversation.id"] = record.session
        # tool calls carry keys derived from the run's key (Toolset), the same after a pause or a crash
        tokens = context.enter(deadline, {**context.metadata(), RUN_ID: record.id, idempotency.KEY: record.key})
        try:
            with telemetry.span(f"invoke_agent {self.name}", "internal", attrs) as span:
                # The deadline bounds the whole run; tool calls inherit it through the context.
                try:
                    async with asyncio.timeout_at(deadline) as cm:
                        history = await self.history.window(record.session)
                        reply = await run.drive(history)
                except TimeoutError:
                    if not cm.expired():
                        raise
                    raise Timeout(f"agent {self.name}: the run did not finish before its deadline "
                                  f"({len(run.calls)} tool calls made); ask with a longer timeout") from None
                if not run.pending:
                    await self.history.append(record.session, run.new_messages)
                if span is not None:
                    span.set_attribute("gen_ai.usage.input_tokens", run.usage.input_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", run.usage.output_tokens)
        except BaseException as exc:  # cancellation too: the record says how the run ended
            await self.engine.fail(checkpoint, exc)
            raise
        finally:
            context.leave(tokens)
        if run.pending:
            await self.engine.park(checkpoint)
        else:
            await self.engine.finish(checkpoint, reply)
            log.info("agent %s run %s: %d tool calls", self.name, record.id, len(run.calls),
                     extra={"micro_run_id": record.id, "micro_parent_id": record.parent_id, "micro_agent": self.name})
        return self._response(record)

    def _response(self, record: AgentRun) -> ChatResponse:
        return response_of(record)

    def describe(self) -> AgentDescription:
        """What ``micro agent inspect`` shows: prompt, services, tools and provider settings (no key)."""
        base_url = self._provider[3]  # [2] is the API key: never shown
        url = base_url or getattr(self.model, "base_url", "") or ""
        return AgentDescription(
            name=self.name, prompt=self.prompt, services=self.services, agents=self.agents,
            provider=ProviderSettings(
                name=self.model.name, model=self.model.model, base_url=redact(str(url)) if url else "",
                max_tokens=self.limits.max_tokens,
            ),
            limits=LimitSettings(self.limits.max_steps, self.limits.loop_limit, self.limits.tool_timeout,
                                 self.limits.model_timeout, self.history_limit),
            forward=list(self.forward),
            approve=self.approve is not None,
            needs_approval=list(self.needs_approval),
            pause_ttl=self.pause_ttl,
        )


class ProviderSettings(msgspec.Struct):
    name: str
    model: str
    base_url: str = ""
    max_tokens: int | None = None


class LimitSettings(msgspec.Struct):
    max_steps: int
    loop_limit: int
    tool_timeout: float | None
    model_timeout: float | None
    history_limit: int


class ToolInfo(msgspec.Struct):
    name: str
    description: str
    input_schema: dict[str, Any]
    service: str = ""
    endpoint: str = ""


class AgentDescription(msgspec.Struct):
    """An agent's settings as ``Agent.Inspect`` returns them (never its API key)."""

    name: str
    prompt: str
    services: list[str]
    agents: list[str]
    provider: ProviderSettings
    limits: LimitSettings
    forward: list[str]
    approve: bool
    tools: list[ToolInfo] = []
    needs_approval: list[str] = []
    pause_ttl: float = DEFAULT_PAUSE_TTL


class RunsRequest(msgspec.Struct):
    limit: int = 20
    session: str | None = None
    parent_id: str | None = None
    status: list[str] | None = None


class PendingRequest(msgspec.Struct):
    pass


class RunsResponse(msgspec.Struct):
    runs: list[AgentRun]


class RunRequest(msgspec.Struct):
    id: str


class RunResponse(msgspec.Struct):
    run: AgentRun


class HistoryRequest(msgspec.Struct):
    session: str = ""
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0  # the last this many messages; 0: all of them
    archived: bool = False  # every message kept, compacted ones and summaries too


class ForgetRequest(msgspec.Struct):
    session: str = ""


class ForgetResponse(msgspec.Struct):
    session: str


class HistoryResponse(msgspec.Struct):
    session: str
    messages: list[Message]


class InspectRequest(msgspec.Struct):
    pass


class _AgentHandler:
    """The ``Agent`` handler: ``Agent.Chat`` and ``Agent.StreamChat`` (proto/agent.proto)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Chat(self, req: ChatRequest) -> ChatResponse:
        """Send a message to the agent; it answers using its services' endpoints as tools."""
        return await self._agent.ask(req.message, session=req.session, parent_id=req.parent_id, run_id=req.run_id)

    async def StreamChat(self, req: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Like Chat, streaming text deltas and tool call events while the agent works."""
        async for ev in self._agent.stream(req.message, session=req.session, parent_id=req.parent_id,
                                           run_id=req.run_id):
            yield ev

    async def Resume(self, req: ResumeRequest) -> ChatResponse:
        """Continue a paused or input_required run: decisions on its pending calls, or the answer to its question."""
        approve, answer = request_decisions(self._agent.name, req)
        return await self._agent.resume(req.run_id, approve=approve, answer=answer, reason=req.reason,
                                        partial=req.partial, pause=req.pause)

    async def StreamResume(self, req: ResumeRequest) -> AsyncIterator[ChatEvent]:
        """Like Resume, streaming text deltas and tool call events as the run goes on."""
        approve, answer = request_decisions(self._agent.name, req)
        async for ev in self._agent.stream_resume(req.run_id, approve=approve, answer=answer, reason=req.reason,
                                                  partial=req.partial, pause=req.pause):
            yield ev

    async def Cancel(self, req: CancelRequest) -> ChatResponse:
        """End a run that waits (or that a crash interrupted); its pending calls are refused."""
        return await self._agent.cancel(req.run_id, reason=req.reason)

    async def ResumeInterrupted(self, req: ResumeInterruptedRequest) -> ResumeInterruptedResponse:
        """Continue, from their checkpoints, the runs whose process died mid-way; their responses."""
        return ResumeInterruptedResponse(runs=await self._agent.resume_interrupted())


class _AgentInfoHandler:
    """The ``AgentInfo`` handler: the agent's run records, conversations and settings, over RPC.

    (A handler of its own: ``Agent`` keeps exactly the endpoints of ``proto/agent.proto``.)
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Runs(self, req: RunsRequest) -> RunsResponse:
        """The agent's most recent run records, newest first (optionally one session's, one parent's, or
        those with some statuses: a running run whose process is gone is ``interrupted``)."""
        if req.status is not None:
            unknown = sorted(set(req.status) - set(STATUSES))
            if unknown:
                raise BadRequest(f"agent {self._agent.name}: no run status {', '.join(map(repr, unknown))}; "
                                 f"the statuses are {', '.join(STATUSES)}")
        engine = self._agent.engine
        owners = await engine.owners()
        return RunsResponse(runs=await self._agent.runs.list(
            req.limit, session=req.session, parent_id=req.parent_id, status=req.status,
            effective=lambda r: engine.effective(r, owners)))

    async def Pending(self, req: PendingRequest) -> RunsResponse:
        """The runs that wait for a person (approval or an answer), oldest first, with what they wait for."""
        return RunsResponse(runs=await self._agent.pending())

    async def Run(self, req: RunRequest) -> RunResponse:
        """One run record by id: message, tool calls with timings and results, reply, error, usage, status."""
        run = await self._agent.runs.get(req.id)
        if run is None:
            raise NotFound(f"agent {self._agent.name} has no run {req.id!r} (AgentInfo.Runs lists them)")
        engine = self._agent.engine
        return RunResponse(run=engine.effective(run, await engine.owners()))

    async def History(self, req: HistoryRequest) -> HistoryResponse:
        """A session's stored messages ("" is the default conversation), oldest first: all, or the last ``limit``."""
        check_session(req.session)
        messages = await self._agent.history.messages(req.session, req.limit, archived=req.archived)
        return HistoryResponse(session=req.session, messages=messages)

    async def Forget(self, req: ForgetRequest) -> ForgetResponse:
        """Delete everything of a session ("" is the default conversation): messages, summaries, run records."""
        await self._agent.forget(req.session)
        return ForgetResponse(session=req.session)

    async def Inspect(self, req: InspectRequest) -> AgentDescription:
        """The agent's prompt, services, tools (names and input schemas) and provider settings, without keys."""
        desc = self._agent.describe()
        desc.tools = [ToolInfo(t.name, t.description, t.input_schema, t.service, t.endpoint)
                      for t in (await self._agent.toolset.tools()).values()]
        return desc


def _tool_call(c: RunToolCall | Any) -> ToolCall:
    return ToolCall(id=c.id, name=c.name, input=msgspec.json.encode(c.input).decode(),
                    result=c.result, is_error=c.is_error)


def _event(ev: Event, agent: str) -> ChatEvent:
    if ev.type in ("text", "started"):
        return ChatEvent(type=ev.type, text=ev.text, agent=agent)
    assert ev.call is not None
    return ChatEvent(type=ev.type, tool_call=_tool_call(ev.call), agent=agent)
