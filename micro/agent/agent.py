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

from micro import context, idempotency, telemetry
from micro._proto.micro.agent import ChatEvent, ChatRequest, ChatResponse, ToolCall
from micro.ai import Message, Model, from_provider
from micro.errors import BadRequest, NotFound, Timeout, Unavailable, UsageError
from micro.resource import redact
from micro.service import AgentServiceOptions, Service

from .delegation import DEFAULT_MAX_DEPTH, delegate_tool
from .loop import Approve, Event, Limits, Run, ToolCallRecord, system_prompt
from .memory import History
from .record import AgentRun, AgentRuns, RunToolCall, RunUsage, new_run_id
from .tools import RUN_ID, Tool, Toolset, function_tool

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
        approve: ``approve(tool, args) -> (ok, reason)`` (sync or async), asked before every tool call.
        history_limit: messages of history sent to the model.
        agents: other agents this one may ask through its built-in ``delegate(agent, message)``
            tool (see :mod:`micro.agent.delegation`); ``max_delegation_depth`` bounds the chain.
        forward: metadata keys of the incoming call passed on to tool calls and delegations,
            e.g. ``["authorization"]``; nothing else of the caller's metadata is forwarded.
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
                 forward: Sequence[str] = (),
                 metadata: Mapping[str, str] | None = None,
                 **service_options: Unpack[AgentServiceOptions]) -> None:
        if isinstance(services, str):
            raise UsageError(f"agent {name}: services must be a list of names, e.g. [{services!r}]")
        if isinstance(agents, str):
            raise UsageError(f"agent {name}: agents must be a list of names, e.g. [{agents!r}]")
        if name in agents:
            raise UsageError(f"agent {name}: an agent cannot delegate to itself")
        provider = provider if provider is not None else os.environ.get(DEFAULT_PROVIDER_ENV, "anthropic")
        self._provider = (provider, model, api_key, base_url)
        self.model: Model = from_provider(provider, model=model, api_key=api_key, base_url=base_url)
        self.services = list(services)
        self.prompt = prompt
        self.limits = Limits(max_steps, loop_limit, tool_timeout, model_timeout, max_tokens)
        self.approve = approve
        self.history_limit = history_limit
        self.functions: dict[str, Tool] = {}
        self.agents = list(agents)
        self.forward = tuple(k.lower() for k in forward)
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
        self._history: History | None = None
        self._runs: AgentRuns | None = None
        if self.agents:
            self.functions["delegate"] = delegate_tool(
                lambda: self.client, name, self.agents, max_depth=max_delegation_depth, forward=self.forward)
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
    def history(self) -> History:
        if self._history is None:
            self._history = History(self.runtime.store, self.name)
        return self._history

    @property
    def runs(self) -> AgentRuns:
        """The agent's run records (``agent/{name}/runs/…`` in the runtime's store)."""
        if self._runs is None:
            self._runs = AgentRuns(self.runtime.store, self.name)
        return self._runs

    async def stop(self) -> None:
        """Stop serving (see :meth:`Service.stop`) and close the model if the agent built it."""
        await super().stop()
        self._toolset = None
        self._history = None
        self._runs = None
        provider, model, api_key, base_url = self._provider
        if not isinstance(provider, Model):
            await self.model.aclose()
            # constructing does no I/O: a fresh client, in case the agent is started again
            self.model = from_provider(provider, model=model, api_key=api_key, base_url=base_url)

    # -- asking -------------------------------------------------------------------------------

    async def ask(self, message: str, *, session: str = "", parent_id: str = "",
                  timeout: float | None = None) -> ChatResponse:
        """Run the agent on one message and return its reply, tool calls and run id.

        Example::

            rsp = await agent.ask("What tasks are overdue for Alice?")
            print(rsp.reply, [c.name for c in rsp.tool_calls])
        """
        return await self._ask(message, session, parent_id, timeout, None)

    async def stream(self, message: str, *, session: str = "", parent_id: str = "",
                     timeout: float | None = None) -> AsyncIterator[ChatEvent]:
        """Like :meth:`ask`, yielding events as the run goes: ``text`` deltas from the model,
        ``tool_start`` / ``tool_end`` around each tool call, then ``done`` with the response
        (or ``error``, after which the error is raised).

        Example::

            async for ev in agent.stream("What is overdue?"):
                if ev.type == "text":
                    print(ev.text, end="")
        """
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
                    rsp = await self._ask(message, session, parent_id, timeout, emit)
                    final = ChatEvent(type="done", response=rsp, agent=agent)
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
                    finished = ev.type in ("done", "error")
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
                   emit: Any) -> ChatResponse:
        if not message.strip():
            raise BadRequest(f"{self.name} Agent.Chat: message is empty")
        try:
            message.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{self.name} Agent.Chat: message is not valid Unicode text (a lone surrogate?)") from None
        run_id = new_run_id()
        history_store = self.history
        history_store.prefix(session)  # BadRequest for a malformed session id, before any work
        deadline = context.effective_deadline(timeout)
        record = AgentRun(run_id, self.name, message, parent_id, session, model=self.model.model, started=time.time())
        run = Run(self.model, system_prompt(self.prompt), self.toolset.tools, self.limits, self.approve, emit)
        attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": self.name,
                                 "gen_ai.provider.name": self.model.name, "gen_ai.request.model": self.model.model,
                                 "micro.run_id": run_id, "micro.parent_id": parent_id}
        if session:
            attrs["gen_ai.conversation.id"] = session
        tokens = context.enter(deadline, {**context.metadata(), RUN_ID: run_id})
        try:
            with telemetry.span(f"invoke_agent {self.name}", "internal", attrs) as span:
                # The deadline bounds the whole run; tool calls inherit it through the context.
                try:
                    async with asyncio.timeout_at(deadline) as cm:
                        history = await history_store.window(session, self.history_limit)
                        reply = await run(history, Message.user(message))
                except TimeoutError:
                    if not cm.expired():
                        raise
                    raise Timeout(f"agent {self.name}: the run did not finish before its deadline "
                                  f"({len(run.calls)} tool calls made); ask with a longer timeout") from None
                await history_store.append(session, run.new_messages)
                if span is not None:
                    span.set_attribute("gen_ai.usage.input_tokens", run.usage.input_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", run.usage.output_tokens)
        except BaseException as exc:  # cancellation too: the record says how the run ended
            record.status, record.error_kind = "failed", type(exc).__name__
            record.error = str(exc) or type(exc).__name__
            with anyio.move_on_after(5, shield=True):
                await self._record(record, run)
            raise
        finally:
            context.leave(tokens)
        record.reply = reply
        await self._record(record, run)
        log.info("agent %s run %s: %d tool calls", self.name, run_id, len(run.calls),
                 extra={"micro_run_id": run_id, "micro_parent_id": parent_id, "micro_agent": self.name})
        return ChatResponse(
            reply=reply, agent=self.name, run_id=run_id, parent_id=parent_id,
            tool_calls=[_tool_call(c) for c in run.calls],
        )

    async def _record(self, record: AgentRun, run: Run) -> None:
        """Write the run record; a store that fails is logged, not raised (the reply is worth more)."""
        record.finished = time.time()
        record.tool_calls = [RunToolCall(c.id, c.name, c.input, c.result, c.is_error, c.started, c.seconds)
                             for c in run.calls]
        u = run.usage
        record.usage = RunUsage(u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens)
        try:
            await self.runs.put(record)
        except Exception:
            log.exception("agent %s: could not write the record of run %s", self.name, record.id,
                          extra={"micro_run_id": record.id, "micro_agent": self.name})

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


class RunsRequest(msgspec.Struct):
    limit: int = 20
    session: str | None = None
    parent_id: str | None = None


class RunsResponse(msgspec.Struct):
    runs: list[AgentRun]


class RunRequest(msgspec.Struct):
    id: str


class RunResponse(msgspec.Struct):
    run: AgentRun


class HistoryRequest(msgspec.Struct):
    session: str = ""
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0  # the last this many messages; 0: all of them


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
        return await self._agent.ask(req.message, session=req.session, parent_id=req.parent_id)

    async def StreamChat(self, req: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Like Chat, streaming text deltas and tool call events while the agent works."""
        async for ev in self._agent.stream(req.message, session=req.session, parent_id=req.parent_id):
            yield ev


class _AgentInfoHandler:
    """The ``AgentInfo`` handler: the agent's run records, conversations and settings, over RPC.

    (A handler of its own: ``Agent`` keeps exactly the endpoints of ``proto/agent.proto``.)
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Runs(self, req: RunsRequest) -> RunsResponse:
        """The agent's most recent run records, newest first (optionally one session's or one parent's)."""
        return RunsResponse(runs=await self._agent.runs.list(req.limit, session=req.session,
                                                             parent_id=req.parent_id))

    async def Run(self, req: RunRequest) -> RunResponse:
        """One run record by id: message, tool calls with timings and results, reply, error, usage."""
        run = await self._agent.runs.get(req.id)
        if run is None:
            raise NotFound(f"agent {self._agent.name} has no run {req.id!r} (AgentInfo.Runs lists them)")
        return RunResponse(run=run)

    async def History(self, req: HistoryRequest) -> HistoryResponse:
        """A session's stored messages ("" is the default conversation), oldest first: all, or the last ``limit``."""
        messages = await self._agent.history.messages(req.session, req.limit)
        return HistoryResponse(session=req.session, messages=messages)

    async def Inspect(self, req: InspectRequest) -> AgentDescription:
        """The agent's prompt, services, tools (names and input schemas) and provider settings, without keys."""
        desc = self._agent.describe()
        desc.tools = [ToolInfo(t.name, t.description, t.input_schema, t.service, t.endpoint)
                      for t in (await self._agent.toolset.tools()).values()]
        return desc


def _tool_call(c: ToolCallRecord) -> ToolCall:
    return ToolCall(id=c.id, name=c.name, input=msgspec.json.encode(c.input).decode(),
                    result=c.result, is_error=c.is_error)


def _event(ev: Event, agent: str) -> ChatEvent:
    if ev.type == "text":
        return ChatEvent(type="text", text=ev.text, agent=agent)
    assert ev.call is not None
    return ChatEvent(type=ev.type, tool_call=_tool_call(ev.call), agent=agent)
