"""Fuzzing MCP tool calls: random tool names and arguments through the official client, in process.

The MCP gateway (micro/gateway/mcp.py) is driven by ``mcp.Client(gateway.server)``, the SDK's
in-memory connection, twice: on the runtime that hosts the services (in-process calls) and on
another runtime (gRPC over loopback). Its tools are a msgspec endpoint, a proto-first endpoint
called with JSON, and an agent's ``ask_`` tool. Hypothesis sends arguments of the wrong types,
unknown and missing fields, deep nesting, lone surrogates, huge numbers, and unknown tool names
(each case read off three draws: see test_fuzz_kit.Seed).

The property: every call ends, with a tool result or with a tool error (``isError``, text
``CODE: message`` with a documented code); an unknown tool is the protocol error the gateway
documents; valid arguments get the right answer; nothing is logged at ERROR; and afterwards a
valid call still succeeds on both connections.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import mcp_types as types
import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest
from hypothesis import strategies as st
from mcp import Client, MCPError
from test_fuzz_kit import CASES, SURROGATES, ErrorLog, Host, Seed, error_log, fuzz, json_from

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.gateway.mcp import MCPGateway
from micro.registry.memory import MemoryRegistry

pytestmark = pytest.mark.fuzz

CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"}


class Owner(msgspec.Struct):
    name: str
    age: int = 0


class EchoReq(msgspec.Struct):
    name: str
    count: int = 0
    ratio: float = 0.0
    tags: list[str] = []
    owner: Owner | None = None
    kind: Literal["x", "y"] = "x"
    extra: dict[str, Any] = {}
    repeat: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class EchoRsp(msgspec.Struct):
    name: str
    count: int
    tags: int
    blob: str


class Echo:
    async def Echo(self, req: EchoReq) -> EchoRsp:
        """Echo a summary of the request."""
        return EchoRsp(req.name[:40], req.count, len(req.tags), "x" * req.repeat)


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """A proto-first endpoint."""
        return HelloReply(message=req.name[:40], index=req.times)


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    """The helper agent: asks the echo tool with the message, then says what it answered."""
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return f"echo said: {results[0].content}"
    return scripted.call("fuzz_Echo_Echo", name=messages[-1].text)


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    connection: str  # "home" (in-process calls) or "away" (over gRPC)
    tool: str
    arguments: Any
    expect: Any = None  # valid arguments: the text the tool must answer


@dataclass
class Outcome:
    is_error: bool = False
    text: str = ""
    protocol_error: str = ""
    errors: list[str] = field(default_factory=list)


TOOLS = ["fuzz_Echo_Echo", "fuzz_Greeter_SayHello", "ask_helper"]
UNKNOWN_TOOLS = ["nope", "ask_nobody", "fuzz_Echo_Nope", "", "FUZZ_ECHO_ECHO", "ask_helper "]
FIELDS = ["name", "count", "ratio", "tags", "owner", "kind", "extra", "repeat", "times", "tone", "sender",
          "counts", "message", "session"]
INTS = [0, 1, -1, 7, 2**31 - 1, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63)]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def arguments(kind: int, seed: Seed, number: int) -> Any:
    """Tool arguments of one of six kinds (lone surrogates included: json.loads makes them of "\\ud800")."""
    if kind == 0:
        return None
    if kind == 1:
        return json_from(seed, FIELDS, surrogates=True, obj=True)
    if kind in (2, 3):  # the fields a tool wants, of any type
        wanted = ["name", "count", "owner"] if kind == 2 else ["message", "session"]
        return {key: json_from(seed, FIELDS, surrogates=True) for key in wanted[: 1 + seed.byte() % len(wanted)]}
    if kind == 4:  # the SDK serialises 254 levels at most
        key = seed.pick(["extra", "name", "zz", "message"])
        return {key: nested(abs(number) % 200 + 1, seed.pick(["list", "dict"]))}
    return {seed.pick(FIELDS): seed.pick(SURROGATES) if seed.byte() % 2 else number}


def make_case(selector: int, data: bytes, number: int) -> Case:
    """One tool call, read off three draws: which kind of call, a seed, and a number."""
    seed = Seed(data)
    connection, kind, sub = ("home", "away")[selector % 2], selector // 2 % 4, selector // 8
    if kind == 0:  # any tool name, any arguments
        names = TOOLS + UNKNOWN_TOOLS
        tool = names[sub % len(names)] if sub < 64 else seed.text(12)
        return Case(connection, tool, arguments(sub % 6, seed, number))
    if kind == 1:  # valid Echo arguments
        name, tags, repeat = seed.text(10), [seed.text(5) for _ in range(seed.byte() % 3)], abs(number) % 1001
        count = seed.pick(INTS) if sub % 2 else number
        expect = _json({"name": name[:40], "count": count, "tags": len(tags), "blob": "x" * repeat})
        return Case(connection, "fuzz_Echo_Echo", {"name": name, "count": count, "tags": tags, "repeat": repeat},
                    expect)
    if kind == 2:  # a message for the agent
        message = seed.text(12) if sub % 4 else seed.text(3) + seed.pick(SURROGATES)
        ok = bool(message.strip()) and not any("\ud800" <= c <= "\udfff" for c in message)
        reply = "echo said: " + _json({"name": message[:40], "count": 0, "tags": 0, "blob": ""})
        return Case(connection, "ask_helper", {"message": message}, reply if ok else None)
    return Case(connection, TOOLS[sub % 3], arguments(sub // 3 % 6, seed, number))  # a real tool, any arguments


cases = st.builds(make_case, st.integers(0, 8 * 96 - 1), st.binary(max_size=48), st.integers(-(2**63), 2**63 - 1))


# -- driving it --------------------------------------------------------------------------------


class Target:
    def __init__(self, clients: dict[str, Client], log: ErrorLog) -> None:
        self.clients, self.log = clients, log

    async def send(self, case: Case) -> Outcome:
        seen = len(self.log.records)
        try:
            result = await self.clients[case.connection].call_tool(case.tool, case.arguments)
        except MCPError as exc:
            return Outcome(protocol_error=str(exc), errors=self.log.records[seen:])
        (block,) = result.content
        assert isinstance(block, types.TextContent)
        return Outcome(bool(result.is_error), block.text, errors=self.log.records[seen:])

    async def valid_calls(self) -> list[str]:
        out = []
        for client in self.clients.values():
            for tool, args in (("fuzz_Echo_Echo", {"name": "still"}), ("ask_helper", {"message": "still"})):
                result = await client.call_tool(tool, args)
                assert not result.is_error
                (block,) = result.content
                assert isinstance(block, types.TextContent)
                out.append(block.text)
        return out


@asynccontextmanager
async def serving(log: ErrorLog) -> AsyncIterator[Target]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        service = micro.Service("fuzz", runtime=home)
        service.handle(Echo())
        service.handle(Greeter())
        helper = micro.Agent("helper", services=["fuzz"], prompt="You echo.", provider=scripted.function(brain),
                             runtime=home)
        async with service, helper, AsyncExitStack() as stack:
            clients = {name: await stack.enter_async_context(Client(MCPGateway(rt, services=["fuzz", "helper"]).server))
                       for name, rt in (("home", home), ("away", away))}
            yield Target(clients, log)


def check(case: Case, got: Outcome) -> None:
    assert not got.errors, f"the gateway logged errors: {got.errors}"
    if case.expect is not None:
        assert not got.is_error and not got.protocol_error, got
        assert got.text == case.expect
        return
    if got.protocol_error:
        assert case.tool not in TOOLS and "unknown tool" in got.protocol_error, got.protocol_error
        return
    assert case.tool in TOOLS, f"{case.tool!r} is no tool, yet: {got}"
    if got.is_error:
        code, _, message = got.text.partition(": ")
        assert code in CODES and message, got.text
    elif case.tool != "ask_helper":
        json.loads(got.text)  # an endpoint's answer is its JSON


def test_fuzz_mcp_tool_arguments() -> None:
    """Tool names and arguments through the MCP client, against both call paths."""
    with error_log() as log, Host(serving(log)) as host:
        ran = fuzz(cases, lambda case: check(case, host.run(host.system.send(case))))
        still = '{"name":"still","count":0,"tags":0,"blob":""}'
        assert host.run(host.system.valid_calls()) == [still, f"echo said: {still}"] * 2
    assert not log.records
    assert ran >= CASES
