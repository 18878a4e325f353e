"""The MCP gateway, driven by the official `mcp` client: in process, over stdio and over streamable HTTP.

The programs under test are real: `micro run examples/tasks` serves the example
system, `micro mcp` is spawned by the client (stdio) or listens on a free loopback
port (HTTP), and a service started by the test on the same machine-local registry
must make the tool list change while a client is connected.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import msgspec
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.tool_name_validation import validate_tool_name
from test_gateway_http import TOKEN, Program, System, system  # noqa: F401  (a fixture)

import micro
from micro.errors import BadRequest
from micro.gateway.mcp import MCPGateway, ask_tool_name, tools_of
from micro.registry import Endpoint, ServiceRecord

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30  # seconds: an upper bound for a registry change to reach a client, never a delay


class PingReq(msgspec.Struct):
    word: str


class PingRsp(msgspec.Struct):
    echo: str


class Extra:
    """A service the tests start while a client is connected."""

    async def Ping(self, req: PingReq) -> PingRsp:
        """Echo a word back."""
        if not req.word:
            raise BadRequest("word: say something")
        return PingRsp(req.word.upper())


@asynccontextmanager
async def extra_service() -> AsyncIterator[None]:
    """The `extra` service, registered in the machine-local registry of this test's MICRO_HOME."""
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        svc = micro.Service("extra", runtime=rt)
        svc.handle(Extra())
        async with svc:
            yield


def names(result: types.ListToolsResult) -> set[str]:
    return {t.name for t in result.tools}


def text(result: types.CallToolResult) -> str:
    (block,) = result.content
    assert isinstance(block, types.TextContent)
    return block.text


# -- naming -----------------------------------------------------------------------------------


def _record(name: str, *endpoints: str, agent: bool = False, streaming: str = "") -> ServiceRecord:
    eps = [Endpoint(e, f"/{name}.{e.replace('.', '/')}", request={"type": "object", "properties": {}},
                    streaming=e == streaming) for e in endpoints]
    meta = {"type": "agent", "services": "task,project", "prompt": "You manage tasks."} if agent else {}
    return ServiceRecord(name, metadata=meta, endpoints=eps)


def test_tool_names_are_valid_mcp_names_and_stable() -> None:
    records = [
        _record("task", "Task.List", "Task.Watch", streaming="Task.Watch"),
        _record("task-mgr", "Agent.Chat", "Agent.StreamChat", agent=True, streaming="Agent.StreamChat"),
        _record("my.svc", "Do.It"),
        _record("my_svc", "Do.It"),
        _record("x" * 70, "Do.It"),
    ]
    tools = tools_of(records)
    assert sorted(tools) == ["ask_task-mgr", "my_svc_Do_It", "my_svc_Do_It_2", "task_Task_List", "x" * 64]
    assert all(validate_tool_name(name).is_valid for name in tools)
    assert ask_tool_name("team lead") == "ask_team_lead"
    ask = tools["ask_task-mgr"]
    assert ask.agent and ask.endpoint == "Agent.Chat"
    assert ask.input_schema["required"] == ["message"]
    assert "You manage tasks." in ask.description and "task, project" in ask.description
    assert tools_of(list(reversed(records))) == tools  # the order of the registry does not matter
    assert sorted(tools_of(records, frozenset({"task"}))) == ["task_Task_List"]


# -- in process -------------------------------------------------------------------------------


async def test_in_process_tools_calls_errors_and_list_changed(system: System) -> None:  # noqa: F811
    gateway = MCPGateway(system.away)
    async with Client(gateway.server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"box_Box_Get", "box_Box_Fail", "box_Box_Hang", "ask_helper"}  # Box.Count streams
        assert tools["box_Box_Get"].description == "Greet someone by name."
        assert tools["box_Box_Get"].input_schema["properties"] == {"name": {"type": "string"}}
        assert client.server_capabilities.tools is not None and client.server_capabilities.tools.list_changed

        ok = await client.call_tool("box_Box_Get", {"name": "ann"})
        assert not ok.is_error
        assert json.loads(text(ok)) == {"greeting": "hello ann", "length": 3}
        assert ok.structured_content == {"greeting": "hello ann", "length": 3}

        bad = await client.call_tool("box_Box_Get", {"name": 3})
        assert bad.is_error
        assert text(bad).startswith("INVALID_ARGUMENT: ") and "$.name" in text(bad)
        failed = await client.call_tool("box_Box_Fail", {"code": "UNAVAILABLE"})
        assert failed.is_error and text(failed) == "UNAVAILABLE: failing with UNAVAILABLE"

        asked = await client.call_tool("ask_helper", {"message": "dee"})
        assert not asked.is_error
        assert text(asked) == "The box said: hello dee"
        assert isinstance(asked.structured_content, dict)
        assert asked.structured_content["tool_calls"][0]["name"] == "box_Box_Get"
        empty = await client.call_tool("ask_helper", {"message": " "})
        assert empty.is_error and "message" in text(empty)

        with pytest.raises(MCPError, match="unknown tool 'nope'"):
            await client.call_tool("nope", {})

        async with client.listen(tools_list_changed=True) as changes:
            extra = micro.Service("extra", runtime=system.home)
            extra.handle(Extra())
            async with extra:
                with anyio.fail_after(WAIT):
                    async for _ in changes:
                        if "extra_Extra_Ping" in names(await client.list_tools()):
                            break
                pinged = await client.call_tool("extra_Extra_Ping", {"word": "hi"})
                assert text(pinged) == '{"echo":"HI"}'


async def test_in_process_services_filter(system: System) -> None:  # noqa: F811
    async with Client(MCPGateway(system.home, services=["helper"]).server) as client:
        assert names(await client.list_tools()) == {"ask_helper"}


# -- over stdio and streamable HTTP, against `micro run examples/tasks` -------------------------


@pytest.fixture
def tasks_app() -> Iterator[Program]:
    program = Program("run", "examples/tasks")
    program.wait_for("Ctrl-C to stop")
    yield program
    program.stop()


def stdio(*args: str, errlog: Any) -> Any:
    params = StdioServerParameters(command=sys.executable, args=["-m", "micro.cli", "mcp", *args],
                                   env=dict(os.environ), cwd=ROOT)
    return stdio_client(params, errlog=errlog)


async def check_the_example(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"task_Task_ListOverdue", "project_Project_Get", "ask_task-mgr", "ask_project-mgr"} <= set(tools)
    assert "task-mgr_Agent_Chat" not in tools and "task-mgr_Agent_StreamChat" not in tools
    overdue = tools["task_Task_ListOverdue"]
    assert "past their due date" in (overdue.description or "")
    assert overdue.input_schema["required"] == ["user_id"]

    rsp = await client.call_tool("task_Task_ListOverdue", {"user_id": "alice"})
    assert not rsp.is_error
    assert json.loads(text(rsp))["total"] == 3
    rsp = await client.call_tool("task_Task_ListOverdue", {"user_id": 7})
    assert rsp.is_error and text(rsp).startswith("INVALID_ARGUMENT: task Task.ListOverdue: Expected `str`")
    rsp = await client.call_tool("ask_task-mgr", {"message": "What tasks are overdue for Alice?"})
    assert not rsp.is_error, text(rsp)
    assert "Alice has 3 overdue tasks" in text(rsp)


async def test_stdio_modern_client(tasks_app: Program, tmp_path: Path) -> None:
    with (tmp_path / "mcp.err").open("w") as errlog:
        async with Client(stdio(errlog=errlog)) as client:
            assert client.protocol_version == "2026-07-28"
            await check_the_example(client)
            async with client.listen(tools_list_changed=True) as changes, extra_service():
                with anyio.fail_after(WAIT):
                    async for _ in changes:
                        if "extra_Extra_Ping" in names(await client.list_tools()):
                            break
                rsp = await client.call_tool("extra_Extra_Ping", {"word": ""})
                assert rsp.is_error and text(rsp) == "INVALID_ARGUMENT: word: say something"


class Notifications:
    """A message handler that counts tools/list_changed notifications."""

    def __init__(self) -> None:
        self.changed = anyio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.changed.set()

    async def wait_for_tool(self, client: Client, name: str) -> None:
        with anyio.fail_after(WAIT):
            while True:
                await self.changed.wait()
                self.changed = anyio.Event()
                if name in names(await client.list_tools()):
                    return


async def test_stdio_handshake_client_with_a_services_filter(tasks_app: Program, tmp_path: Path) -> None:
    seen = Notifications()
    with (tmp_path / "mcp.err").open("w") as errlog:
        async with Client(stdio("--services", "task,task-mgr,extra", errlog=errlog), mode="legacy",
                          message_handler=seen) as client:
            assert client.protocol_version != "2026-07-28"
            assert names(await client.list_tools()) == {
                "task_Task_Create", "task_Task_Delete", "task_Task_List", "task_Task_ListOverdue", "task_Task_Update",
                "ask_task-mgr"}
            async with extra_service():
                await seen.wait_for_tool(client, "extra_Extra_Ping")
                assert text(await client.call_tool("extra_Extra_Ping", {"word": "yo"})) == '{"echo":"YO"}'


@pytest.fixture
def mcp_http(tasks_app: Program) -> Iterator[str]:
    program = Program("mcp", "--transport", "http", "--address", "127.0.0.1:0", "--token-env", "MICRO_TEST_TOKEN",
                      env={**os.environ, "MICRO_TEST_TOKEN": TOKEN})
    banner = program.wait_for("micro mcp on")
    assert "bearer token required" in banner
    yield banner.split()[3]
    output = program.stop()
    assert program.proc.returncode == 0, output
    assert TOKEN not in output


@asynccontextmanager
async def http_client(url: str, **options: Any) -> AsyncIterator[Client]:
    """An MCP client on the streamable HTTP transport, with the gateway's token."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"},
                                  timeout=httpx2.Timeout(30, read=300)) as http:  # the SDK's timeouts
        async with Client(streamable_http_client(url, http_client=http), **options) as client:
            yield client


async def test_streamable_http_handshake_client(mcp_http: str) -> None:
    assert mcp_http.startswith("http://127.0.0.1:") and mcp_http.endswith("/mcp")
    seen = Notifications()
    async with httpx2.AsyncClient() as anonymous:
        rsp = await anonymous.post(mcp_http, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert rsp.status_code == 401
    async with http_client(mcp_http, mode="legacy", message_handler=seen) as client:
        await check_the_example(client)
        async with extra_service():
            await seen.wait_for_tool(client, "extra_Extra_Ping")


async def test_streamable_http_modern_client(mcp_http: str) -> None:
    async with http_client(mcp_http) as client:
        assert client.protocol_version == "2026-07-28"
        await check_the_example(client)
        async with client.listen(tools_list_changed=True) as changes, extra_service():
            with anyio.fail_after(WAIT):
                async for _ in changes:
                    if "extra_Extra_Ping" in names(await client.list_tools()):
                        break
