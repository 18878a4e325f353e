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
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

import anyio
import anyio.abc
import msgspec

from micro import context
from micro._proto.micro.agent import ChatEvent, ChatRequest, ChatResponse, ToolCall
from micro.ai import Message, Model, from_provider
from micro.errors import BadRequest, Timeout, Unavailable, UsageError
from micro.service import Service

from .loop import Approve, Event, Limits, Run, ToolCallRecord
from .memory import History
from .tools import Tool, Toolset, function_tool

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
                 metadata: Mapping[str, str] | None = None, **service_options: Any) -> None:
        if isinstance(services, str):
            raise UsageError(f"agent {name}: services must be a list of names, e.g. [{services!r}]")
        provider = provider if provider is not None else os.environ.get(DEFAULT_PROVIDER_ENV, "anthropic")
        self._provider = (provider, model, api_key, base_url)
        self.model: Model = from_provider(provider, model=model, api_key=api_key, base_url=base_url)
        self.services = list(services)
        self.prompt = prompt
        self.limits = Limits(max_steps, loop_limit, tool_timeout, model_timeout, max_tokens)
        self.approve = approve
        self.history_limit = history_limit
        self.functions: dict[str, Tool] = {}
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
        self.handle(_AgentHandler(self), name="Agent")

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
            self._toolset = Toolset(self.client, self.services, self.functions)
        return self._toolset

    @property
    def history(self) -> History:
        if self._history is None:
            self._history = History(self.runtime.store, self.name)
        return self._history

    async def stop(self) -> None:
        """Stop serving (see :meth:`Service.stop`) and close the model if the agent built it."""
        await super().stop()
        self._toolset = None
        self._history = None
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
        run_id = uuid.uuid4().hex
        history_store = self.history
        history_store.prefix(session)  # BadRequest for a malformed session id, before any work
        deadline = context.effective_deadline(timeout)
        tokens = context.enter(deadline, {**context.metadata(), "micro-run-id": run_id})
        try:
            run = Run(self.model, self.prompt or None, self.toolset.tools, self.limits, self.approve, emit)
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
        finally:
            context.leave(tokens)
        return ChatResponse(
            reply=reply, agent=self.name, run_id=run_id, parent_id=parent_id,
            tool_calls=[_tool_call(c) for c in run.calls],
        )


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


def _tool_call(c: ToolCallRecord) -> ToolCall:
    return ToolCall(id=c.id, name=c.name, input=msgspec.json.encode(c.input).decode(),
                    result=c.result, is_error=c.is_error)


def _event(ev: Event, agent: str) -> ChatEvent:
    if ev.type == "text":
        return ChatEvent(type="text", text=ev.text, agent=agent)
    assert ev.call is not None
    return ChatEvent(type=ev.type, tool_call=_tool_call(ev.call), agent=agent)
