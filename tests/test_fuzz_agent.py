"""Fuzzing model tool arguments: a scripted model asks for tools with arbitrary input.

An agent manages two services (one in its own runtime: in-process calls; one in another:
gRPC over loopback) and has two function tools (async and sync). Each case is one ask: the
scripted model's first turn calls up to three tools, by real and unknown names, with inputs
that are arbitrary JSON objects, objects of the wrong types, valid arguments, or what
``parse_tool_input`` makes of the raw argument text a provider returns (garbage, truncated
JSON, non-objects, lone surrogates, deep nesting); its second turn answers. Each case is
read off two draws (the calls' kinds and tools, and a seed: see test_fuzz_kit.Seed).

Objects the scripted model passes as they are may also hold lone surrogates or nest far
past ``MAX_TOOL_INPUT_DEPTH``: the loop turns such a call into an ``is_error`` result
(``micro.agent.loop._writable_uses``) so the history and the run record stay encodable; a
real provider's arguments go through ``parse_tool_input``, which refuses both, and that path
is fuzzed here too.

The property: every run finishes with the model's reply; each tool call has a result, and
invalid arguments, unknown tools and garbage become ``is_error`` results the model can read;
valid arguments get the right result; nothing is logged at ERROR; and afterwards a valid ask
still gets its answer.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import strategies as st
from test_fuzz_kit import CASES, ErrorLog, Host, Seed, error_log, fuzz, json_from

import micro
from micro._proto.micro.agent import ChatResponse
from micro.ai import (
    INVALID_JSON,
    Message,
    Response,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
    parse_tool_input,
    scripted,
)
from micro.registry.memory import MemoryRegistry
from micro.store import Record, Store

pytestmark = pytest.mark.fuzz



class Owner(msgspec.Struct):
    name: str
    age: int = 0


class EchoReq(msgspec.Struct):
    name: str
    count: int = 0
    tags: list[str] = []
    owner: Owner | None = None
    kind: Literal["x", "y"] = "x"


class EchoRsp(msgspec.Struct):
    name: str
    count: int
    tags: int


class Echo:
    async def Echo(self, req: EchoReq) -> EchoRsp:
        """Echo a summary of the request."""
        return EchoRsp(req.name[:40], req.count, len(req.tags))


async def add(a: int, b: float = 0.0, unit: Literal["m", "s"] = "m") -> str:
    """Add two numbers (async function tool)."""
    return f"{a + b}{unit}"


def shout(text: str, times: int = 1) -> str:
    """Shout a text up to three times (sync function tool, run in a worker thread)."""
    return text.upper() * max(0, min(times, 3))


class NullStore(Store):
    """Remembers nothing: with 10,000 asks in one memory store, every history read would scan them all."""

    def __init__(self) -> None:
        super().__init__("null://")

    async def _get(self, key: str, now: float) -> Record | None:
        return None

    async def _put(self, record: Record, if_version: int | None) -> int:
        return 1

    async def _delete(self, key: str) -> None:
        pass

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        return []

    async def _read_prefix(self, prefix: str, now: float, limit: int | None, offset: int,
                           reverse: bool) -> builtins.list[Record]:
        return []


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    name: str
    input: dict[str, Any]
    expect: str | None = None  # valid arguments: the result they must get
    invalid: bool = False  # the call must be an is_error result


@dataclass(frozen=True)
class Case:
    uses: tuple[Use, ...]


TOOLS = ["near_Echo_Echo", "far_Echo_Echo", "add", "shout"]
NAMES = [*TOOLS, "nope", "near_Echo_Nope", "", "ADD"]
FIELDS = ["name", "count", "tags", "owner", "kind", "a", "b", "unit", "text", "times"]
INTS = [0, 1, -1, 7, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63), 2**64, 10**30]
RAW = ['{"a": NaN}', '{"a": Infinity, "b": -Infinity}', '{"a": 1e999}', '{"a": 123456789012345678901234567890}',
       "null", "[]", '"text"', "{", "}", '{"a" 1}', "  ", "{}", '{"name": "\\udc00"}', "\ufeff{}"]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _raw(name: str, raw: str) -> Use:
    parsed = parse_tool_input(raw)
    return Use(name, parsed, invalid=INVALID_JSON in parsed or name not in TOOLS)


def nested(depth: int) -> str:
    return '{"name":' + "[" * depth + "]" * depth + "}"


def raw_text(seed: Seed) -> str:
    """Argument text a provider might hand over: garbage, JSON, truncated JSON, lone surrogates, deep nesting."""
    kind = seed.byte() % 6
    if kind == 0:
        return seed.text(30)
    if kind == 1:
        return json.dumps(json_from(seed, FIELDS))
    if kind == 2:
        return json.dumps(json_from(seed, FIELDS, obj=True))[: seed.byte()]
    if kind == 3:
        return '{"name": "' + seed.text(3) + "\\ud800" + seed.text(3) + '"}'
    if kind == 4:
        return nested(int.from_bytes(seed.take(2), "little") % 3000 + 1)
    return seed.pick(RAW)


def use_from(kind: int, name: str, seed: Seed) -> Use:
    """One tool call of one of six kinds: the named tool with any arguments, or valid arguments for a tool."""
    if kind == 0:
        odd = seed.byte() % 8
        if odd == 0:  # an object no JSON encoder can write: a lone surrogate
            return Use(name, {"name": seed.text(3) + "\ud800"}, invalid=True)
        if odd == 1:  # nested past MAX_TOOL_INPUT_DEPTH
            deep: list[Any] = []
            for _ in range(int.from_bytes(seed.take(2), "little") % 3000 + 130):
                deep = [deep]
            return Use(name, {"name": deep}, invalid=True)
        return Use(name, json_from(seed, FIELDS, obj=True))
    if kind == 1:
        return _raw(name, raw_text(seed))
    if kind == 2:
        service, text, count = seed.pick(["near", "far"]), seed.text(10), seed.pick(INTS[:9])
        tags = [seed.text(5) for _ in range(seed.byte() % 3)]
        rsp = _json({"name": text[:40], "count": count, "tags": len(tags)})
        return Use(f"{service}_Echo_Echo", {"name": text, "count": count, "tags": tags}, expect=rsp)
    if kind == 3:
        a, b, unit = seed.pick(INTS[:8]), int.from_bytes(seed.take(3), "little", signed=True) / 64, seed.pick("ms")
        return Use("add", {"a": a, "b": b, "unit": unit}, expect=f"{a + b}{unit}")
    if kind == 4:
        text, times = seed.text(10), seed.byte() % 11 - 5
        return Use("shout", {"text": text, "times": times}, expect=text.upper() * max(0, min(times, 3)))
    return Use(name, {}, invalid=name not in TOOLS)


def make_case(selector: int, data: bytes) -> Case:
    """Up to three tool calls in one turn, read off two draws: the calls' kinds and tools, and a seed."""
    seed = Seed(data)
    count, selector = selector % 4, selector // 4
    uses = []
    for _ in range(count):
        kind, name, selector = selector % 6, NAMES[selector // 6 % len(NAMES)], selector // (6 * len(NAMES))
        uses.append(use_from(kind, name, seed))
    return Case(tuple(uses))


cases = st.builds(make_case, st.integers(0, 4 * (6 * len(NAMES)) ** 3 - 1), st.binary(max_size=96))


# -- driving it --------------------------------------------------------------------------------


@dataclass
class Outcome:
    response: ChatResponse
    errors: list[str] = field(default_factory=list)


class Target:
    def __init__(self, agent: micro.Agent, log: ErrorLog) -> None:
        self.agent, self.log = agent, log
        self.uses: tuple[Use, ...] = ()

    def model(self, messages: list[Message], tools: list[ToolSpec]) -> Response | str:
        results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
        if results or not self.uses:
            return f"done {len(results)}"
        blocks = [ToolUseBlock(f"t{i}", u.name, u.input) for i, u in enumerate(self.uses)]
        return Response([TextBlock("calling"), *blocks], "tool_use", Usage(), "scripted")

    async def send(self, case: Case) -> Outcome:
        seen = len(self.log.records)
        self.uses = case.uses
        rsp = await self.agent.ask("go")
        return Outcome(rsp, self.log.records[seen:])


@asynccontextmanager
async def serving(log: ErrorLog) -> AsyncIterator[Target]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store=NullStore(), broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        near = micro.Service("near", runtime=home)
        near.handle(Echo())
        far = micro.Service("far", runtime=away)
        far.handle(Echo())
        target: Target | None = None
        agent = micro.Agent("fuzzer", services=["near", "far"], runtime=home,
                            provider=scripted.function(lambda m, t: target.model(m, t)))  # type: ignore[union-attr]
        agent.tool(add)
        agent.tool(shout)
        target = Target(agent, log)
        async with near, far, agent:
            yield target


def check(case: Case, got: Outcome) -> None:
    assert not got.errors, f"the run logged errors: {got.errors}"
    rsp = got.response
    assert rsp.reply == f"done {len(case.uses)}"
    assert [c.name for c in rsp.tool_calls] == [u.name for u in case.uses]
    for use, call in zip(case.uses, rsp.tool_calls, strict=True):
        assert call.result or not call.is_error, call  # an error says what went wrong
        if use.expect is not None:
            assert not call.is_error, (use, call.result)
            assert call.result == use.expect
        elif use.invalid:
            assert call.is_error, (use, call.result)


def test_fuzz_agent_tool_arguments() -> None:
    """Tool calls with arbitrary arguments: every run answers, bad arguments become is_error results."""
    with error_log() as log, Host(serving(log)) as host:
        ran = fuzz(cases, lambda case: check(case, host.run(host.system.send(case))))
        valid = Case((
            Use("near_Echo_Echo", {"name": "still", "count": 1}, expect='{"name":"still","count":1,"tags":0}'),
            Use("far_Echo_Echo", {"name": "still", "tags": ["t"]}, expect='{"name":"still","count":0,"tags":1}'),
            Use("add", {"a": 1, "b": 2.5, "unit": "s"}, expect="3.5s"),
        ))
        check(valid, host.run(host.system.send(valid)))
    assert not log.records
    assert ran >= CASES
