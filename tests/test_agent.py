"""The agent (issue 4): registry endpoints as tools, the concurrent loop, the Agent service.

Everything runs on memory backends and scripted models; ``model.calls`` records
what the model was sent, so the tests assert on the tool lists, tool results
and histories a model really saw. Waiting is done on ``anyio.Event``s, never by
sleeping; ``GUARD`` bounds a wait so a deadlock fails instead of hanging. The
only timing assertions are the two concurrency tests the issue asks for, with
generous margins.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import msgspec
import pytest

import micro
from micro import context
from micro._proto.micro.agent import ChatEvent, ChatRequest, ChatResponse
from micro.agent import Toolset, tool_name
from micro.agent.loop import SUMMARISE
from micro.ai import INVALID_JSON, Response, ToolResultBlock, ToolUseBlock, Usage, scripted
from micro.ai.scripted import ScriptedCall, ScriptedModel
from micro.errors import AgentError, BadRequest, NotFound, Timeout, UsageError
from micro.registry.memory import MemoryRegistry

GUARD = 10.0  # seconds: a deadlock guard, never a timing assertion

# -- services the agent manages ----------------------------------------------------------------


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Owner(msgspec.Struct):
    name: str
    email: str = ""


class CreateNote(msgspec.Struct):
    title: str
    priority: Priority = Priority.LOW
    status: Literal["draft", "published"] = "draft"
    owner: Owner | None = None
    tags: list[str] = []


class GetNote(msgspec.Struct):
    id: str


class Note(msgspec.Struct):
    id: str
    title: str
    priority: Priority = Priority.LOW


class Notes:
    def __init__(self) -> None:
        self.notes: dict[str, Note] = {}

    async def Create(self, req: CreateNote) -> Note:
        """Create a note with a title, a priority and an optional owner."""
        note = Note(f"n{len(self.notes) + 1}", req.title, req.priority)
        self.notes[note.id] = note
        return note

    async def Get(self, req: GetNote) -> Note:
        """Get one note by its id."""
        if req.id not in self.notes:
            raise NotFound(f"no note {req.id!r}")
        return self.notes[req.id]

    async def Fail(self, req: GetNote) -> Note:
        """Always fails (for tests)."""
        raise RuntimeError("disk on fire")

    async def Watch(self, req: GetNote) -> AsyncIterator[Note]:
        """Streams are not tools."""
        yield Note(req.id, "x")


class Text(msgspec.Struct):
    text: str = ""


class Nap(msgspec.Struct):
    seconds: float


class Probe:
    """A service whose calls a test can hold, release and watch being cancelled."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()
        self.seen: list[str] = []
        self.remaining: list[float | None] = []

    async def Wait(self, req: Text) -> Text:
        """Wait until the test releases the call."""
        self.seen.append(req.text)
        self.remaining.append(context.time_remaining())
        self.started.set()
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        return Text(f"released {req.text}")

    async def Sleep(self, req: Nap) -> Nap:
        """Sleep for some seconds."""
        await anyio.sleep(req.seconds)
        return req


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry()


def memory_runtime(registry: MemoryRegistry) -> micro.Runtime:
    return micro.Runtime(registry=registry, store="memory://", broker="memory://")


@pytest.fixture
async def rt(registry: MemoryRegistry) -> AsyncIterator[micro.Runtime]:
    async with memory_runtime(registry) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def serving(rt: micro.Runtime, name: str, handler: object) -> AsyncIterator[micro.Service]:
    service = micro.Service(name, runtime=rt)
    service.handle(handler)  # before start: the first registry record has the endpoints
    async with service:
        yield service


@pytest.fixture
async def notes(rt: micro.Runtime) -> AsyncIterator[Notes]:
    handler = Notes()
    async with serving(rt, "notes", handler):
        yield handler


@pytest.fixture
async def probe(rt: micro.Runtime) -> AsyncIterator[Probe]:
    handler = Probe()
    async with serving(rt, "probe", handler):
        yield handler


def agent_on(rt: micro.Runtime, model: ScriptedModel, services: tuple[str, ...] = ("notes",),
             **options: Any) -> micro.Agent:
    return micro.Agent("helper", services=list(services), provider=model, runtime=rt, **options)


def results(call: ScriptedCall) -> list[ToolResultBlock]:
    """The tool results a model call was sent (in its last message)."""
    return [b for b in call.messages[-1].content if isinstance(b, ToolResultBlock)]


def asked_ids(call: ScriptedCall) -> list[str]:
    """The ids of the tool calls the model made in the turn before this call."""
    return [b.id for b in call.messages[-2].content if isinstance(b, ToolUseBlock)]


# -- 1. tools from the registry ----------------------------------------------------------------


async def test_endpoints_become_tools_with_full_schemas_and_docstrings(rt: micro.Runtime, notes: Notes) -> None:
    model = scripted.turns("ok")
    async with agent_on(rt, model) as agent:
        await agent.ask("what can you do?")
    tools = {t.name: t for t in model.calls[0].tools}
    # no stream; request_input is the built-in question tool
    assert model.calls[0].tool_names == ["notes_Notes_Create", "notes_Notes_Fail", "notes_Notes_Get", "request_input"]
    create = tools["notes_Notes_Create"]
    assert create.description == "Create a note with a title, a priority and an optional owner."
    schema = create.input_schema
    assert schema["type"] == "object" and "$ref" not in schema  # the root reference is inlined
    assert schema["required"] == ["title"]
    assert schema["properties"]["title"] == {"type": "string"}
    assert schema["properties"]["status"]["enum"] == ["draft", "published"]
    assert schema["properties"]["priority"]["$ref"] == "#/$defs/Priority"
    assert sorted(schema["$defs"]["Priority"]["enum"]) == ["high", "low"]
    assert {"$ref": "#/$defs/Owner"} in schema["properties"]["owner"]["anyOf"]
    assert schema["$defs"]["Owner"]["required"] == ["name"]
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert tools["notes_Notes_Get"].input_schema["required"] == ["id"]


async def test_tool_names_are_sanitised_truncated_and_deduplicated(rt: micro.Runtime) -> None:
    assert tool_name("task", "Task.ListOverdue") == "task_Task_ListOverdue"
    assert tool_name("acme.billing v2", "Invoice.Get") == "acme_billing_v2_Invoice_Get"
    assert len(tool_name("s" * 80, "Handler.Method")) == 64
    async with serving(rt, "a.b", Notes()), serving(rt, "a_b", Notes()):
        toolset = Toolset(rt.client, ["a_b", "a.b", "absent"], {})
        names = sorted(await toolset.tools())
        again = sorted(await Toolset(rt.client, ["a.b", "a_b"], {}).tools())
    assert names == again  # the same names whatever the order of services
    assert names == ["a_b_Notes_Create", "a_b_Notes_Create_2", "a_b_Notes_Fail", "a_b_Notes_Fail_2",
                     "a_b_Notes_Get", "a_b_Notes_Get_2"]
    assert all(len(n) <= 64 for n in names)


async def test_a_service_started_after_the_agent_is_a_tool_on_the_next_model_call(rt: micro.Runtime) -> None:
    late = micro.Service("late", runtime=rt)
    late.handle(Probe())
    model = scripted.turns(
        scripted.call("start_late"),
        scripted.call("late_Probe_Sleep", seconds=0),
        "done",
    )
    async with agent_on(rt, model, services=("late",)) as agent:

        @agent.tool
        async def start_late() -> str:
            """Start the late service."""
            await late.start()
            return "started"

        try:
            rsp = await agent.ask("start it, then use it")
        finally:
            await late.stop()
    assert model.calls[0].tool_names == ["request_input", "start_late"]
    assert model.calls[1].tool_names == ["late_Probe_Sleep", "late_Probe_Wait", "request_input", "start_late"]
    assert [(c.name, c.is_error) for c in rsp.tool_calls] == [("start_late", False), ("late_Probe_Sleep", False)]
    assert rsp.reply == "done"


async def test_invalid_tool_arguments_are_an_error_result_naming_the_field(rt: micro.Runtime, notes: Notes) -> None:
    model = scripted.turns(
        scripted.turn(
            scripted.call("notes_Notes_Create", title=42),
            scripted.call("notes_Notes_Create", title="ok", owner={"name": 7}),
            scripted.call("notes_Notes_Create", title="ok", priority="urgent"),
        ),
        scripted.call("notes_Notes_Create", title="fixed"),
        "created",
    )
    async with agent_on(rt, model) as agent:
        rsp = await agent.ask("make a note")
    wrong_type, nested, enum_value = results(model.calls[1])
    assert wrong_type.is_error and "$.title" in wrong_type.content and "str" in wrong_type.content
    assert nested.is_error and "$.owner.name" in nested.content
    assert enum_value.is_error and "$.priority" in enum_value.content
    assert not results(model.calls[2])[0].is_error
    assert [n.title for n in notes.notes.values()] == ["fixed"]  # nothing invalid reached the handler
    assert rsp.reply == "created"
    assert [c.is_error for c in rsp.tool_calls] == [True, True, True, False]


async def test_arguments_that_are_not_json_are_an_error_result(rt: micro.Runtime, notes: Notes) -> None:
    broken = ToolUseBlock("call_bad", "notes_Notes_Create", {INVALID_JSON: '{"title": "unfinished'})
    model = scripted.turns(Response([broken], "tool_use", Usage(), "scripted"), "sorry")
    async with agent_on(rt, model) as agent:
        rsp = await agent.ask("make a note")
    (result,) = results(model.calls[1])
    assert result.tool_use_id == "call_bad" and result.is_error
    assert "not a JSON object" in result.content and "unfinished" in result.content
    assert notes.notes == {} and rsp.reply == "sorry"


async def test_an_unknown_tool_is_an_error_result_listing_the_tools(rt: micro.Runtime, notes: Notes) -> None:
    model = scripted.turns(scripted.call("notes_Notes_Delete", id="n1"), "ok")
    async with agent_on(rt, model) as agent:
        rsp = await agent.ask("delete n1")
    (result,) = results(model.calls[1])
    assert result.is_error
    assert "notes_Notes_Delete" in result.content and "notes_Notes_Get" in result.content
    assert rsp.reply == "ok"


async def test_function_tools_sync_and_async_with_schemas_from_annotations(rt: micro.Runtime) -> None:
    threads: list[int] = []
    model = scripted.turns(
        scripted.turn(
            scripted.call("add", a=1),
            scripted.call("weather", city="Oslo", units="f"),
            scripted.call("add", a="one"),
        ),
        "answered",
    )
    async with agent_on(rt, model, services=()) as agent:

        @agent.tool
        def add(a: int, b: int = 2) -> int:
            """Add two integers."""
            threads.append(threading.get_ident())
            return a + b

        @agent.tool(name="weather")
        async def forecast(city: str, units: Literal["c", "f"] = "c") -> dict[str, Any]:
            """The forecast for a city."""
            return {"city": city, "units": units, "high": 21}

        rsp = await agent.ask("add and forecast")
    specs = {t.name: t for t in model.calls[0].tools}
    assert sorted(specs) == ["add", "request_input", "weather"]
    assert specs["add"].description == "Add two integers."
    assert specs["add"].input_schema["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer", "default": 2}}
    assert specs["add"].input_schema["required"] == ["a"]
    assert specs["weather"].description == "The forecast for a city."
    assert specs["weather"].input_schema["properties"]["units"]["enum"] == ["c", "f"]
    assert specs["weather"].input_schema["required"] == ["city"]
    added, weather, invalid = results(model.calls[1])
    assert (added.content, added.is_error) == ("3", False)
    assert msgspec.json.decode(weather.content) == {"city": "Oslo", "units": "f", "high": 21}
    assert invalid.is_error and "$.a" in invalid.content
    assert threads and threading.get_ident() not in threads  # a plain function runs off the loop's thread
    assert rsp.reply == "answered"


def test_function_tools_must_be_describable() -> None:
    agent = micro.Agent("helper", provider=scripted.turns())
    with pytest.raises(UsageError, match="args"):

        @agent.tool
        def anything(*values: int) -> int:
            return sum(values)

    with pytest.raises(UsageError, match="list of names"):
        micro.Agent("helper", services="notes", provider=scripted.turns())


# -- 2. the loop -------------------------------------------------------------------------------


async def test_tool_calls_of_one_turn_run_concurrently_and_results_keep_the_asked_order(rt: micro.Runtime) -> None:
    done = [anyio.Event() for _ in range(3)]
    finished: list[int] = []
    model = scripted.turns(scripted.turn(*(scripted.call("step", n=n) for n in range(3))), "ok")
    async with agent_on(rt, model, services=()) as agent:

        @agent.tool
        async def step(n: int) -> str:
            """Step n finishes after step n + 1: run one at a time, step 0 would wait forever."""
            if n + 1 < len(done):
                await done[n + 1].wait()
            finished.append(n)
            done[n].set()
            return f"step {n}"

        with anyio.fail_after(GUARD):
            await agent.ask("go")
    assert finished == [2, 1, 0]
    second = model.calls[1]
    assert [r.tool_use_id for r in results(second)] == asked_ids(second)
    assert [r.content for r in results(second)] == ["step 0", "step 1", "step 2"]


async def test_max_steps_then_one_summarising_call_without_tools(rt: micro.Runtime, notes: Notes) -> None:
    def forever(messages: list[Any], tools: list[Any]) -> scripted.Turn | str:
        return scripted.call("notes_Notes_Get", id="n1") if tools else "summary: nothing found"

    model = scripted.function(forever)
    async with agent_on(rt, model, max_steps=2) as agent:
        rsp = await agent.ask("find n1")
    assert len(model.calls) == 3
    assert model.calls[1].tool_names and model.calls[2].tool_names == []
    assert model.calls[2].messages[-1].text == SUMMARISE
    assert rsp.reply == "summary: nothing found"
    assert len(rsp.tool_calls) == 2


async def test_a_summary_that_still_calls_a_tool_leaves_no_dangling_call(rt: micro.Runtime, notes: Notes) -> None:
    model = scripted.function(lambda messages, tools: scripted.call("notes_Notes_Get", id="n1"))
    async with agent_on(rt, model, max_steps=1) as agent:
        rsp = await agent.ask("find n1")
        stored = await agent.history.messages()
    assert "stopped after 1 steps" in rsp.reply
    uses = [b.id for m in stored for b in m.content if isinstance(b, ToolUseBlock)]
    answered = [b.tool_use_id for m in stored for b in m.content if isinstance(b, ToolResultBlock)]
    assert uses == answered  # every remembered call has its result


async def test_loop_limit_stops_the_same_call_with_the_same_arguments(rt: micro.Runtime, notes: Notes) -> None:
    await notes.Create(CreateNote("a"))
    same = scripted.call("notes_Notes_Get", id="n1")
    model = scripted.turns(same, same, scripted.turn(same, scripted.call("notes_Notes_Get", id="n2")), "stop")
    async with agent_on(rt, model, loop_limit=2) as agent:
        rsp = await agent.ask("look n1 up again and again")
    assert [c.is_error for c in rsp.tool_calls] == [False, False, True, True]
    looped, other = results(model.calls[3])
    assert "already called 2 times" in looped.content
    assert "NotFound" in other.content  # different arguments: not limited, it ran (and found nothing)


async def test_tool_timeout_is_an_error_result_and_cancels_the_call(rt: micro.Runtime, probe: Probe) -> None:
    model = scripted.turns(scripted.call("probe_Probe_Wait", text="forever"), "gave up")
    async with agent_on(rt, model, services=("probe",), tool_timeout=0.05) as agent:
        rsp = await agent.ask("wait")
    (result,) = results(model.calls[1])
    assert result.is_error and "tool_timeout=0.05" in result.content
    assert probe.cancelled.is_set()
    assert rsp.reply == "gave up"


async def test_model_timeout_ends_the_run_with_timeout(rt: micro.Runtime) -> None:
    model = scripted.turns("too late", delay=GUARD)
    async with agent_on(rt, model, services=(), model_timeout=0.05) as agent:
        with pytest.raises(Timeout, match=r"model_timeout=0\.05"):
            await agent.ask("hello?")
        assert await agent.history.messages() == []  # a failed run is not remembered


def refuse_sync(tool: str, args: dict[str, Any]) -> tuple[bool, str]:
    if tool == "notes_Notes_Fail":
        return False, "failing is not allowed"
    if args.get("title") == "secret":
        return False, "secret titles need a human"
    return True, ""


async def refuse_async(tool: str, args: dict[str, Any]) -> tuple[bool, str]:
    await anyio.lowlevel.checkpoint()
    return refuse_sync(tool, args)


@pytest.mark.parametrize("approve", [refuse_sync, refuse_async], ids=["sync", "async"])
async def test_approve_refuses_by_tool_and_by_argument(rt: micro.Runtime, notes: Notes, approve: Any) -> None:
    model = scripted.turns(
        scripted.turn(
            scripted.call("notes_Notes_Create", title="public"),
            scripted.call("notes_Notes_Create", title="secret"),
            scripted.call("notes_Notes_Fail", id="n1"),
        ),
        "done",
    )
    async with agent_on(rt, model, approve=approve) as agent:
        rsp = await agent.ask("create two, fail one")
    allowed, secret, failing = results(model.calls[1])
    assert not allowed.is_error
    assert secret.is_error and "secret titles need a human" in secret.content
    assert failing.is_error and "failing is not allowed" in failing.content
    assert [n.title for n in notes.notes.values()] == ["public"]
    assert rsp.reply == "done"


async def test_an_approve_hook_that_raises_refuses(rt: micro.Runtime, notes: Notes) -> None:
    def broken(tool: str, args: dict[str, Any]) -> bool:
        raise KeyError("policy")

    model = scripted.turns(scripted.call("notes_Notes_Create", title="x"), "refused")
    async with agent_on(rt, model, approve=broken) as agent:
        rsp = await agent.ask("create")
    (result,) = results(model.calls[1])
    assert result.is_error and "not approved" in result.content
    assert notes.notes == {} and rsp.reply == "refused"


async def test_a_tool_that_raises_is_an_error_result(rt: micro.Runtime, notes: Notes) -> None:
    model = scripted.turns(
        scripted.turn(scripted.call("notes_Notes_Fail", id="n1"), scripted.call("explode"),
                      scripted.call("notes_Notes_Get", id="n404")),
        "all failed",
    )
    async with agent_on(rt, model) as agent:

        @agent.tool
        async def explode() -> str:
            """Raise."""
            raise ValueError("boom")

        rsp = await agent.ask("try")
    internal, raised, missing = results(model.calls[1])
    assert internal.is_error and internal.content.startswith("Internal:")
    assert "disk on fire" not in internal.content  # details stay in the service's log
    assert raised.is_error and "ValueError: boom" in raised.content
    assert missing.is_error and missing.content == "NotFound: no note 'n404'"
    assert rsp.reply == "all failed"


async def test_the_callers_deadline_reaches_tool_calls(rt: micro.Runtime, probe: Probe) -> None:
    model = scripted.turns(scripted.call("probe_Probe_Wait", text="slow"), "never")
    async with agent_on(rt, model, services=("probe",)) as agent:
        with anyio.fail_after(GUARD), pytest.raises(Timeout, match="deadline"):
            await agent.ask("wait for it", timeout=0.3)
    (remaining,) = probe.remaining
    assert remaining is not None and remaining <= 0.3  # the tool call inherited the ask's deadline
    assert probe.cancelled.is_set()


async def test_cancelling_an_ask_cancels_its_tool_calls(rt: micro.Runtime, probe: Probe) -> None:
    model = scripted.turns(
        scripted.turn(scripted.call("probe_Probe_Wait", text="a"), scripted.call("probe_Probe_Sleep", seconds=GUARD)),
        "never",
    )
    async with agent_on(rt, model, services=("probe",)) as agent:
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent.ask, "wait")
                await probe.started.wait()
                tg.cancel_scope.cancel()
            await probe.cancelled.wait()
        assert await agent.history.messages() == []


# -- 3. one agent, many asks at once -----------------------------------------------------------


def echo_script(messages: list[Any], tools: list[Any]) -> scripted.Turn | str:
    """Call ``shout`` with the user's words, then answer with what it returned."""
    last = messages[-1]
    done = [b for b in last.content if isinstance(b, ToolResultBlock)]
    if done:
        return f"heard {done[0].content}"
    return scripted.call("shout", text=last.text)


async def test_fifty_concurrent_asks_run_at_once_and_keep_their_own_replies(rt: micro.Runtime) -> None:
    model = scripted.function(echo_script, delay=0.2)
    async with agent_on(rt, model, services=()) as agent:

        @agent.tool
        async def shout(text: str) -> str:
            """Shout the text."""
            await anyio.lowlevel.checkpoint()
            return text.upper()

        t0 = time.perf_counter()
        single = await agent.ask("warm up", session="single")
        one = time.perf_counter() - t0
        replies: dict[int, ChatResponse] = {}

        async def ask(i: int) -> None:
            replies[i] = await agent.ask(f"ask number {i}", session=f"s{i}")

        t0 = time.perf_counter()
        with anyio.fail_after(GUARD * 3):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(ask, i)
        total = time.perf_counter() - t0
    assert single.reply == "heard WARM UP"
    for i in range(50):
        assert replies[i].reply == f"heard ASK NUMBER {i}"
        assert [msgspec.json.decode(c.input) for c in replies[i].tool_calls] == [{"text": f"ask number {i}"}]
    assert len({r.run_id for r in replies.values()}) == 50
    assert total < 10 * one, f"50 asks took {total:.2f}s, one took {one:.2f}s: runs wait for each other"


async def test_ten_parallel_tool_calls_take_about_as_long_as_one(rt: micro.Runtime, probe: Probe) -> None:
    nap = scripted.call("probe_Probe_Sleep", seconds=0.2)
    model = scripted.turns(nap, "one", scripted.turn(*[nap] * 10), "ten")
    async with agent_on(rt, model, services=("probe",), loop_limit=10) as agent:
        t0 = time.perf_counter()
        await agent.ask("one nap")
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        rsp = await agent.ask("ten naps")
        ten = time.perf_counter() - t0
    assert [c.is_error for c in rsp.tool_calls] == [False] * 10
    assert ten < 5 * 0.2, f"10 parallel calls of 0.2 s took {ten:.2f}s (one took {one:.2f}s)"


# -- 5. the agent is a service -----------------------------------------------------------------


async def test_the_agent_is_registered_as_a_service_with_its_metadata(rt: micro.Runtime) -> None:
    agent = micro.NewAgent(
        "task-mgr", micro.AgentServices("task", "project"),
        prompt="You manage tasks and projects.\nYou understand deadlines.",
        provider=scripted.turns(), runtime=rt,
    )
    async with agent:
        (record,) = await rt.registry.get("task-mgr")
    assert record.metadata["type"] == "agent"
    assert record.metadata["services"] == "task,project"
    assert record.metadata["prompt"] == "You manage tasks and projects."
    assert record.metadata["provider"] == "scripted"
    chat, stream = record.endpoint("Agent.Chat"), record.endpoint("Agent.StreamChat")
    assert chat is not None and stream is not None
    assert chat.path == "/micro.agent.Agent/Chat" and not chat.streaming
    assert stream.path == "/micro.agent.Agent/StreamChat" and stream.streaming
    assert "proto" in chat.wires


@pytest.mark.parametrize("where", ["in-process", "network"])
async def test_agent_chat_through_the_client(registry: MemoryRegistry, rt: micro.Runtime, notes: Notes,
                                             where: str) -> None:
    model = scripted.turns(
        scripted.call("notes_Notes_Create", title="buy milk"), "Created n1.",
        scripted.call("notes_Notes_Get", id="n1"), "n1 is buy milk.",
    )
    async with agent_on(rt, model), memory_runtime(registry) as other:
        caller = rt if where == "in-process" else other
        rsp = await caller.client.call("helper", "Agent.Chat", {"message": "note: buy milk", "parent_id": "p1"})
        typed = await caller.client.call("helper", "Agent.Chat", ChatRequest(message="what is n1?", session="s"),
                                         response_type=ChatResponse)
    assert rsp["reply"] == "Created n1." and rsp["agent"] == "helper" and rsp["parent_id"] == "p1"
    (call,) = rsp["tool_calls"]
    assert call["name"] == "notes_Notes_Create"
    assert msgspec.json.decode(call["input"]) == {"title": "buy milk"}
    assert msgspec.json.decode(call["result"])["title"] == "buy milk"
    assert isinstance(typed, ChatResponse) and typed.reply == "n1 is buy milk." and len(typed.run_id) == 32
    assert typed.tool_calls[0].name == "notes_Notes_Get"


@pytest.mark.parametrize("where", ["in-process", "network"])
async def test_agent_chat_times_out_with_the_callers_deadline(registry: MemoryRegistry, rt: micro.Runtime,
                                                              probe: Probe, where: str) -> None:
    model = scripted.turns(scripted.call("probe_Probe_Wait", text="slow"), "never")
    async with agent_on(rt, model, services=("probe",)), memory_runtime(registry) as other:
        caller = rt if where == "in-process" else other
        with anyio.fail_after(GUARD), pytest.raises(Timeout):
            await caller.client.call("helper", "Agent.Chat", {"message": "wait"}, timeout=0.3)
        with anyio.fail_after(GUARD):
            await probe.cancelled.wait()  # the deadline reached the tool call inside the agent


async def test_agent_chat_rejects_bad_requests(rt: micro.Runtime) -> None:
    async with agent_on(rt, scripted.turns(), services=()):
        with pytest.raises(BadRequest, match="empty"):
            await rt.client.call("helper", "Agent.Chat", {"message": "  "})
        with pytest.raises(BadRequest, match="session"):
            await rt.client.call("helper", "Agent.Chat", {"message": "hi", "session": "a/b"})


@pytest.mark.parametrize("where", ["in-process", "network", "agent.stream"])
async def test_stream_chat_yields_deltas_and_tool_events_during_the_run(
    registry: MemoryRegistry, rt: micro.Runtime, probe: Probe, where: str
) -> None:
    model = scripted.turns(
        scripted.turn("Let me check that.", scripted.call("probe_Probe_Wait", text="x")),
        "All done now.",
    )
    events: list[Any] = []
    async with agent_on(rt, model, services=("probe",)) as agent, memory_runtime(registry) as other:
        if where == "agent.stream":
            stream: AsyncIterator[Any] = agent.stream("check x")
        else:
            caller = rt if where == "in-process" else other
            stream = caller.client.stream("helper", "Agent.StreamChat", {"message": "check x"}, response_type=ChatEvent)
        with anyio.fail_after(GUARD):
            async for ev in stream:
                events.append(ev)
                if ev.type == "tool_start":
                    # the handler is held until now: had tool_start come after the tool
                    # finished, this would never happen and the guard would fail the test
                    probe.release.set()
    kinds = [e.type for e in events]
    start, end = kinds.index("tool_start"), kinds.index("tool_end")
    assert kinds[:start] == ["text"] * start and start >= 3  # word deltas, before the tool ran
    assert "".join(e.text for e in events[:start]) == "Let me check that."
    assert events[start].tool_call.name == "probe_Probe_Wait"
    assert events[end].tool_call.result == '{"text":"released x"}'
    assert kinds[end + 1:-1] == ["text"] * (len(kinds) - end - 2)
    assert "".join(e.text for e in events[end + 1:-1]) == "All done now."
    assert kinds[-1] == "done" and events[-1].response.reply == "All done now."
    assert all(e.agent == "helper" for e in events)


async def test_a_failing_stream_ends_with_an_error_event_then_raises(rt: micro.Runtime) -> None:
    async with agent_on(rt, scripted.turns(), services=()) as agent:
        events: list[ChatEvent] = []
        with anyio.fail_after(GUARD), pytest.raises(AgentError, match="no more turns"):
            async for ev in agent.stream("hello"):
                events.append(ev)
    assert [e.type for e in events] == ["error"] and "no more turns" in events[0].text


async def test_leaving_a_stream_early_cancels_the_run(rt: micro.Runtime, probe: Probe) -> None:
    model = scripted.turns(scripted.turn("Checking.", scripted.call("probe_Probe_Wait", text="x")), "never")
    async with agent_on(rt, model, services=("probe",)) as agent:
        with anyio.fail_after(GUARD):
            stream = agent.stream("check")
            async for ev in stream:
                if ev.type == "tool_start":
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            await probe.cancelled.wait()
