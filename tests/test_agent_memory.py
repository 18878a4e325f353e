"""Agent memory (issue 4, point 4): one store record per message, windows, sessions, restarts.

The restart test runs the agent in two separate processes that share only the
file store under the test's ``MICRO_HOME``: the second one's scripted model
checks that it was sent the first one's exchange.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.agent import StoreMemory
from micro.ai import Message, TextBlock, ToolResultBlock, ToolUseBlock, scripted
from micro.ai.scripted import ScriptedModel
from micro.store import Record, Store
from micro.store import from_url as store_from_url
from micro.store.memory import MemoryStore

GUARD = 30.0  # seconds: a deadlock guard, never a timing assertion
BASE = "agent/memo/history"


class CountingStore(MemoryStore):
    """A memory store that counts what reaches the backend."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.gets = 0
        self.prefix_reads: list[int | None] = []  # the limit of each prefix read
        self.lists = 0

    async def _get(self, key: str, now: float) -> Record | None:
        self.gets += 1
        return await super()._get(key, now)

    async def _put(self, record: Record, if_version: int | None) -> int:
        self.writes += 1
        return await super()._put(record, if_version)

    async def _read_prefix(self, prefix: str, now: float, limit: int | None, offset: int,
                           reverse: bool) -> list[Record]:
        self.prefix_reads.append(limit)
        return await super()._read_prefix(prefix, now, limit, offset, reverse)

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        self.lists += 1
        return await super()._list(prefix, now, limit, offset, reverse)


def remembering(messages: list[Message], tools: list[Any]) -> scripted.Turn | str:
    """Answer "note ..." by calling the ``note`` tool first; anything else directly."""
    last = messages[-1]
    results = [b for b in last.content if isinstance(b, ToolResultBlock)]
    if results:
        return f"noted: {results[0].content}"
    if last.text.startswith("note "):
        return scripted.call("note", text=last.text.removeprefix("note "))
    return f"reply to {last.text}"


async def note(text: str) -> str:
    """Write something down."""
    return text.upper()


def memo_agent(rt: micro.Runtime, model: ScriptedModel, **options: Any) -> micro.Agent:
    agent = micro.Agent("memo", provider=model, runtime=rt, **options)
    agent.tool(note)
    return agent


@pytest.fixture
async def rt() -> AsyncIterator[micro.Runtime]:
    async with micro.Runtime(registry="memory://", store=CountingStore(), broker="memory://") as runtime:
        yield runtime


def texts(messages: list[Message]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in messages:
        for b in m.content:
            if isinstance(b, TextBlock):
                out.append((m.role, b.text))
            elif isinstance(b, ToolUseBlock):
                out.append((m.role, f"use {b.name}"))
            else:
                out.append((m.role, f"result {b.content}"))
    return out


async def test_every_message_is_one_record_appended_per_ask(rt: micro.Runtime) -> None:
    store = rt.store
    assert isinstance(store, CountingStore)
    model = scripted.function(remembering)
    async with memo_agent(rt, model) as agent:
        await agent.ask("hello")
        assert await store.list(f"{BASE}/") == [f"{BASE}/#000000000001", f"{BASE}/#000000000002"]
        await agent.ask("note buy milk")  # user, tool call, tool result, answer
        keys = await store.list(f"{BASE}/")
        assert keys == [f"{BASE}/#{n:012d}" for n in range(1, 7)]
        stored = [msgspec.json.decode(r.value, type=Message) for r in await store.read(f"{BASE}/", prefix=True)]
        assert texts(stored) == [
            ("user", "hello"), ("assistant", "reply to hello"),
            ("user", "note buy milk"), ("assistant", "use note"), ("user", "result BUY MILK"),
            ("assistant", "noted: BUY MILK"),
        ]
        assert stored == await agent.history.messages()

        for i in range(20):
            await agent.ask(f"note item {i}")
        writes, gets, reads, lists = store.writes, store.gets, len(store.prefix_reads), store.lists
        await agent.ask("note one more")
        # the 22nd ask costs what a short conversation's does: four message writes, the head, three of the
        # run record (its checkpoint: after the turn that asked for the tool, at the tool's result, at the
        # end); reads: the head for the window (its 50 messages, history_limit, are the ones this process
        # wrote: kept decoded), the head again for the append; one listing of the session's waiting runs
        # (none); nothing lists or scans the conversation
        assert (store.writes - writes, len(store.prefix_reads) - reads, store.lists - lists) == (8, 0, 1)
        assert store.gets - gets == 1 + 1
        expected = await agent.history.window("")
        assert len(expected) == 48  # the last 50 messages, from the first that starts a run

        # another replica (a memory of its own on the same store) reads the 50 messages once, then holds them
        replica = StoreMemory(50).bind(store, "memo", model)
        gets = store.gets
        assert await replica.window("") == expected
        assert store.gets - gets == 1 + 50
        await agent.ask("note and another")  # appended by the first: the replica reads only those four
        gets = store.gets
        window = await replica.window("")
        assert store.gets - gets == 1 + 4
        assert window == await agent.history.window("") == expected[4:] + (await agent.history.messages())[-4:]

        # forgotten and started afresh by the replica: the first one holds other messages under the same
        # keys (#1, #2, …), from the session's previous head; it reads the new ones
        await agent.ask("hello", session="s")
        assert texts(await agent.history.window("s")) == [("user", "hello"), ("assistant", "reply to hello")]
        await replica.forget("s")
        again = [Message.user("hello again"), Message.assistant("hi again")]
        await replica.append("s", again)
        assert await agent.history.window("s") == again
        assert await agent.history.messages("s") == again


async def test_the_window_holds_history_limit_messages_and_never_starts_on_a_tool_result(
    rt: micro.Runtime,
) -> None:
    model = scripted.function(remembering)
    async with memo_agent(rt, model, history_limit=4) as agent:
        await agent.ask("note q1")  # 4 messages: q1, tool call, tool result, answer
        await agent.ask("q2")
        assert texts(model.calls[-1].messages) == [
            ("user", "note q1"), ("assistant", "use note"), ("user", "result Q1"), ("assistant", "noted: Q1"),
            ("user", "q2"),
        ]
        await agent.ask("q3")
        # the last 4 stored start with q1's tool result: the window starts at the next user text
        assert texts(model.calls[-1].messages) == [("user", "q2"), ("assistant", "reply to q2"), ("user", "q3")]
        await agent.ask("note q4")
        await agent.ask("q5")
        # the last 4: q3's answer, q4, its call, its result, its answer -> starts at q4
        assert texts(model.calls[-1].messages)[0] == ("user", "note q4")
    for call in model.calls:
        first = call.messages[0]
        assert first.role == "user" and not any(isinstance(b, ToolResultBlock) for b in first.content)
        assert len(call.messages) <= 4 + 1 + 2  # window + the new message + this run's own turns


async def test_sessions_are_separate_conversations(rt: micro.Runtime) -> None:
    model = scripted.function(remembering)
    async with memo_agent(rt, model) as agent:
        await agent.ask("in a", session="a")
        await agent.ask("in b", session="b")
        await agent.ask("in default")
        await agent.ask("again a", session="a")
        assert texts(model.calls[-1].messages) == [("user", "in a"), ("assistant", "reply to in a"),
                                                   ("user", "again a")]
        await agent.ask("again default")
        assert texts(model.calls[-1].messages)[0] == ("user", "in default")
        assert len(await rt.store.list(f"{BASE}/a/#")) == 4
        assert len(await rt.store.list(f"{BASE}/b/#")) == 2
        assert len(await rt.store.list(f"{BASE}/#")) == 4
        await agent.forget("a")
        assert await agent.history.messages("a") == []
        assert len(await agent.history.messages("b")) == 2


async def test_concurrent_asks_in_one_session_neither_clobber_nor_interleave() -> None:
    # the file store really waits on I/O, so concurrent appends overlap
    async with micro.Runtime(registry="memory://", store="file://", broker="memory://") as rt:
        model = scripted.function(remembering)
        async with memo_agent(rt, model) as agent:
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(agent.ask, f"note n{i}")
            stored = await agent.history.messages()
    assert len(stored) == 8 * 4
    seen = set()
    for k in range(0, len(stored), 4):
        run = texts(stored[k:k + 4])
        word = run[0][1].removeprefix("note ")
        assert run == [("user", f"note {word}"), ("assistant", "use note"), ("user", f"result {word.upper()}"),
                       ("assistant", f"noted: {word.upper()}")]
        call, result = stored[k + 1].content[0], stored[k + 2].content[0]
        assert isinstance(call, ToolUseBlock) and isinstance(result, ToolResultBlock)
        assert call.id == result.tool_use_id
        seen.add(word)
    assert seen == {f"n{i}" for i in range(8)}


def bound(store: Store, agent: str = "memo", **options: Any) -> StoreMemory:
    return StoreMemory(**options).bind(store, agent, scripted.function(remembering))


async def test_the_window_drops_a_tool_call_whose_result_was_never_stored(rt: micro.Runtime) -> None:
    # what a process killed between two writes of an append leaves behind
    history = bound(rt.store)
    await history.append("", [
        Message.user("note x"),
        Message.assistant("Writing it down.", ToolUseBlock("call_9", "note", {"text": "x"})),
    ])
    model = scripted.function(remembering)
    async with memo_agent(rt, model) as agent:
        await agent.ask("still there?")
    sent = model.calls[0].messages
    assert texts(sent) == [("user", "note x"), ("assistant", "Writing it down."), ("user", "still there?")]
    assert not any(isinstance(b, ToolUseBlock | ToolResultBlock) for m in sent for b in m.content)


async def test_history_is_appended_after_existing_records(rt: micro.Runtime) -> None:
    # a new memory (a restarted agent) continues the numbering it finds in the store
    first = bound(rt.store)
    await first.append("s", [Message.user("one"), Message.assistant("two")])
    second = bound(rt.store)
    await second.append("s", [Message.user("three")])
    assert await rt.store.list(f"{BASE}/s/") == [f"{BASE}/s/#{n:012d}" for n in (1, 2, 3)]
    assert [m.text for m in await second.window("s", 2)] == ["three"]  # "two" is an assistant turn


RESTART_SCRIPT = textwrap.dedent('''
    """One life of the agent: ask, print the reply, exit. The store is the file store under MICRO_HOME."""
    import asyncio
    import sys

    import micro
    from micro.ai import ToolResultBlock, ToolUseBlock, scripted

    def first_life(messages, tools):
        results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
        if results:
            return "I will remember that your locker code is " + results[0].content + "."
        return scripted.turn("Saving it.", scripted.call("remember", fact="locker 4711"))

    def second_life(messages, tools):
        said = [(m.role, m.text) for m in messages]
        assert said[0] == ("user", "My locker code is 4711."), said
        assert any(isinstance(b, ToolUseBlock) and b.input == {"fact": "locker 4711"}
                   for m in messages for b in m.content), "the tool call was not remembered"
        assert ("assistant", "I will remember that your locker code is LOCKER 4711.") in said, said
        assert said[-1] == ("user", "What is my locker code?"), said
        return "Your locker code is 4711."

    async def main(life):
        model = scripted.function(first_life if life == "first" else second_life)
        async with micro.Runtime(registry="memory://", store="file://", broker="memory://") as rt:
            agent = micro.Agent("memo", provider=model, runtime=rt)

            @agent.tool
            async def remember(fact: str) -> str:
                """Remember a fact."""
                return fact.upper()

            async with agent:
                question = "My locker code is 4711." if life == "first" else "What is my locker code?"
                rsp = await agent.ask(question)
        print("REPLY:", rsp.reply)

    asyncio.run(main(sys.argv[1]))
''')


async def test_memory_survives_a_restart_in_a_new_process(tmp_path: Path, micro_home: Path) -> None:
    script = tmp_path / "life.py"
    script.write_text(RESTART_SCRIPT)
    env = {**os.environ, "MICRO_HOME": str(micro_home)}

    async def life(which: str) -> str:
        with anyio.fail_after(GUARD):
            done = await anyio.run_process([sys.executable, str(script), which], env=env, cwd=tmp_path, check=False)
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == 0, f"{which} life failed:\n{err}"
        return out

    assert "REPLY: I will remember that your locker code is LOCKER 4711." in await life("first")
    store: Store = store_from_url("file://")
    async with store:
        assert len(await store.list(f"{BASE}/#")) == 4  # question, tool call, tool result, answer
    assert "REPLY: Your locker code is 4711." in await life("second")
    async with store:
        assert len(await store.list(f"{BASE}/#")) == 6
