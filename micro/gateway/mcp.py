"""The MCP gateway: the services and agents of a registry as the tools of an MCP server.

Built on the official ``mcp`` SDK's low-level :class:`mcp.server.lowlevel.Server`
(its tool list is ours to compute on every ``tools/list``):

- every endpoint of every selected service is a tool named like an agent's tools,
  ``{service}_{Handler}_{Method}`` (:func:`micro.agent.tools.tool_name`), whose input
  schema is the request's JSON Schema and whose description is the endpoint's
  docstring; streaming endpoints are left out, as agents leave them out;
- every agent is one tool ``ask_{agent}`` (``{"message": str, "session"?: str}``) that
  calls its ``Agent.Chat`` and answers with the reply;
- the list follows the registry: a watch recomputes it on every registry event, and
  when it changed, clients hear ``notifications/tools/list_changed``, on their
  ``subscriptions/listen`` stream (2026-07-28 protocol) or on the connection
  (handshake-era clients, which most hosts still are);
- a failed call is a tool result with ``isError`` and ``CODE: message`` as its text,
  so the model reads what went wrong; an unknown tool name is a protocol error.

Serve it with :meth:`MCPGateway.run_stdio` or the ASGI app of :meth:`MCPGateway.http_app`
(streamable HTTP); ``micro mcp`` does one or the other.

Example::

    gateway = MCPGateway(micro.Runtime(), services=["task", "task-mgr"])
    await gateway.run_stdio()
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
import msgspec
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from starlette.applications import Starlette

from micro.agent.tools import input_schema, tool_name, unique_names
from micro.errors import Error, UsageError
from micro.gateway import micro_version
from micro.gateway.http import BearerAuth, probe_routes
from micro.registry import ServiceRecord, Watcher
from micro.runtime import Runtime
from micro.tasks import Streak, backoff

__all__ = ["DEFAULT_TIMEOUT", "MCPGateway", "McpTool", "ask_tool_name"]

log = logging.getLogger("micro.gateway.mcp")

DEFAULT_TIMEOUT = 300.0  # seconds: an agent's run may take a while
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_encode = msgspec.json.Encoder().encode
_NOTIFY_TIMEOUT = 5.0  # seconds one client may take to accept a list-changed notification

_ASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "description": "What to ask the agent, in plain language."},
        "session": {
            "type": "string",
            "description": "A conversation id: the agent remembers the earlier messages of the same session.",
        },
    },
    "required": ["message"],
}


def ask_tool_name(agent: str) -> str:
    """``task-mgr`` -> ``ask_task-mgr`` (sanitised to ``[a-zA-Z0-9_-]{1,64}``)."""
    return _UNSAFE.sub("_", f"ask_{agent}")[:64]


@dataclass(frozen=True, slots=True)
class McpTool:
    """One tool: what clients see, and which endpoint it calls."""

    name: str
    description: str
    input_schema: dict[str, Any]
    service: str
    endpoint: str
    agent: bool = False

    def spec(self) -> types.Tool:
        return types.Tool(name=self.name, description=self.description, input_schema=self.input_schema)


def tools_of(records: Sequence[ServiceRecord], services: frozenset[str] | None = None) -> dict[str, McpTool]:
    """The tools for ``records`` (of the ``services`` named, or all), by name.

    Names that collide after sanitising get ``_2``, ``_3``… in sorted order, so they are stable.
    """
    found: dict[tuple[str, str], McpTool] = {}
    for rec in records:
        if services is not None and rec.name not in services:
            continue
        if rec.metadata.get("type") == "agent":
            if rec.endpoint("Agent.Chat") is not None and (rec.name, "Agent.Chat") not in found:
                found[rec.name, "Agent.Chat"] = McpTool(
                    ask_tool_name(rec.name), _ask_description(rec), _ASK_SCHEMA, rec.name, "Agent.Chat", agent=True)
            continue
        for ep in rec.endpoints:
            if ep.streaming or (rec.name, ep.name) in found:
                continue
            found[rec.name, ep.name] = McpTool(
                tool_name(rec.name, ep.name), ep.description or f"{ep.name} of the {rec.name} service",
                input_schema(ep.request), rec.name, ep.name,
            )
    ordered = sorted(found.values(), key=lambda t: (t.name, t.service, t.endpoint))
    out: dict[str, McpTool] = {}
    for tool, name in zip(ordered, unique_names(t.name for t in ordered), strict=True):
        out[name] = tool if name == tool.name else McpTool(
            name, tool.description, tool.input_schema, tool.service, tool.endpoint, tool.agent)
    return out


def _ask_description(rec: ServiceRecord) -> str:
    parts = [f"Ask the {rec.name} agent; it answers in plain language."]
    prompt = rec.metadata.get("prompt", "").strip()
    if prompt:
        parts.append(prompt)
    services = rec.metadata.get("services", "")
    if services:
        parts.append(f"It manages the {services.replace(',', ', ')} services and uses their endpoints as tools.")
    return " ".join(parts)


def _failed(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


class _Server(Server[Any]):
    """The low-level server, advertising ``tools.listChanged`` to handshake-era clients too
    (the streamable HTTP manager asks for the initialization options without arguments)."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True), experimental_capabilities, extensions)


class MCPGateway:
    """An MCP server whose tools are the endpoints and agents in ``runtime``'s registry.

    Args:
        runtime: whose registry lists the services and whose client calls them. The
            server's lifespan takes a reference on it (``runtime.acquire()``).
        services: only these services and agents (default: all of them).
        timeout: seconds one tool call may take.
        name: the server's name in the MCP handshake.

    Example::

        gateway = MCPGateway(micro.Runtime())
        uvicorn.run(gateway.http_app(), port=8081)  # streamable HTTP at /mcp
    """

    def __init__(self, runtime: Runtime, *, services: Sequence[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, name: str = "micro") -> None:
        if isinstance(services, str):
            raise UsageError(f"services must be a list of names, e.g. [{services!r}]")
        if timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout}")
        self.runtime = runtime
        self.services = frozenset(services) if services else None
        self.timeout = timeout
        self._tools: dict[str, McpTool] = {}  # the latest listing
        self._announced: dict[str, McpTool] = {}  # what clients were last told about
        self._watcher: Watcher | None = None
        self._stopping = False
        self._bus = InMemorySubscriptionBus()
        self._listen = ListenHandler(self._bus)
        self._legacy: dict[int, ServerSession] = {}  # handshake-era connections, by id
        self.server: Server[Any] = _Server(
            name, version=micro_version(), lifespan=self._lifespan,
            instructions="Tools of the micro services in the registry: each calls one endpoint; ask_* tools ask "
                         "an agent in plain language. The list changes as services start and stop.",
            on_list_tools=self._list_tools, on_call_tool=self._call_tool, on_subscriptions_listen=self._listen,
        )
        self.server.add_notification_handler("notifications/initialized", types.NotificationParams,
                                              self._initialized)

    async def tools(self) -> dict[str, McpTool]:
        """The tools of the services registered now, by name."""
        self._tools = tools_of(await self.runtime.registry.list(), self.services)
        return self._tools

    # -- serving --------------------------------------------------------------------------

    async def run_stdio(self) -> None:
        """Serve one client over this process's stdin and stdout until stdin closes."""
        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())

    def http_app(self, *, path: str = "/mcp", host: str = "127.0.0.1", token: str | None = None) -> Starlette:
        """The streamable HTTP transport as an ASGI app (call once per gateway).

        Args:
            path: where the MCP endpoint is.
            host: the address it is served on; on loopback, the SDK's DNS-rebinding
                protection accepts only loopback ``Host`` and ``Origin`` headers.
            token: when given, every request needs ``Authorization: Bearer <token>``.
        """
        app = self.server.streamable_http_app(streamable_http_path=path, host=host)
        app.router.routes.extend(probe_routes(self.runtime))  # /metrics, /health/live, /health/ready
        if token is not None:
            app.add_middleware(BearerAuth, token=token)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, _server: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        await self.runtime.acquire()
        try:
            self._stopping = False
            self._watcher = self.runtime.registry.watch()  # events from now on: list after it
            try:
                self._announced = await self.tools()
                self.runtime.task_group.start_soon(self._follow)
                yield {}
            finally:
                self._stopping = True
                self._listen.close()
                if self._watcher is not None:
                    await self._watcher.aclose()
        finally:
            await self.runtime.release()

    # -- following the registry -----------------------------------------------------------

    async def _follow(self) -> None:
        """Announce each change of the tool list until the gateway stops. A watch that fails starts
        anew after a backoff (and the list is compared again: changes meanwhile were not reported);
        failures are logged once per streak."""
        watching = Streak("mcp gateway: the registry watch", log)
        listing = Streak("mcp gateway: listing the registry", log)
        while not self._stopping:
            try:
                if self._watcher is None:
                    self._watcher = self.runtime.registry.watch()
                    await self._refresh(listing)
                async for _event in self._watcher:
                    watching.ok()
                    await self._refresh(listing)
                if self._stopping:
                    return  # closed: the gateway is stopping
                raise ConnectionError("the registry watch ended")  # a backend closed it: watch anew
            except Exception as exc:
                watching.failed(exc)
                watcher, self._watcher = self._watcher, None
                if watcher is not None:
                    await watcher.aclose()
            await anyio.sleep(backoff(watching.failures, 0.1, 30.0))

    async def _refresh(self, listing: Streak) -> None:
        try:
            tools = await self.tools()
        except Exception as exc:  # a registry hiccup: the next event lists again
            listing.failed(exc)
            return
        listing.ok()
        if tools != self._announced:
            self._announced = tools
            await self._announce()

    async def _announce(self) -> None:
        await self._bus.publish(ToolsListChanged())
        for session in list(self._legacy.values()):
            with anyio.move_on_after(_NOTIFY_TIMEOUT):  # a client that stops reading must not stall the rest
                await session.send_tool_list_changed()

    async def _initialized(self, ctx: Any, params: types.NotificationParams) -> None:
        """A handshake-era client: remember its connection for list-changed notifications."""
        session: ServerSession = ctx.session
        # The SDK keeps the connection private; its exit stack says when it closes.
        connection = getattr(session, "_connection", None)
        key = id(connection if connection is not None else session)
        self._legacy[key] = session
        if connection is not None:
            connection.exit_stack.callback(self._legacy.pop, key, None)

    # -- handlers -------------------------------------------------------------------------

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        tools = await self.tools()
        return types.ListToolsResult(tools=[t.spec() for t in tools.values()])

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = self._tools.get(params.name)
        if tool is None:  # it may have registered since the client's last listing
            tool = (await self.tools()).get(params.name)
        if tool is None:
            raise MCPError(INVALID_PARAMS, f"unknown tool {params.name!r}: list the tools again (services come "
                                           "and go)")
        args = params.arguments or {}
        try:
            body = _encode(args)  # the validated bytes go on as they are, as the HTTP gateway's do
        except (UnicodeEncodeError, RecursionError) as exc:  # lone surrogates; nested too deeply
            return _failed(f"INVALID_ARGUMENT: {tool.name}: the arguments are not valid JSON ({exc})")
        try:
            if tool.agent:
                return await self._ask(tool, args)
            rsp = await self.runtime.client.call(tool.service, tool.endpoint, body, timeout=self.timeout)
            text = _encode(rsp).decode()
        except Error as exc:
            return _failed(f"{exc.code}: {exc.message}")
        except Exception:
            log.exception("mcp gateway: %s failed", tool.name)
            return _failed("INTERNAL: the call failed in the gateway (details in its log)")
        return types.CallToolResult(content=[types.TextContent(text=text)],
                                    structured_content=rsp if isinstance(rsp, dict) else None)

    async def _ask(self, tool: McpTool, args: dict[str, Any]) -> types.CallToolResult:
        message = args.get("message")
        session = args.get("session", "")
        if not isinstance(message, str) or not message.strip():
            return _failed(f"INVALID_ARGUMENT: {tool.name} needs a non-empty `message` string")
        if not isinstance(session, str):
            return _failed(f"INVALID_ARGUMENT: {tool.name}: `session` must be a string")
        rsp = await self.runtime.client.call(tool.service, tool.endpoint, {"message": message, "session": session},
                                             timeout=self.timeout)
        return types.CallToolResult(content=[types.TextContent(text=str(rsp.get("reply", "")))],
                                    structured_content=rsp)
