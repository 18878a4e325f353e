"""Tools: the endpoints of the services an agent manages, and Python functions.

Each endpoint of each managed service becomes a tool named
``{service}_{Handler}_{Method}`` (sanitised to ``[a-zA-Z0-9_-]{1,64}``; collisions
get ``_2``, ``_3``… in sorted order, so names are stable), whose input schema is
the request's JSON Schema and whose description is the endpoint's docstring.
The list is rebuilt only when the registry says a service changed: the client's
record cache is dropped on every watch event, and a toolset keeps the tools it
built for the record objects it last saw.

``@agent.tool`` functions sit beside them; their schema comes from the
function's annotations and their arguments are validated the same way. A plain
(sync) function runs in a worker thread, so a blocking one cannot stall the loop
and every other run on it; a thread cannot be interrupted, so a timeout or a
cancellation waits for the function to return.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import msgspec

from micro import context, idempotency
from micro.ai import ToolSpec
from micro.errors import AgentError, BadRequest, NotFound, UsageError
from micro.registry import ServiceRecord

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_encode = msgspec.json.Encoder().encode


def tool_name(service: str, endpoint: str) -> str:
    """``task`` + ``Task.ListOverdue`` -> ``task_Task_ListOverdue`` (64 characters at most)."""
    return _UNSAFE.sub("_", f"{service}_{endpoint.replace('.', '_')}")[:64]


def input_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema with the root ``$ref`` inlined (models want ``type: object`` at the top)."""
    ref = schema.get("$ref")
    defs = schema.get("$defs", {})
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        root = dict(defs.get(ref.removeprefix("#/$defs/"), {}))
        if defs:
            root["$defs"] = defs
        schema = root
    if schema.get("type") != "object":
        schema = {**schema, "type": "object"}
    schema.setdefault("properties", {})
    return schema


@dataclass(slots=True)
class Tool:
    """One tool: how the model sees it and how to run it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[dict[str, Any]], Awaitable[Any]]
    service: str = ""
    endpoint: str = ""
    asks: bool = False
    """True for a tool that asks the person (``request_input``): calling it pauses the run."""
    answer: Callable[[dict[str, Any], str, dict[str, Any]], Awaitable[Any]] | None = None
    """For a tool whose ``run`` may raise :class:`AskPerson`: ``answer(args, text, state)`` carries the
    person's answer on (a remote agent's question goes back to it); ``state`` is the
    :attr:`AskPerson.state` the call asked with (kept in the run record, so it survives a restart);
    its value is the call's result."""
    _spec: ToolSpec | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> ToolSpec:
        """How the model sees this tool (built once)."""
        if self._spec is None:
            self._spec = ToolSpec(self.name, self.description, self.input_schema)
        return self._spec


def function_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
    """A tool from a Python function (sync or async) with annotated parameters."""
    sig = inspect.signature(fn)
    hints = inspect.get_annotations(fn, eval_str=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise UsageError(f"tool {fn.__name__}: *args/**kwargs cannot be described to a model")
        tp = hints.get(p.name, Any)
        fields.append((p.name, tp) if p.default is p.empty else (p.name, tp, p.default))
    args_type = msgspec.defstruct(f"{fn.__name__}_args", fields, kw_only=True)
    tname = _UNSAFE.sub("_", name or fn.__name__)[:64]
    doc = description or inspect.getdoc(fn) or ""
    schema = input_schema(msgspec.json.schema(args_type))
    schema["title"] = tname
    is_async = inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)  # an object with async __call__
    )

    async def run(args: dict[str, Any]) -> Any:
        try:
            parsed = msgspec.convert(args, args_type)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"tool {tname}: {exc}") from None
        kwargs = msgspec.structs.asdict(parsed)
        if is_async:
            result = fn(**kwargs)
        else:
            result = await anyio.to_thread.run_sync(functools.partial(fn, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    return Tool(tname, doc, schema, run)


class Toolset:
    """The tools of one agent: its services' endpoints (from the registry) and its functions."""

    def __init__(self, client: Any, services: Sequence[str], functions: dict[str, Tool], *,
                 forward: Sequence[str] = ()) -> None:
        self.client = client
        self.services = list(services)
        self.functions = functions
        self.forward = tuple(forward)
        self._built: dict[str, tuple[list[ServiceRecord], list[Tool]]] = {}
        self._last: tuple[list[object], dict[str, Tool]] = ([], {})

    async def tools(self) -> dict[str, Tool]:
        """Every tool available now, by name; services not registered yet are left out."""
        found: list[Tool] = []
        basis: list[object] = []  # what the result is built from, compared by identity
        for service in self.services:
            try:
                records = await self.client.lookup(service)
            except NotFound:
                continue  # not running yet: its tools appear once it registers
            built = self._built.get(service)
            if built is None or built[0] is not records:
                built = (records, self._service_tools(service, records))
                self._built[service] = built
            found.extend(built[1])
            basis.append(records)
        found.extend(self.functions.values())
        basis.extend(self.functions.values())
        last_basis, last = self._last
        if len(basis) == len(last_basis) and all(a is b for a, b in zip(basis, last_basis, strict=True)):
            return last
        tools = _dedupe(found)
        self._last = (basis, tools)
        return tools

    def _service_tools(self, service: str, records: list[ServiceRecord]) -> list[Tool]:
        out: dict[str, Tool] = {}
        for rec in records:
            for ep in rec.endpoints:
                if ep.streaming or ep.name in out:
                    continue
                out[ep.name] = Tool(
                    name=tool_name(service, ep.name),
                    description=ep.description or f"{ep.name} of the {service} service",
                    input_schema=input_schema(ep.request),
                    run=self._caller(service, ep.name),
                    service=service,
                    endpoint=ep.name,
                )
        return [out[k] for k in sorted(out)]

    def _caller(self, service: str, endpoint: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
        async def run(args: dict[str, Any]) -> Any:
            metadata = forwarded(self.forward)
            key = idempotency.current_key()
            if key:  # a keyed Agent.Chat (a flow's, a retrying client's): its calls are keyed too
                metadata[idempotency.KEY] = idempotency.derived_key(key, service, endpoint, args)
            return await self.client.call(service, endpoint, args, metadata=metadata)

        return run


REQUEST_INPUT = "request_input"


class AskPerson(AgentError):
    """Raised by a tool's ``run`` to ask the person a question instead of answering: the run waits
    (``input_required``) with the call pending, and the answer goes to the tool's ``answer``.

    A remote A2A agent that needs input raises it through ``delegate``, so its question
    becomes this run's own. ``state`` (JSON values) is kept with the pending call and handed
    back to ``answer`` with the person's answer: what the tool needs to route it (``delegate``
    keeps the remote task's id, so parallel calls each get their own answer).
    """

    def __init__(self, question: str, state: dict[str, Any] | None = None) -> None:
        super().__init__(question)
        self.question = question
        self.state = dict(state or {})


def request_input_tool() -> Tool:
    """The built-in ``request_input(question)`` tool: the run waits (``input_required``) until a person
    answers, and the answer is the tool's result. The loop pauses on it; ``run`` is never called."""

    async def never(args: dict[str, Any]) -> Any:
        raise RuntimeError("request_input is answered by a person, not run")  # the loop pauses instead

    schema: dict[str, Any] = {
        "type": "object",
        "title": REQUEST_INPUT,
        "properties": {"question": {"type": "string", "description": "the question, in the person's language"}},
        "required": ["question"],
    }
    return Tool(REQUEST_INPUT, ("Ask the person you work for a question and wait for the answer. Use it when "
                                "you need a fact or a choice only they can give; do not guess."),
                schema, never, asks=True)


RUN_ID = "micro-run-id"
"""Call metadata naming the agent run a tool call belongs to (services may log it)."""


def forwarded(keys: Sequence[str]) -> dict[str, str]:
    """The metadata a tool call carries: the run id, and those of the caller's ``keys`` it sent.

    Nothing else of the caller's metadata goes on: an agent forwards a bearer token to
    the services it calls only when told to (``NewAgent(..., forward=["authorization"])``).
    """
    md = context.metadata()
    out = {k: v for k in keys if (v := md.get(k))}
    if run_id := md.get(RUN_ID):
        out[RUN_ID] = run_id
    return out


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` (in the caller's stable order) made unique: a name already taken gets ``_2``,
    ``_3``… (64 characters at most). Agents and the MCP gateway name their tools with
    :func:`tool_name`, sort them by (name, service, endpoint), then pass them through this."""
    out: list[str] = []
    taken: set[str] = set()
    for base in names:
        name, n = base, 2
        while name in taken:
            suffix = f"_{n}"
            name, n = base[: 64 - len(suffix)] + suffix, n + 1
        taken.add(name)
        out.append(name)
    return out


def _dedupe(tools: list[Tool]) -> dict[str, Tool]:
    ordered = sorted(tools, key=lambda t: (t.name, t.service, t.endpoint))
    out: dict[str, Tool] = {}
    for t, name in zip(ordered, unique_names(t.name for t in ordered), strict=True):
        out[name] = t if name == t.name else Tool(name, t.description, t.input_schema, t.run, t.service, t.endpoint,
                                                  t.asks)
    return out


def result_text(value: Any) -> str:
    """A tool's result as text for the model (JSON for anything structured)."""
    if isinstance(value, str):
        return value
    try:
        return _encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)
