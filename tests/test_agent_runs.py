"""Run records, AgentInfo (runs, history, inspect), delegation between agents, and secrets kept out.

In-process tests run on memory backends with scripted models; the delegation
cycle is also tested across two OS processes over real gRPC, the agents
finding each other through the machine-local registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from fake_anthropic import FakeAnthropic, message, text, tool_use

import micro
from micro.agent.record import AgentRuns
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import AgentError, BadRequest, NotFound, UsageError
from micro.registry.local import LocalRegistry

GUARD = 30.0  # a deadlock guard, never a timing assertion


class Lookup(msgspec.Struct):
    user_id: str


class Profile(msgspec.Struct):
    user_id: str
    email: str


class Users:
    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, str]] = []

    async def Get(self, req: Lookup) -> Profile:
        """Look a user up by id."""
        self.seen_metadata.append(dict(micro.context.metadata()))
        return Profile(req.user_id, f"{req.user_id}@example.com")


@pytest.fixture
async def rt() -> AsyncIterator[micro.Runtime]:
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as runtime:
        yield runtime


def results(call: Any) -> list[ToolResultBlock]:
    return [b for b in call.messages[-1].content if isinstance(b, ToolResultBlock)]


# -- run records ----------------------------------------------------------------------------------


async def test_each_ask_leaves_a_run_record_with_tool_calls_reply_and_usage(rt: micro.Runtime) -> None:
    users = micro.New("users", runtime=rt)
    users.handle(Users())
    model = scripted.turns(scripted.call("users_Users_Get", user_id="alice"), scripted.reply("alice@example.com"),
                           scripted.reply("second answer"))
    agent = micro.NewAgent("user-mgr", services=["users"], provider=model, runtime=rt)
    async with users, agent:
        first = await agent.ask("What is Alice's email?", session="s1")
        second = await agent.ask("And again?", parent_id="outer-run")
        runs = await agent.runs.list()
    assert [r.id for r in runs] == [second.run_id, first.run_id]  # newest first
    rec = runs[1]
    assert (rec.agent, rec.message, rec.session, rec.status, rec.reply) == (
        "user-mgr", "What is Alice's email?", "s1", "completed", "alice@example.com")
    (call,) = rec.tool_calls
    assert (call.name, call.input, call.is_error) == ("users_Users_Get", {"user_id": "alice"}, False)
    assert msgspec.json.decode(call.result) == {"user_id": "alice", "email": "alice@example.com"}
    assert call.seconds >= 0 and rec.started <= call.started <= rec.finished
    assert runs[0].parent_id == "outer-run" and runs[0].tool_calls == []
    assert [r.id for r in await agent.runs.list(session="s1")] == [first.run_id]
    assert [r.id for r in await agent.runs.list(parent_id="outer-run")] == [second.run_id]
    # each model turn: when it began, how long it took, its own tokens; the turns add up to the run's usage
    first_turn, second_turn = rec.turns
    assert rec.started <= first_turn.started <= call.started
    assert call.started + call.seconds <= second_turn.started <= rec.finished
    assert first_turn.seconds >= 0 and second_turn.seconds >= 0 and not first_turn.error
    assert sum(t.input_tokens for t in rec.turns) == rec.usage.input_tokens > 0
    assert sum(t.output_tokens for t in rec.turns) == rec.usage.output_tokens > 0
    assert second_turn.input_tokens > first_turn.input_tokens  # the second call saw the tool's result too
    assert len(runs[0].turns) == 1


def test_a_run_record_written_before_turns_were_recorded_still_reads() -> None:
    from micro.agent.record import AgentRun

    old = b'{"id": "18ab", "agent": "a", "message": "hi", "tool_calls": [], "usage": {"input_tokens": 3}}'
    run = msgspec.json.decode(old, type=AgentRun)
    assert (run.turns, run.usage.input_tokens) == ([], 3)


async def test_a_failed_run_is_recorded_with_its_error_kind(rt: micro.Runtime) -> None:
    model = scripted.turns()  # an empty script: the first model call raises AgentError
    agent = micro.NewAgent("broken", provider=model, runtime=rt)
    async with agent:
        with pytest.raises(AgentError):
            await agent.ask("hello")
        (run,) = await agent.runs.list()
    assert (run.status, run.error_kind, run.message, run.reply) == ("failed", "AgentError", "hello", "")
    assert run.error
    (turn,) = run.turns  # the failed model call is recorded as a turn with its error
    assert turn.error.startswith("AgentError: ") and run.started <= turn.started <= run.finished


async def test_agent_info_endpoints_over_the_client(rt: micro.Runtime) -> None:
    users = micro.New("users", runtime=rt)
    users.handle(Users())
    model = scripted.turns(scripted.call("users_Users_Get", user_id="bob"), scripted.reply("found bob"))
    agent = micro.NewAgent("user-mgr", services=["users"], provider=model, prompt="You look users up.",
                           runtime=rt, max_steps=4)
    async with users, agent:
        rsp = await agent.ask("Find bob", session="desk")
        runs = await rt.client.call("user-mgr", "AgentInfo.Runs", {"limit": 5})
        assert [r["id"] for r in runs["runs"]] == [rsp.run_id]
        shown = await rt.client.call("user-mgr", "AgentInfo.Run", {"id": rsp.run_id})
        assert shown["run"]["tool_calls"][0]["name"] == "users_Users_Get"
        with pytest.raises(NotFound, match="has no run 'nope'"):
            await rt.client.call("user-mgr", "AgentInfo.Run", {"id": "nope"})
        with pytest.raises(BadRequest, match="run id"):
            await rt.client.call("user-mgr", "AgentInfo.Run", {"id": "a/b"})
        history = await rt.client.call("user-mgr", "AgentInfo.History", {"session": "desk"})
        kinds = [[b["type"] for b in m["content"]] for m in history["messages"]]
        assert kinds == [["text"], ["tool_use"], ["tool_result"], ["text"]]
        last = await rt.client.call("user-mgr", "AgentInfo.History", {"session": "desk", "limit": 2})
        assert last["messages"] == history["messages"][-2:]
        with pytest.raises(BadRequest, match="limit"):
            await rt.client.call("user-mgr", "AgentInfo.History", {"session": "desk", "limit": -1})
        assert (await rt.client.call("user-mgr", "AgentInfo.History", {}))["messages"] == []
        desc = await rt.client.call("user-mgr", "AgentInfo.Inspect", {})
    assert (desc["name"], desc["prompt"], desc["services"]) == ("user-mgr", "You look users up.", ["users"])
    assert desc["provider"]["name"] == "scripted" and desc["limits"]["max_steps"] == 4
    builtin, tool = desc["tools"]
    assert builtin["name"] == "request_input"  # on by default (builtins=[] leaves it out)
    assert tool["name"] == "users_Users_Get" and tool["description"] == "Look a user up by id."
    assert tool["input_schema"]["required"] == ["user_id"]


# -- delegation -----------------------------------------------------------------------------------


def delegating(target: str, message: str) -> Any:
    """A model that delegates once, then answers with what came back."""

    def script(messages: list[Message], tools: list[ToolSpec]) -> Any:
        last = messages[-1]
        done = [b for b in last.content if isinstance(b, ToolResultBlock)]
        if done:
            return scripted.reply(("refused: " if done[0].is_error else "got: ") + done[0].content)
        return scripted.call("delegate", agent=target, message=message)

    return scripted.function(script)


async def test_an_agent_delegates_and_the_child_run_points_at_the_parent(rt: micro.Runtime) -> None:
    comms_model = scripted.turns(scripted.reply("email sent to alice"))
    comms = micro.NewAgent("comms-mgr", provider=comms_model, runtime=rt)
    task = micro.NewAgent("task-mgr", provider=delegating("comms-mgr", "email alice"), agents=["comms-mgr"],
                          runtime=rt)
    async with comms, task:
        rsp = await task.ask("reschedule and tell alice")
        (child,) = await comms.runs.list()
        spec = (await task.toolset.tools())["delegate"]
    assert child.parent_id == rsp.run_id and child.message == "email alice" and child.session == "from-task-mgr"
    got = msgspec.json.decode(rsp.reply.removeprefix("got: "))
    assert got == {"agent": "comms-mgr", "reply": "email sent to alice", "run_id": child.id}
    (call,) = rsp.tool_calls
    assert call.name == "delegate" and not call.is_error
    assert spec.input_schema["properties"]["agent"]["enum"] == ["comms-mgr"]


async def test_a_delegation_cycle_is_refused_with_a_tool_error(rt: micro.Runtime) -> None:
    a = micro.NewAgent("a-mgr", provider=delegating("b-mgr", "ask a"), agents=["b-mgr"], runtime=rt)
    b = micro.NewAgent("b-mgr", provider=delegating("a-mgr", "back to a"), agents=["a-mgr"], runtime=rt)
    async with a, b:
        with anyio.fail_after(GUARD):
            rsp = await a.ask("start")
        (b_run,) = await b.runs.list()
    # b's delegate back to a is refused; b answers with the refusal; a gets b's answer
    (b_call,) = b_run.tool_calls
    assert b_call.is_error and "PermissionDenied: delegation refused: a-mgr → b-mgr → a-mgr is a cycle" in b_call.result
    assert b_run.reply.startswith("refused: ")
    assert rsp.reply.startswith("got: ") and len(await a.runs.list()) == 1  # a ran once: no recursion


async def test_delegation_depth_is_limited(rt: micro.Runtime) -> None:
    a = micro.NewAgent("a-mgr", provider=delegating("b-mgr", "x"), agents=["b-mgr"], runtime=rt,
                       max_delegation_depth=2)
    b = micro.NewAgent("b-mgr", provider=delegating("c-mgr", "y"), agents=["c-mgr"], runtime=rt,
                       max_delegation_depth=2)
    c = micro.NewAgent("c-mgr", provider=scripted.turns(scripted.reply("c done")), runtime=rt)
    async with a, b, c:
        await a.ask("go")
        (b_run,) = await b.runs.list()
        assert await c.runs.list() == []
    assert "a-mgr → b-mgr → c-mgr is deeper than the limit of 2 agents" in b_run.tool_calls[0].result


async def test_bad_delegate_arguments_are_tool_errors(rt: micro.Runtime) -> None:
    model = scripted.turns(
        scripted.turn(scripted.call("delegate", agent="nobody", message="hi"), scripted.call("delegate", agent=3),
                      scripted.call("delegate", agent="b-mgr", message=" ")),
        scripted.reply("ok"))
    a = micro.NewAgent("a-mgr", provider=model, agents=["b-mgr"], runtime=rt)
    async with a:
        rsp = await a.ask("go")
    errors = [c.result for c in rsp.tool_calls]
    assert all(c.is_error for c in rsp.tool_calls)
    assert "a-mgr may not ask 'nobody'; it may ask: b-mgr" in errors[0]
    assert "`$.agent`" in errors[1] or "agent" in errors[1]
    assert "`message` is empty" in errors[2]
    with pytest.raises(UsageError, match="cannot delegate to itself"):
        micro.NewAgent("a-mgr", provider=scripted.turns(), agents=["a-mgr"])


CHILD = textwrap.dedent(
    """
    import sys
    import micro
    from micro.ai import Message, ToolResultBlock, scripted

    def script(messages, tools):
        done = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
        if done:
            return scripted.reply(("refused: " if done[0].is_error else "got: ") + done[0].content)
        return scripted.call("delegate", agent="a-mgr", message="and back to you")

    agent = micro.NewAgent("b-mgr", provider=scripted.function(script), agents=["a-mgr"])
    agent.run()
    """
)


async def test_delegation_and_cycle_refusal_across_two_processes(tmp_path: Path, micro_home: Path) -> None:
    script = tmp_path / "b_agent.py"
    script.write_text(CHILD)
    async with LocalRegistry(poll_interval=0.02) as registry, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        watcher = registry.watch()
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env={**os.environ},
                                                    stdout=asyncio.subprocess.DEVNULL)
        try:
            with anyio.fail_after(GUARD):
                async for event in watcher:
                    if event.type == "create" and event.service.name == "b-mgr":
                        break
            await watcher.aclose()
            a = micro.NewAgent("a-mgr", provider=delegating("b-mgr", "please help"), agents=["b-mgr"],
                               runtime=rt)
            async with a:
                with anyio.fail_after(GUARD):
                    rsp = await a.ask("start")
                b_runs = await rt.client.call("b-mgr", "AgentInfo.Runs", {})
        finally:
            proc.terminate()
            await proc.wait()
    (b_run,) = b_runs["runs"]
    assert b_run["parent_id"] == rsp.run_id  # the child's record points at the parent run over gRPC
    (b_call,) = b_run["tool_calls"]
    assert b_call["is_error"] and "a-mgr → b-mgr → a-mgr is a cycle" in b_call["result"]
    got = msgspec.json.decode(rsp.reply.removeprefix("got: "))
    assert got["agent"] == "b-mgr" and got["reply"].startswith("refused: ") and got["run_id"] == b_run["id"]


# -- secrets --------------------------------------------------------------------------------------

API_KEY = "sk-ant-TOPSECRET-4242"
TOKEN = "tok-PRIVATE-9191"


async def test_keys_and_tokens_never_reach_logs_records_registry_or_inspect(
        rt: micro.Runtime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = micro.auth.TokenAuth({TOKEN: ["*"]})
    users_impl = Users()
    users = micro.New("users", runtime=rt, handler_wrappers=[auth])
    users.handle(users_impl)
    async with FakeAnthropic() as api:
        api.reply(message(tool_use("tu_1", "users_Users_Get", {"user_id": "carol"}), stop_reason="tool_use"),
                  message(text("carol@example.com")))
        agent = micro.NewAgent("user-mgr", services=["users"], provider="anthropic", api_key=API_KEY,
                               base_url=api.base_url, forward=["authorization"], runtime=rt)
        async with users, agent:
            rsp = await rt.client.call("user-mgr", "Agent.Chat", {"message": "carol's email?"},
                                       metadata={"authorization": f"Bearer {TOKEN}"})
            desc = await rt.client.call("user-mgr", "AgentInfo.Inspect", {})
            records = await rt.registry.list()
            stored = await rt.store.read("", prefix=True)
    assert rsp["reply"] == "carol@example.com"
    assert users_impl.seen_metadata[0]["authorization"] == f"Bearer {TOKEN}"  # forwarded, as configured
    assert users_impl.seen_metadata[0]["micro-run-id"] == rsp["run_id"]
    assert API_KEY in str(api.requests[0].headers)  # the key did reach the provider
    haystacks = {
        "logs": caplog.text,
        "inspect": msgspec.json.encode(desc).decode(),
        "registry": msgspec.json.encode(records).decode(),
        "store (run records, history)": b"".join(r.key.encode() + r.value for r in stored).decode(),
        "reply": msgspec.json.encode(rsp).decode(),
    }
    assert stored  # there is something to search
    for where, hay in haystacks.items():
        assert API_KEY not in hay, f"the API key leaked into {where}"
        assert TOKEN not in hay, f"the bearer token leaked into {where}"
    (run,) = [msgspec.json.decode(r.value) for r in stored if "/runs/" in r.key]
    assert run["usage"]["input_tokens"] == 20 and run["usage"]["output_tokens"] == 10  # two model calls


async def test_without_forward_the_callers_token_stays_with_the_agent(rt: micro.Runtime) -> None:
    auth = micro.auth.TokenAuth({TOKEN: ["*"]})
    users = micro.New("users", runtime=rt, handler_wrappers=[auth])
    users.handle(Users())
    model = scripted.turns(scripted.call("users_Users_Get", user_id="dan"), scripted.reply("no access"))
    agent = micro.NewAgent("user-mgr", services=["users"], provider=model, runtime=rt)
    async with users, agent:
        rsp = await rt.client.call("user-mgr", "Agent.Chat", {"message": "dan?"},
                                   metadata={"authorization": f"Bearer {TOKEN}"})
    (call,) = rsp["tool_calls"]
    assert call["is_error"] and call["result"].startswith("Unauthenticated:")
    assert results(model.calls[1])[0].is_error


async def test_a_run_record_store_that_fails_does_not_lose_the_reply(
        rt: micro.Runtime, caplog: pytest.LogCaptureFixture) -> None:
    agent = micro.NewAgent("user-mgr", provider=scripted.turns(scripted.reply("hi there")), runtime=rt)

    class Broken(AgentRuns):
        async def save(self, run: Any, version: int) -> int:
            raise OSError("disk full")

    async with agent:
        agent._runs = Broken(rt.store, "user-mgr")
        rsp = await agent.ask("hello")
    assert rsp.reply == "hi there"
    assert "could not write the checkpoint of run" in caplog.text and "disk full" in caplog.text


async def test_a_message_that_is_not_unicode_text_is_refused_before_any_work(rt: micro.Runtime) -> None:
    model = scripted.turns(scripted.reply("never"))
    agent = micro.NewAgent("user-mgr", provider=model, runtime=rt)
    async with agent:
        with pytest.raises(BadRequest, match="not valid Unicode text"):
            await agent.ask("hello \ud800")
        assert model.calls == [] and await agent.runs.list() == []


# -- idempotency keys through an agent ------------------------------------------------------------


class AddReq(msgspec.Struct):
    n: int


class AddRsp(msgspec.Struct):
    total: int


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []

    async def Add(self, req: AddReq) -> AddRsp:
        """Add n to the count."""
        self.calls.append((req.n, micro.idempotency.current_key()))
        return AddRsp(sum(n for n, _ in self.calls))


async def test_a_keyed_agent_chat_runs_once_and_keys_its_tool_calls() -> None:
    # what a flow's `agent=` step relies on: before, Agent.Chat ignored the key, so a retried event
    # asked the agent again and every tool call it made happened again
    armed = [True]

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not any(isinstance(b, ToolResultBlock) for b in messages[-1].content):
            return scripted.turn("Adding. ", scripted.call("counter_Counter_Add", n=2))
        if armed.pop() if armed else False:
            raise ConnectionError("the model went away")  # the first attempt dies after its tool call
        return "Added."

    counter = Counter()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        micro.idempotency.enable(svc)
        agent = micro.NewAgent("adder", services=["counter"], provider=scripted.function(brain), runtime=rt)
        async with svc, agent:
            keyed = {"idempotency-key": "order-7"}
            with pytest.raises(micro.errors.Error):
                await rt.client.call("adder", "Agent.Chat", {"message": "add two"}, metadata=keyed)
            first = await rt.client.call("adder", "Agent.Chat", {"message": "add two"}, metadata=keyed)
            again = await rt.client.call("adder", "Agent.Chat", {"message": "add two"}, metadata=keyed)
            other = await rt.client.call("adder", "Agent.Chat", {"message": "add two"})  # no key: a new run
    assert first["reply"].endswith("Added.") and again == first  # the repeat got the first answer
    assert other["run_id"] != first["run_id"]
    # the retried run's tool call carried the same derived key as the failed one's: the counter ran it once
    keys = [k for _, k in counter.calls]
    assert len(counter.calls) == 2 and keys[0] is not None and keys[0].startswith("order-7:counter.Counter.Add:")
    # an unkeyed chat's calls are keyed by its run, so a crash's re-issued call is recognised too
    assert keys[1] == micro.idempotency.derived_key(f"adder/{other['run_id']}", "counter", "Counter.Add", {"n": 2})
