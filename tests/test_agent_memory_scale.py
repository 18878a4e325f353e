"""Agent memory at scale (issue 21): replicas sharing a conversation, reads that do not grow,
compaction, forgetting, retention and bad input, on every store backend.

The replica test runs two OS processes serving one agent over real PostgreSQL and real
NATS (the session fixtures in ``_servers.py``): 200 concurrent chats into one session and
200 into the default conversation, split across both processes, which start together (and
50 + 50 over the file store, across processes of one machine).
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.agent import Memory, StoreMemory
from micro.ai import Message, TextBlock, ToolResultBlock, ToolUseBlock, scripted
from micro.errors import AgentError, BadRequest, Conflict, UsageError
from micro.store import Record, Store
from micro.store.file import FileStore
from micro.store.memory import MemoryStore
from micro.store.nats import NatsStore
from micro.store.postgres import PostgresStore
from micro.testing.store_kit import Clock

GUARD = 120.0  # seconds: a deadlock guard, never a timing assertion


def remembering(messages: list[Message], tools: list[Any]) -> scripted.Turn | str:
    """Answer "note ..." with a call of the ``note`` tool first; anything else directly."""
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


def memo_agent(rt: micro.Runtime, model: scripted.ScriptedModel, **options: Any) -> micro.Agent:
    agent = micro.Agent("memo", provider=model, runtime=rt, **options)
    agent.tool(note)
    return agent


@pytest.fixture(params=["memory", "file", "postgres", "nats"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """New stores of one backend on one fresh database (two calls: two handles on the same data)."""
    database = f"mem-{uuid.uuid4().hex[:12]}"
    if request.param == "memory":
        shared = MemoryStore(database=database)
        return lambda: shared
    if request.param == "file":
        root = (tmp_path / "store").as_uri()
        return lambda: FileStore(root, database=database)
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: PostgresStore(url, database=database)
    url = request.getfixturevalue("nats_url")
    return lambda: NatsStore(url, database=database)


def bound(store: Store, **options: Any) -> StoreMemory:
    return StoreMemory(**options).bind(store, "memo", scripted.function(remembering))


def run_of(i: int, tag: str = "") -> list[Message]:
    """One run's messages: a question, a tool call, its result, an answer."""
    return [Message.user(f"note {tag}{i}"),
            Message.assistant(ToolUseBlock(f"call_{tag}{i}", "note", {"text": f"{tag}{i}"})),
            Message.user(ToolResultBlock(f"call_{tag}{i}", f"{tag}{i}".upper())),
            Message.assistant(f"noted: {tag}{i}")]


# -- replicas ---------------------------------------------------------------------------------


async def test_replicas_append_to_one_session_without_losing_or_interleaving(
    make_store: Callable[[], Store],
) -> None:
    """Two memories (as two replicas would hold) on two store handles append 2 x 25 runs at once."""
    async with make_store() as one, make_store() as two:
        a, b = bound(one), bound(two)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(a.append, "s", run_of(i, "a"))
                    tg.start_soon(b.append, "s", run_of(i, "b"))
        stored = await a.messages("s")
        assert len(stored) == 200
        blocks = [stored[k:k + 4] for k in range(0, 200, 4)]
        tags = [block[0].text.removeprefix("note ") for block in blocks]
        for tag, block in zip(tags, blocks, strict=True):
            assert block == run_of(int(tag[1:]), tag[0]), block  # each run whole and contiguous
        assert sorted(tags) == sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25)])
        assert await b.messages("s") == stored


async def test_a_conversation_written_before_heads_is_read_and_continued() -> None:
    """Messages stored by an older micro (no head record) are the window; appends go after them."""
    async with MemoryStore() as store:
        for seq, m in enumerate(run_of(1), 1):
            await store.write(Record(f"agent/memo/history/s/#{seq:012d}", msgspec.json.encode(m)))
        memory = bound(store)
        assert await memory.window("s") == run_of(1)
        await memory.append("s", run_of(2))
        assert await store.list("agent/memo/history/s/") == [f"agent/memo/history/s/#{n:012d}" for n in range(1, 9)]
        assert await memory.messages("s") == run_of(1) + run_of(2)


class CountingStore(MemoryStore):
    """Counts point reads, prefix reads and listings."""

    gets = prefix_reads = lists = 0

    async def _get(self, key: str, now: float) -> Record | None:
        self.gets += 1
        return await super()._get(key, now)

    async def _read_prefix(self, prefix: str, now: float, limit: int | None, offset: int,
                           reverse: bool) -> list[Record]:
        self.prefix_reads += 1
        return await super()._read_prefix(prefix, now, limit, offset, reverse)

    async def _list(self, prefix: str, now: float, limit: int | None, offset: int, reverse: bool) -> list[str]:
        self.lists += 1
        return await super()._list(prefix, now, limit, offset, reverse)


async def test_a_window_read_costs_the_window_not_the_conversation() -> None:
    async with CountingStore() as store:
        memory = bound(store, window=8, compact_at=0)
        costs = []
        for target in (3, 300):
            while (len(await memory.messages("s")) // 4) < target:
                await memory.append("s", run_of(len(await memory.messages("s")) // 4))
            for reader in (bound(store, window=8), memory):  # a process that holds none of it, the writer
                before = (store.gets, store.prefix_reads, store.lists)
                window = await reader.window("s")
                costs.append((store.gets - before[0], store.prefix_reads - before[1], store.lists - before[2]))
                assert window == run_of(target - 2) + run_of(target - 1)
        # the head, then the 8 messages of the window (none: the writer holds what it wrote)
        assert costs[0] == costs[2] == (1 + 8, 0, 0)
        assert costs[1] == costs[3] == (1, 0, 0)


async def test_an_ask_whose_session_is_forgotten_while_it_appends_fails_and_its_run_keeps_the_messages() -> None:
    store = MemoryStore()
    late = Gate(store, "late question")
    async with micro.Runtime(registry="memory://", store=store, broker="memory://") as rt:
        async with memo_agent(rt, scripted.function(remembering)) as agent:
            other = bound(rt.store)
            failed: list[Conflict] = []

            async def ask() -> None:
                try:
                    await agent.ask("late question", session="s")
                except Conflict as exc:
                    failed.append(exc)

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask)
                    await late.reached.wait()  # the reply is made; its messages are being appended
                    await other.forget("s")
                    await other.append("s", run_of(1, "new"))
                    late.go.set()
            [conflict] = failed
            assert "session 's' was forgotten" in str(conflict)
            [run] = await agent.runs.list(10, session="s")
            assert (run.status, run.error_kind) == ("failed", "Conflict") and "was forgotten" in run.error
            assert [m.text for m in run.messages] == ["late question", "reply to late question"]
            assert await agent.history.window("s") == run_of(1, "new")


async def test_a_late_append_to_a_forgotten_session_that_nobody_started_again_is_not_read() -> None:
    async with MemoryStore() as store:
        late = Gate(store, "late")
        a, b = bound(store), bound(store)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.append, "s", run_of(1, "late"))
                await late.reached.wait()
                await b.forget("s")
                late.go.set()
        assert len(await store.list("agent/memo/history/s/")) == 4  # written after the forget: no head
        assert await b.window("s") == await b.messages("s", archived=True) == []
        await b.append("s", run_of(2))  # numbered after them, under a new head
        assert await bound(store).window("s") == await b.messages("s", archived=True) == run_of(2)


async def test_messages_survive_an_older_micro_rewriting_the_head_during_a_rolling_upgrade() -> None:
    """An older micro appends too (its head has no epoch, its records no tag): nothing is hidden."""
    async with MemoryStore() as store:
        memory = bound(store, compact_at=0)
        await memory.append("s", run_of(1))
        [rec] = await store.read("agent/memo/memory/s")
        head = msgspec.json.decode(rec.value)
        for seq, m in enumerate(run_of(2), head["next"]):  # as an older micro appends: no epoch anywhere
            await store.write(Record(f"agent/memo/history/s/#{seq:012d}", msgspec.json.encode(m)))
        await store.write(Record("agent/memo/memory/s", msgspec.json.encode(
            {"next": head["next"] + 4, "start": 1, "summary": 0})), if_version=rec.version)
        await memory.append("s", run_of(3))
        everything = run_of(1) + run_of(2) + run_of(3)
        assert await bound(store, window=12).window("s") == await memory.messages("s") == everything


async def test_a_process_keeps_the_window_of_its_most_recent_sessions_only() -> None:
    async with CountingStore() as store:
        memory = bound(store, window=4, compact_at=0, cached_sessions=2)
        for session in ("a", "b", "c"):
            await memory.append(session, run_of(1, session))

        async def cost(session: str, runs: int = 1) -> int:
            gets = store.gets
            window = await memory.window(session, None if runs == 1 else 4 * runs)
            assert window == [m for i in range(1, runs + 1) for m in run_of(i, session)]
            return store.gets - gets

        assert await cost("c") == await cost("b") == 1  # the head: the 4 messages are held
        assert await cost("a") == 1 + 4  # evicted by the third session: read again, and held since
        assert await cost("a") == 1
        assert await cost("c") == 1 + 4  # "a" and "b" were used since: "c" went
        for i in (2, 3):
            await memory.append("a", run_of(i, "a"))
        # appends keep at most twice the window (then the window): the runs before the last are read again
        assert await cost("a", 3) == 1 + 8
        nothing = bound(store, window=4, compact_at=0, cached_sessions=0)
        for _ in range(2):
            gets = store.gets
            assert await nothing.window("c") == run_of(1, "c")
            assert store.gets - gets == 1 + 4  # keeps nothing: reads the window every time
        with pytest.raises(UsageError, match="cached_sessions must be 0 or more"):
            StoreMemory(cached_sessions=-1)


async def test_a_head_written_by_an_older_micro_is_read_and_given_an_epoch() -> None:
    """An older micro's head has no epoch: nothing is kept under it; the next append gives it one."""
    async with CountingStore() as store:
        for seq, m in enumerate(run_of(1), 1):
            await store.write(Record(f"agent/memo/history/s/#{seq:012d}", msgspec.json.encode(m)))
        await store.write(Record("agent/memo/memory/s", b'{"next":5,"start":1,"summary":0}'))
        memory = bound(store, window=8, compact_at=0)
        for _ in range(2):
            gets = store.gets
            assert await memory.window("s") == run_of(1)
            assert store.gets - gets == 1 + 4  # not kept: another process of the older micro may forget it
        await memory.append("s", run_of(2))
        [head] = await store.read("agent/memo/memory/s")
        assert msgspec.json.decode(head.value)["epoch"] and msgspec.json.decode(head.value)["next"] == 9
        gets = store.gets
        assert await memory.window("s") == run_of(1) + run_of(2)
        assert store.gets - gets == 1 + 4  # the older messages once, the appended ones were kept
        gets = store.gets
        assert await memory.window("s") == run_of(1) + run_of(2)
        assert store.gets - gets == 1


async def test_editing_a_window_or_an_appended_list_changes_nothing_kept() -> None:
    async with MemoryStore() as store:
        memory = bound(store, compact_at=0)
        appended = run_of(1)
        await memory.append("s", appended)
        appended[0].content.append(TextBlock(" (edited after the append)"))
        window = await memory.window("s")
        window[0].content.append(TextBlock(" (edited by a model adapter)"))
        window.pop()
        assert await memory.window("s") == await bound(store).window("s") == run_of(1)



# -- compaction ---------------------------------------------------------------------------------


async def test_compaction_with_the_scripted_model_summarises_archives_and_starts_the_window() -> None:
    model = scripted.function(remembering)
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        memory = StoreMemory(window=6, compact_at=10, keep=4)
        async with memo_agent(rt, model, memory=memory) as agent:
            for i in range(3):
                await agent.ask(f"note n{i}")  # 12 messages: past compact_at
            history = agent.history
            assert isinstance(history, StoreMemory)
            await history.settle()
            summarised = [c for c in model.calls if c.system == micro.ai.SUMMARISE_PROMPT]
            assert len(summarised) == 1
            live = await history.messages()
            summary = live[0]
            assert summary.role == "user" and summary.text == (
                "[Summary of the earlier conversation, messages 1-8]\n"
                "[scripted summary of 2 user lines] note n0 | note n1")
            assert live[1:] == await history.messages(limit=4)  # the last run stays live
            assert live[1].text == "note n2"
            everything = await history.messages(archived=True)
            assert [m.text for m in everything if m.text.startswith("note ")] == ["note n0", "note n1", "note n2"]
            assert everything[8] == summary and len(everything) == 13  # the summary before the first kept message
            await agent.ask("what now?")
            sent = [c for c in model.calls if c.system != micro.ai.SUMMARISE_PROMPT][-1].messages
            assert sent[0] == summary and sent[1].text == "note n2" and sent[-1].text == "what now?"


async def test_compaction_runs_after_the_reply_and_a_cancelled_one_changes_nothing() -> None:
    release = anyio.Event()
    started = anyio.Event()

    async def slow_summary(messages: list[Message]) -> str:
        started.set()
        await release.wait()
        return "the gist"

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        memory = StoreMemory(window=50, compact_at=5, keep=2, summariser=slow_summary)
        async with memo_agent(rt, scripted.function(remembering), memory=memory) as agent:
            await agent.ask("note a")
            with anyio.fail_after(GUARD):
                rsp = await agent.ask("note b")  # 8 messages: a compaction starts, the reply does not wait for it
                await started.wait()
            assert rsp.reply == "noted: B"
            before = await agent.history.messages(archived=True)
            assert await agent.history.messages() == before  # nothing folded yet
            await agent.history.aclose()  # the agent stopping cancels it
            assert isinstance(agent.history, StoreMemory)
            await agent.history.settle()
            assert await agent.history.messages() == before
            release.set()
            assert await agent.history.compact("") is True  # on the caller's time when asked directly
            assert (await agent.history.messages())[0].text.endswith("the gist")


@pytest.mark.parametrize("bad", ["", "   ", None, 42, "raise"])
async def test_a_summariser_that_fails_or_returns_garbage_changes_nothing(
    bad: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    def summariser(messages: list[Message]) -> Any:
        if bad == "raise":
            raise RuntimeError("model down")
        return bad

    async with MemoryStore() as store:
        memory = bound(store, compact_at=5, keep=2, summariser=summariser)
        for i in range(3):
            await memory.append("", run_of(i))  # the third append compacts inline (no task group) and logs
        assert "compacting session '' failed, the history is unchanged" in caplog.text
        before = ([r.key for r in await store.read("", prefix=True)], await memory.messages())
        with pytest.raises(AgentError, match="summariser"):
            await memory.compact("")
        assert ([r.key for r in await store.read("", prefix=True)], await memory.messages()) == before
        assert len(before[1]) == 12


async def test_the_cut_never_separates_a_tool_call_from_its_result() -> None:
    async with MemoryStore() as store:
        memory = bound(store, compact_at=9, keep=3, summariser=lambda ms: f"{len(ms)} folded")
        for i in range(3):
            await memory.append("", run_of(i))
        # next=13, keep=3 would cut at 10 (a tool call); the cut moves back to run 2's start (9)
        live = await memory.messages()
        assert live[0].text.endswith("8 folded") and live[1:] == run_of(2)


async def test_two_replicas_compacting_at_once_leave_one_summary() -> None:
    async with MemoryStore() as store:
        writer = bound(store, compact_at=0)
        for i in range(3):
            await writer.append("", run_of(i))
        entered = [anyio.Event(), anyio.Event()]
        go = anyio.Event()

        def replica(n: int) -> StoreMemory:
            async def summariser(messages: list[Message]) -> str:
                entered[n].set()
                await go.wait()  # both have read the head before either commits
                return f"replica {n}"
            return bound(store, compact_at=9, keep=4, summariser=summariser)

        done: list[bool] = []

        async def compact(memory: StoreMemory) -> None:
            done.append(await memory.compact(""))

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(compact, replica(0))
                tg.start_soon(compact, replica(1))
                await entered[0].wait()
                await entered[1].wait()
                go.set()
        assert sorted(done) == [False, True]
        live = await writer.messages()
        assert live[0].text.split("\n", 1)[1] in ("replica 0", "replica 1") and live[1:] == run_of(2)
        assert len(await store.list("agent/memo/memory/#/summary/")) == 1


async def test_a_compaction_that_ends_after_a_forget_and_a_new_start_puts_nothing_back() -> None:
    async with MemoryStore() as store:
        writer = bound(store, compact_at=0)
        for i in range(3):
            await writer.append("s", run_of(i, "old"))
        summarising, go = anyio.Event(), anyio.Event()

        async def summariser(messages: list[Message]) -> str:
            summarising.set()
            await go.wait()
            return " ".join(m.text for m in messages)

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                done: list[bool] = []

                async def compact() -> None:
                    done.append(await bound(store, compact_at=9, keep=4, summariser=summariser).compact("s"))

                tg.start_soon(compact)
                await summarising.wait()  # it read the head: start 1, as the new head's will be
                await writer.forget("s")
                for i in range(3):
                    await writer.append("s", run_of(i, "new"))
                go.set()
        assert done == [False]
        fresh = bound(store, compact_at=0)
        new = [m for i in range(3) for m in run_of(i, "new")]
        assert await fresh.window("s") == await fresh.messages("s", archived=True) == new
        assert await store.list("agent/memo/memory/s/") == []  # its summary deleted again


class Gate:
    """Holds a store's writes of message records whose text holds ``tag`` until ``go`` is set."""

    def __init__(self, store: Store, tag: str) -> None:
        self.reached, self.go = anyio.Event(), anyio.Event()
        write = store.write

        async def gated(record: Record, **options: Any) -> int:
            if "/history/" in record.key and tag.encode() in record.value:
                self.reached.set()
                await self.go.wait()
            return await write(record, **options)

        store.write = gated  # type: ignore[method-assign]


async def test_an_append_reserved_before_a_forget_does_not_overwrite_the_new_conversation(
    make_store: Callable[[], Store],
) -> None:
    """A reserves #1-#4, stalls; the session is forgotten and started afresh (#1-#4 again); A writes late."""
    async with make_store() as store:
        late, new = Gate(store, "late"), Gate(store, "new")
        a, b, c = bound(store), bound(store), bound(store)
        new.go.set()
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                failed: list[Exception] = []

                async def append_late() -> None:
                    try:
                        await a.append("s", run_of(1, "late"))
                    except Conflict as exc:
                        failed.append(exc)

                tg.start_soon(append_late)
                await late.reached.wait()  # reserved under the old head, nothing written yet
                await b.forget("s")
                await c.append("s", run_of(2, "new"))
                late.go.set()
        [conflict] = failed  # not acknowledged: the caller is told, and what is lost is named
        assert "session 's' was forgotten" in str(conflict) and "4 new messages were not remembered" in str(conflict)
        for memory in (a, b, c, bound(store)):
            assert await memory.window("s") == await memory.messages("s") == run_of(2, "new")


async def test_a_late_append_to_a_forgotten_session_is_never_read_as_the_new_ones(
    make_store: Callable[[], Store],
) -> None:
    """A writes its block after the forget but before the new start's writer: its records are leftovers of the
    old head, which no window takes for messages, and the new writer writes over them."""
    async with make_store() as store:
        late, new = Gate(store, "late"), Gate(store, "new")
        a, b, c, reader = bound(store), bound(store), bound(store), bound(store)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                appended = anyio.Event()

                async def append_late() -> None:
                    await a.append("s", run_of(1, "late"))  # (taken to be before the forget, which deletes it)
                    appended.set()

                tg.start_soon(append_late)
                await late.reached.wait()
                await b.forget("s")
                tg.start_soon(c.append, "s", run_of(2, "new"))
                await new.reached.wait()  # c reserved #1-#4 under a new head, wrote nothing yet
                late.go.set()
                await appended.wait()
                assert len(await store.list("agent/memo/history/s/")) == 4  # a's, under the keys of c's block
                assert await reader.window("s") == await reader.messages("s") == []
                new.go.set()
        for memory in (a, b, c, reader, bound(store)):
            assert await memory.window("s") == await memory.messages("s", archived=True) == run_of(2, "new")


# -- forget, retention -----------------------------------------------------------------------------


async def test_forget_deletes_a_session_on_every_backend(make_store: Callable[[], Store]) -> None:
    async with micro.Runtime(registry="memory://", store=make_store(), broker="memory://") as rt:
        memory = StoreMemory(window=10, compact_at=5, keep=2)
        async with memo_agent(rt, scripted.function(remembering), memory=memory) as agent:
            assert isinstance(agent.history, StoreMemory)
            for i in range(3):
                await agent.ask(f"note a{i}", session="alice")
                await agent.ask(f"note b{i}", session="bob")
                await agent.history.settle()  # a compaction due while one runs waits for the next append
            kept = await agent.history.messages("alice", archived=True)
            assert len(kept) == 14 and kept[4].text.startswith("[Summary")  # compacted after runs 2 and 3
            await agent.forget("alice")
            store = rt.store
            assert await store.list("agent/memo/history/alice/") == []
            assert await store.list("agent/memo/memory/alice") == []
            assert await agent.runs.list(100, session="alice") == []
            assert await agent.history.messages("alice", archived=True) == []
            assert await agent.history.window("alice") == []
            assert len(await agent.history.messages("bob", archived=True)) == 14  # bob untouched
            assert len(await agent.runs.list(100, session="bob")) == 3
            await agent.ask("hello again", session="alice")  # a forgotten session starts afresh
            assert [m.text for m in await agent.history.messages("alice")] == ["hello again", "reply to hello again"]


async def test_retention_expires_old_messages_and_idle_sessions(make_store: Callable[[], Store]) -> None:
    store = make_store()
    clock = Clock()
    store.clock = clock
    async with store:
        memory = bound(store, retention=100, compact_at=0)
        await memory.append("s", run_of(1))
        clock.advance(60)
        await memory.append("s", run_of(2))
        assert await memory.messages("s") == run_of(1) + run_of(2)
        clock.advance(50)  # run 1 is 110 s old, run 2 50 s
        assert await memory.window("s") == run_of(2)
        clock.advance(60)  # the session was idle for 110 s: nothing of it is left
        assert await memory.messages("s", archived=True) == []
        assert await store.list("agent/memo/") == []
        await memory.append("s", run_of(3))
        assert await memory.window("s") == run_of(3)


async def test_retention_expires_finished_run_records_and_keeps_waiting_ones() -> None:
    """A run record holds the run's messages: with retention, a finished one goes as the history does;
    one that waits for approval stays until it ends (then it is kept ``retention`` more)."""
    store = MemoryStore()
    clock = Clock()
    store.clock = clock
    async with micro.Runtime(registry="memory://", store=store, broker="memory://") as rt:
        async with memo_agent(rt, scripted.function(remembering), needs_approval=["note"],
                              memory=StoreMemory(retention=100)) as agent:
            done = await agent.ask("hello")
            waiting = await agent.ask("note milk")
            assert (done.status, waiting.status) == ("completed", "paused")
            clock.advance(110)
            assert await agent.runs.get(done.run_id) is None
            assert (await agent.runs.get(waiting.run_id)).status == "paused"  # type: ignore[union-attr]
            finished = await agent.resume(waiting.run_id, approve=True)
            assert finished.reply == "noted: MILK"
            clock.advance(90)
            assert await agent.runs.get(waiting.run_id) is not None
            clock.advance(20)
            assert await agent.runs.get(waiting.run_id) is None


# -- bad input -----------------------------------------------------------------------------------


async def test_bad_sessions_and_options_are_refused_clearly() -> None:
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        async with memo_agent(rt, scripted.function(remembering)) as agent:
            for session, why in [("a/b", "'/' and '#'"), ("a#b", "'/' and '#'"), ("tab\there", "control"),
                                 ("nul\x00", "control"), ("x" * 257, "at most 256"), ("é" * 129, "at most 256")]:
                with pytest.raises(BadRequest, match=why):
                    await agent.ask("hi", session=session)
                with pytest.raises(BadRequest, match=why):
                    await agent.forget(session)
            assert await rt.store.list() == []  # nothing was written
            await agent.ask("hi", session="x" * 256)
    for options, field in [({"window": 0}, "window"), ({"window": -1}, "window"), ({"window": 1.5}, "window"),
                           ({"compact_at": 10, "keep": 10}, "compact_at > keep"), ({"keep": 0}, "keep"),
                           ({"retention": 0}, "retention"), ({"retention": float("inf")}, "retention"),
                           ({"summariser": "cheap"}, "summariser")]:
        with pytest.raises(UsageError, match=field):
            StoreMemory(**options)
    for limit in (0, -5, True, "50"):
        with pytest.raises(UsageError, match="agent x: history_limit must be a number of messages >= 1"):
            micro.Agent("x", provider=scripted.function(remembering), history_limit=limit)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="memory must implement"):
        micro.Agent("x", provider=scripted.function(remembering), memory=object())  # type: ignore[arg-type]
    assert isinstance(StoreMemory(), Memory)


class Recent:
    """The docs' example of a memory of your own: the last 20 messages per session, in this process."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[Message]] = {}

    def bind(self, store: Store, agent: str, model: Any, task_group: Any) -> Recent:
        return self

    async def window(self, session: str) -> list[Message]:
        return self.sessions.get(session, [])[-20:]

    async def append(self, session: str, messages: Any) -> None:
        self.sessions.setdefault(session, []).extend(messages)

    async def compact(self, session: str) -> bool:
        return False

    async def forget(self, session: str) -> None:
        self.sessions.pop(session, None)

    async def messages(self, session: str = "", limit: int = 0, *, archived: bool = False) -> list[Message]:
        return self.sessions.get(session, [])[-limit:] if limit else self.sessions.get(session, [])

    async def aclose(self) -> None:
        pass


async def test_an_agent_uses_a_memory_of_your_own() -> None:
    model = scripted.function(remembering)
    recent = Recent()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        async with memo_agent(rt, model, memory=recent) as agent:
            await agent.ask("first", session="x")
            await agent.ask("second", session="x")
            assert [m.text for m in model.calls[-1].messages] == ["first", "reply to first", "second"]
            assert await rt.store.list("agent/memo/history/") == []  # nothing went to the store
            history = await rt.client.call("memo", "AgentInfo.History", {"session": "x"})
            assert [m["content"][0]["text"] for m in history["messages"]] == [
                "first", "reply to first", "second", "reply to second"]
            await agent.forget("x")
            assert recent.sessions == {}


async def test_an_unbound_store_memory_says_how_to_bind_it() -> None:
    with pytest.raises(UsageError, match="bind"):
        await StoreMemory().window("")


# -- two OS processes over real servers --------------------------------------------------------


REPLICA = textwrap.dedent('''
    import asyncio
    import sys

    import micro
    from micro.ai import scripted

    async def main(url, name, me, n):
        model = scripted.function(lambda messages, tools: "re: " + messages[-1].text)
        async with micro.Runtime(registry="memory://", store=url, broker="memory://") as rt:
            async with micro.Agent(name, provider=model, runtime=rt) as agent:
                print("ready", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                asks = [agent.ask(f"{me}-{session or 'default'}-{i}", session=session)
                        for i in range(n) for session in ("s", "")]
                await asyncio.gather(*asks)
        print("done", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
''')


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "n"), [("postgres", 100), ("nats", 100), ("file", 25)])
async def test_two_processes_chat_into_one_session_and_the_default_conversation(
    backend: str, n: int, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    """n chats per process and conversation: on PostgreSQL and NATS 200 into "s" and 200 into the
    default, 800 messages; on the file store (one machine; every write fsyncs) 50 and 50."""
    url = (tmp_path / "store").as_uri() if backend == "file" else request.getfixturevalue(f"{backend}_url")
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    name = f"shared-{uuid.uuid4().hex[:8]}"
    with anyio.fail_after(300):
        procs = [await anyio.open_process([sys.executable, str(script), url, name, me, str(n)]) for me in ("p1", "p2")]
        try:
            for p in procs:
                assert p.stdout is not None
                assert (await p.stdout.receive()).startswith(b"ready")
            for p in procs:  # both start together
                assert p.stdin is not None
                await p.stdin.send(b"go\n")
            for p in procs:
                assert await p.wait() == 0
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
    from micro.store import from_url

    async with from_url(url) as store:
        memory = StoreMemory().bind(store, name, scripted.function(remembering))
        for session in ("s", ""):
            stored = await memory.messages(session)
            asked = [m.text for m in stored[0::2]]
            assert len(stored) == 4 * n and len(set(asked)) == 2 * n  # all present, none twice
            assert sorted(asked) == sorted(f"{me}-{session or 'default'}-{i}" for me in ("p1", "p2")
                                           for i in range(n))
            for question, answer in zip(stored[0::2], stored[1::2], strict=True):  # each run contiguous
                assert (question.role, answer.role, answer.text) == ("user", "assistant", "re: " + question.text)

