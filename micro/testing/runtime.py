"""A runtime on memory backends, and one-line ways to call an endpoint or ask an agent.

``runtime()`` opens a :class:`micro.Runtime` whose registry, broker and store live
in this process only, and makes it the loop's shared runtime for as long as it is
open, so services and agents built without ``runtime=`` (the module-level ones of
an ``app.py``) join it instead of the machine-wide registry::

    async with micro.testing.runtime() as rt:
        async with micro.New("task") as svc:          # joins rt
            svc.handle(Task())
            rsp = await rt.client.call("task", "Task.ListOverdue", {"user_id": "alice"})

:func:`call` and :func:`ask` do the set-up for one call: they start what is not
running yet in such a runtime, call, and stop it again::

    rsp = await call(Task(), "Task.ListOverdue", {"user_id": "alice"})
    rsp = await ask(make_agent, "What is overdue?", model=scripted.turns(...), services={"task": Task()})
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeAlias

from micro._proto.micro.agent import ChatResponse
from micro.agent import Agent
from micro.ai import Model
from micro.broker import Broker
from micro.errors import UsageError
from micro.registry import Registry
from micro.runtime import Runtime
from micro.service import Service
from micro.store import Store

__all__ = ["AgentFactory", "ServicesArg", "ask", "call", "runtime"]

AgentFactory: TypeAlias = Callable[..., Agent]
"""Builds an agent; :func:`ask` calls it with the model as its only argument (or none)."""

ServicesArg: TypeAlias = Iterable[Service | object] | Mapping[str, object]
"""Services for :func:`ask`: ``Service`` objects, handler objects, or ``{"name": handler}``."""


@contextlib.asynccontextmanager
async def runtime(*, registry: Registry | str = "memory://", broker: Broker | str = "memory://",
                  store: Store | str = "memory://", install: bool = True, **options: Any) -> AsyncIterator[Runtime]:
    """An open :class:`micro.Runtime` on memory backends (nothing leaves the process).

    Args:
        registry / broker / store: backends (URLs or instances); memory by default.
            Pass one ``MemoryRegistry`` instance to two runtimes to take the network
            path between them, as between two processes.
        install: make it the loop's shared runtime while open, so services and agents
            created without ``runtime=`` join it (the loop's previous one comes back after).
        **options: what :class:`micro.Runtime` takes (``call_wrappers=``, ``default_timeout=``).

    Example::

        async with micro.testing.runtime() as rt:
            svc = micro.New("task", runtime=rt)
            svc.handle(Task())
            async with svc:
                assert (await rt.client.call("task", "Task.List", {}))["total"] == 7
    """
    rt = Runtime(registry=registry, broker=broker, store=store, **options)
    with rt.install() if install else contextlib.nullcontext():  # how module-level services join us
        async with rt:
            yield rt


def _running(service: Service) -> bool:
    try:
        rt = service.runtime
    except UsageError:
        return False
    return service.name in rt.local and bool(service.address)


@contextlib.asynccontextmanager
async def _ensure_runtime() -> AsyncIterator[Runtime]:
    """The loop's shared runtime when one is open (a test's ``runtime()``), else a new memory one."""
    current = Runtime.installed()
    if current is not None and current.is_open:
        yield current
        return
    async with runtime() as rt:
        yield rt


async def call(target: Service | object, endpoint: str, request: Any = None, *, service: str | None = None,
               response_type: type[Any] | None = None, metadata: Mapping[str, str] | None = None,
               timeout: float | None = 30.0, network: bool = False) -> Any:
    """Call ``endpoint`` ("Handler.Method") of a handler or a service, starting it if needed.

    Args:
        target: a handler object (served as service ``service``, by default its
            class name in lower case) or a :class:`micro.Service`. What is not running
            is started in a memory runtime (the open one from :func:`runtime` if any)
            for the call and stopped after; a running service is called where it runs.
            A service stays bound to the runtime it first ran in: to call a stopped one
            several times, open a :func:`runtime` around the calls.
        endpoint: ``"Handler.Method"``.
        request: an instance of the request type, a dict, or JSON.
        response_type: the type to return; without it, the response's dict form (as ``micro call`` shows).
        metadata: call metadata, e.g. ``{"idempotency-key": "k1"}``.
        timeout: seconds.
        network: call over gRPC from a second runtime instead of the in-process fast
            path (both paths have the same semantics; this proves the wire too).

    Example::

        rsp = await call(Task(), "Task.ListOverdue", {"user_id": "alice"})
        assert rsp["total"] == 3
    """
    kwargs: dict[str, Any] = {"response_type": response_type, "metadata": metadata, "timeout": timeout}
    if isinstance(target, type):
        raise UsageError(f"call() takes a handler instance or a service, not the class {target.__name__}")
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(target, Service):
            svc = target
            if not _running(svc):
                await stack.enter_async_context(_ensure_runtime())
                await stack.enter_async_context(svc)
        else:
            rt = await stack.enter_async_context(_ensure_runtime())
            svc = Service(service or type(target).__name__.lower(), runtime=rt)
            svc.handle(target)
            await stack.enter_async_context(svc)
        if not network:
            return await svc.client.call(svc.name, endpoint, request, **kwargs)
        caller = await stack.enter_async_context(
            runtime(registry=svc.runtime.registry, install=False))
        return await caller.client.call(svc.name, endpoint, request, **kwargs)


async def ask(agent: Agent | AgentFactory, message: str, *, model: Model | None = None,
              services: ServicesArg = (), session: str = "", timeout: float | None = 60.0) -> ChatResponse:
    """Ask an agent one message and return its response (``reply``, ``tool_calls``, ``run_id``).

    Args:
        agent: an :class:`micro.Agent`, or a factory that builds one: called as
            ``agent(model)`` when ``model`` is given, ``agent()`` otherwise.
        message: what the user says.
        model: the model to run it on, typically ``scripted.turns(...)``; for an
            agent object it replaces ``agent.model`` for this call only.
        services: what the agent manages, started beside it for the call: ``Service``
            objects, handler objects (served as their class name in lower case) or
            ``{"service-name": handler}``. Running ones are left as they are.
        session: the conversation id (history is kept per session in the runtime's store).
        timeout: seconds for the whole run.

    Example::

        model = scripted.turns(scripted.call("task_Task_ListOverdue", user_id="alice"), "3 overdue")
        rsp = await ask(make_agent, "What is overdue for Alice?", model=model, services={"task": Task()})
        assert_called(model, "task_Task_ListOverdue", user_id="alice")
    """
    if isinstance(agent, Agent):
        built = agent
    elif callable(agent):
        built = agent(model) if model is not None else agent()
        if not isinstance(built, Agent):
            raise UsageError(f"ask(): the factory returned {built!r}, not a micro.Agent")
    else:
        raise UsageError(f"ask() takes an agent or a factory of agents, not {agent!r}")
    previous = built.model
    if model is not None:
        built.model = model
    try:
        async with contextlib.AsyncExitStack() as stack:
            if _running(built):
                rt = built.runtime
            else:
                try:
                    rt = built.runtime  # built with runtime=: its services go there too
                except UsageError:
                    rt = await stack.enter_async_context(_ensure_runtime())
            for svc in _services(services, rt):
                if not _running(svc):
                    await stack.enter_async_context(svc)
            if not _running(built):
                await stack.enter_async_context(built)
            return await built.ask(message, session=session, timeout=timeout)
    finally:
        if model is not None:
            built.model = previous


def _services(services: ServicesArg, rt: Runtime) -> list[Service]:
    pairs: list[tuple[str | None, object]]
    if isinstance(services, Mapping):
        pairs = [(str(k), v) for k, v in services.items()]
    else:
        pairs = [(None, v) for v in services]
    out: list[Service] = []
    for name, item in pairs:
        if isinstance(item, Service):
            out.append(item)
            continue
        if isinstance(item, type):
            raise UsageError(f"services: pass a handler instance, not the class {item.__name__}")
        svc = Service(name or type(item).__name__.lower(), runtime=rt)
        svc.handle(item)
        out.append(svc)
    return out
