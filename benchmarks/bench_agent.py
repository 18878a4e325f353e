"""Issue 4's agent benchmarks: every figure is a ratio against a baseline run in the same process.

(a) **loop overhead**: one run = a model turn that asks for one tool, the tool
    call (an in-process micro service endpoint), a model turn that answers.
    micro's ``Agent.ask`` on a zero-latency scripted model (history kept in the
    memory store, as an agent always does) vs pydantic-ai's ``Agent.run`` on its
    ``FunctionModel`` with one plain tool that makes the same micro call.
    Sequential runs; µs/run. Target: ≤ 0.2×.
(b) **parallel tool calls**: one turn asking for 10 tool calls of 50 ms each
    (a micro endpoint that sleeps) vs a turn asking for one. Target: ≤ 1.1×.
(c) **concurrent asks**: 200 asks at once on one agent whose model takes 50 ms
    per turn (two turns per ask: a tool call, then the answer; one session per
    asker) vs one ask alone. Target: ≤ 1.5×.
(e) **checkpoints on the file store** (issue 15: every run is checkpointed at each step):
    the loop of (a) with the agent's store on the file store (write, fsync, rename per
    checkpoint) vs on the memory store. No target: it says what durability costs.
(f) **resume latency**: resuming a run paused for approval (the approved call, then the
    model's answer) vs a plain ask doing the same work (the call, then the answer), on
    the memory store and on the file store. The resume reads the record, checks the
    decisions, claims the run with a conditional write and drives it from its
    checkpoint. No target; a ratio near 1 says resuming costs about what running does.
(d) **history append**: appending one turn (a user and an assistant message,
    one record each) to a conversation of 1000 turns vs one of 10, both on the
    file store (write, fsync, rename, fsync the directory; and the head's
    compare-and-set). Target: ≤ 1.5×. The windowed read before a turn is reported
    beside it, for context (``bench_memory.py`` measures it on every backend).

Repetitions are interleaved (baseline, micro, baseline, …) so that drift on a
noisy machine hits both sides; a ratio is the median of the per-repetition
ratios, an absolute figure the median of its repetitions.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

import micro
from micro.agent import StoreMemory
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.store import from_url as store_from_url

Result = tuple[str, float, str]

LOOP_REPS = 9
LOOP_RUNS = 300
FANOUT_REPS = 11
CONCURRENT_REPS = 7
CONCURRENT_ASKS = 200
APPEND_REPS = 41
FILE_REPS = 7
FILE_RUNS = 50
RESUME_REPS = 7
RESUME_RUNS = 100


class GetUser(msgspec.Struct):
    user_id: str


class User(msgspec.Struct):
    id: str
    name: str


class Nap(msgspec.Struct):
    n: int
    seconds: float = 0.05


class Users:
    async def Get(self, req: GetUser) -> User:
        """Get a user by id."""
        return User(req.user_id, req.user_id.title())

    async def Nap(self, req: Nap) -> Nap:
        """Sleep a while."""
        await asyncio.sleep(req.seconds)
        return req


def _median_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def one_tool(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    """Ask for the user, then answer with what came back."""
    if any(isinstance(b, ToolResultBlock) for b in messages[-1].content):
        return "done"
    return scripted.call("users_Users_Get", user_id="alice")


# -- (a) loop overhead vs pydantic-ai --------------------------------------------------------


def _pydantic_agent(rt: micro.Runtime) -> Any:
    from pydantic_ai import Agent as PydanticAgent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    def function(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart("done")])
        return ModelResponse(parts=[ToolCallPart("users_Users_Get", {"user_id": "alice"})])

    agent = PydanticAgent(FunctionModel(function))

    @agent.tool_plain(name="users_Users_Get")
    async def get_user(user_id: str) -> dict[str, Any]:
        """Get a user by id."""
        result: dict[str, Any] = await rt.client.call("users", "Users.Get", {"user_id": user_id})
        return result

    return agent


async def _loop_overhead(rt: micro.Runtime) -> list[Result]:
    model = scripted.function(one_tool)
    theirs = _pydantic_agent(rt)
    async with micro.Agent("bench", services=["users"], provider=model, runtime=rt) as agent:
        mine = await agent.ask("who is alice?")
        assert mine.reply == "done" and not mine.tool_calls[0].is_error, mine
        assert (await theirs.run("who is alice?")).output == "done"

        async def micro_runs() -> None:
            for _ in range(LOOP_RUNS):
                await agent.ask("who is alice?")

        async def pydantic_runs() -> None:
            for _ in range(LOOP_RUNS):
                await theirs.run("who is alice?")

        await micro_runs()  # warm up both
        await pydantic_runs()
        ours: list[float] = []
        base: list[float] = []
        for rep in range(LOOP_REPS):
            await agent.history.forget("")  # every repetition starts from the same history
            gc.collect()
            if rep % 2 == 0:
                base.append(await _timed(pydantic_runs) / LOOP_RUNS)
                ours.append(await _timed(micro_runs) / LOOP_RUNS)
            else:
                ours.append(await _timed(micro_runs) / LOOP_RUNS)
                base.append(await _timed(pydantic_runs) / LOOP_RUNS)
    r, lo, hi = _median_ratio(ours, base)
    return [(
        "loop.vs_pydantic_ai", round(r, 3),
        f"agent loop, 1 tool per run (in-process micro endpoint), zero-latency model: micro Agent.ask "
        f"{statistics.median(ours) * 1e6:.0f} µs/run vs pydantic-ai FunctionModel "
        f"{statistics.median(base) * 1e6:.0f} µs/run -> {r:.2f}x ({LOOP_REPS} reps of {LOOP_RUNS}: {lo:.2f}-{hi:.2f}; "
        f"target <= 0.2x: {_verdict(r <= 0.2)})",
    )]


# -- (b) ten tool calls in one turn vs one ---------------------------------------------------


async def _fanout(rt: micro.Runtime) -> list[Result]:
    def naps(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        last = messages[-1]
        if any(isinstance(b, ToolResultBlock) for b in last.content):
            return "rested"
        count = int(last.text.split()[1])
        return scripted.turn(*(scripted.call("users_Users_Nap", n=i) for i in range(count)))

    async with micro.Agent("napper", services=["users"], provider=scripted.function(naps), runtime=rt,
                           loop_limit=10) as agent:
        ten = await agent.ask("nap 10")
        assert len(ten.tool_calls) == 10 and not any(c.is_error for c in ten.tool_calls), ten
        one_s: list[float] = []
        ten_s: list[float] = []
        for rep in range(FANOUT_REPS):
            await agent.history.forget("")
            if rep % 2 == 0:
                one_s.append(await _timed(lambda: agent.ask("nap 1")))
                ten_s.append(await _timed(lambda: agent.ask("nap 10")))
            else:
                ten_s.append(await _timed(lambda: agent.ask("nap 10")))
                one_s.append(await _timed(lambda: agent.ask("nap 1")))
    r, lo, hi = _median_ratio(ten_s, one_s)
    return [(
        "tools.10_vs_1", round(r, 3),
        f"one turn asking for 10 tool calls of 50 ms vs for 1: {statistics.median(ten_s) * 1e3:.1f} ms vs "
        f"{statistics.median(one_s) * 1e3:.1f} ms per run -> {r:.3f}x ({FANOUT_REPS} reps: {lo:.3f}-{hi:.3f}; "
        f"target <= 1.1x: {_verdict(r <= 1.1)})",
    )]


# -- (c) 200 concurrent asks vs one ----------------------------------------------------------


async def _concurrent(rt: micro.Runtime) -> list[Result]:
    model = scripted.function(one_tool, delay=0.05)
    async with micro.Agent("busy", services=["users"], provider=model, runtime=rt) as agent:
        sessions: list[str] = []

        async def ask_once() -> None:
            sessions.append(f"u{len(sessions)}")
            rsp = await agent.ask("who is alice?", session=sessions[-1])
            assert rsp.reply == "done"

        async def ask_all() -> None:
            await asyncio.gather(*(ask_once() for _ in range(CONCURRENT_ASKS)))

        await ask_all()  # warm up
        one_s: list[float] = []
        all_s: list[float] = []
        for rep in range(CONCURRENT_REPS):
            for session in sessions:  # every repetition starts from the same (empty) store
                await agent.history.forget(session)
            gc.collect()
            if rep % 2 == 0:
                one_s.append(await _timed(ask_once))
                all_s.append(await _timed(ask_all))
            else:
                all_s.append(await _timed(ask_all))
                one_s.append(await _timed(ask_once))
    r, lo, hi = _median_ratio(all_s, one_s)
    return [(
        "asks.200_vs_1", round(r, 3),
        f"{CONCURRENT_ASKS} concurrent asks on one agent, 50 ms per model turn (tool call + answer): "
        f"{statistics.median(all_s) * 1e3:.0f} ms for all vs {statistics.median(one_s) * 1e3:.0f} ms for one -> "
        f"{r:.2f}x ({CONCURRENT_REPS} reps: {lo:.2f}-{hi:.2f}; target <= 1.5x: {_verdict(r <= 1.5)})",
    )]


# -- (d) history append at turn 1000 vs turn 10 ----------------------------------------------


async def _fill(history: StoreMemory, turns: int) -> None:
    """``turns`` turns of history, written a hundred at a time (building it is not measured)."""
    batch = [Message.user("How are my tasks?"), Message.assistant("Three are overdue; the rest are on time.")]
    for start in range(0, turns, 100):
        await asyncio.gather(*(history.append("", batch) for _ in range(min(100, turns - start))))


async def _append() -> list[Result]:
    turn = [Message.user("What is overdue for Alice?"), Message.assistant("Alice has 3 overdue tasks.")]
    with tempfile.TemporaryDirectory(prefix="micro-bench-agent-") as tmp:
        short_store = store_from_url(f"file://{tmp}/short")
        long_store = store_from_url(f"file://{tmp}/long")
        async with short_store, long_store:
            model = scripted.function(one_tool)
            short = StoreMemory(compact_at=0).bind(short_store, "bench", model)
            long = StoreMemory(compact_at=0).bind(long_store, "bench", model)
            await _fill(short, 10)
            await _fill(long, 1000)
            short_s: list[float] = []
            long_s: list[float] = []
            short_read: list[float] = []
            long_read: list[float] = []
            for rep in range(APPEND_REPS):
                pairs = [(short, short_s, short_read), (long, long_s, long_read)]
                for history, appends, reads in pairs if rep % 2 == 0 else pairs[::-1]:
                    t0 = time.perf_counter()
                    await history.window("", 50)
                    t1 = time.perf_counter()
                    await history.append("", turn)
                    appends.append(time.perf_counter() - t1)
                    reads.append(t1 - t0)
            assert len(await long_store.list("agent/bench/history/#")) == 2 * (1000 + APPEND_REPS)
    r, lo, hi = _median_ratio(long_s, short_s)
    rr, rlo, rhi = _median_ratio(long_read, short_read)
    return [
        (
            "history.append_1000_vs_10", round(r, 3),
            f"history append of one turn (2 records) on the file store at turn 1000 vs turn 10: "
            f"{statistics.median(long_s) * 1e3:.2f} ms vs {statistics.median(short_s) * 1e3:.2f} ms -> {r:.2f}x "
            f"({APPEND_REPS} reps: {lo:.2f}-{hi:.2f}; target <= 1.5x: {_verdict(r <= 1.5)})",
        ),
        (
            "history.window_1000_vs_10", round(rr, 3),
            f"(context) windowed read of the last 50 messages on the file store at turn 1000 vs turn 10: "
            f"{statistics.median(long_read) * 1e3:.2f} ms vs {statistics.median(short_read) * 1e3:.2f} ms -> "
            f"{rr:.2f}x ({APPEND_REPS} reps: {rlo:.2f}-{rhi:.2f}; bench_memory.py has the targets on every backend)",
        ),
    ]


# -- (e) checkpoints on the file store, (f) resume latency -------------------------------------


async def _per_run(agent: micro.Agent, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        await agent.ask("who is alice?")
    return (time.perf_counter() - t0) / runs


async def _resume_vs_ask(rt: micro.Runtime, runs: int) -> tuple[list[float], list[float]]:
    """Per repetition: seconds per resume (of a run paused for approval) and per plain ask."""
    model = scripted.function(one_tool)
    waits = micro.Agent("waits", services=["users"], provider=model, runtime=rt, needs_approval=["users_*"])
    plain = micro.Agent("plain", services=["users"], provider=scripted.function(one_tool), runtime=rt)
    resumes: list[float] = []
    asks: list[float] = []
    async with waits, plain:
        for rep in range(RESUME_REPS):
            paused = [await waits.ask("who is alice?", session=f"r{rep}-{i}") for i in range(runs)]
            assert all(p.status == "paused" for p in paused), paused[0]

            async def resume_all(paused: list[Any] = paused) -> None:
                for p in paused:
                    done = await waits.resume(p.run_id, approve=True)
                    assert done.status == "completed", done

            async def ask_all() -> None:
                for _ in range(runs):
                    await plain.ask("who is alice?")

            gc.collect()
            if rep % 2 == 0:
                asks.append(await _timed(ask_all) / runs)
                resumes.append(await _timed(resume_all) / runs)
            else:
                resumes.append(await _timed(resume_all) / runs)
                asks.append(await _timed(ask_all) / runs)
    return resumes, asks


async def _checkpoints(memory_rt: micro.Runtime) -> list[Result]:
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="micro-bench-runs-") as tmp:
        async with micro.Runtime(registry="memory://", store=f"file://{tmp}", broker="memory://") as file_rt:
            service = micro.Service("users", runtime=file_rt)
            service.handle(Users())
            async with service, \
                    micro.Agent("bench", services=["users"], provider=scripted.function(one_tool),
                                runtime=memory_rt) as in_memory, \
                    micro.Agent("bench", services=["users"], provider=scripted.function(one_tool),
                                runtime=file_rt) as on_file:
                await _per_run(in_memory, 20)
                await _per_run(on_file, 20)
                mem_s: list[float] = []
                file_s: list[float] = []
                for rep in range(FILE_REPS):
                    pairs = [(in_memory, mem_s), (on_file, file_s)]
                    for agent, out_s in pairs if rep % 2 == 0 else pairs[::-1]:
                        await agent.history.clear()
                        gc.collect()
                        out_s.append(await _per_run(agent, FILE_RUNS))
                r, lo, hi = _median_ratio(file_s, mem_s)
                out.append((
                    "loop.file_vs_memory", round(r, 3),
                    f"agent loop of loop.vs_pydantic_ai with its store (3 checkpoint writes, 4 history writes per run) "
                    f"on the file store vs the memory store: {statistics.median(file_s) * 1e3:.2f} ms vs "
                    f"{statistics.median(mem_s) * 1e3:.2f} ms per run -> {r:.2f}x ({FILE_REPS} reps of {FILE_RUNS}: "
                    f"{lo:.2f}-{hi:.2f}; no target: what durable checkpoints cost)",
                ))
                for label, rt, runs in (("memory", memory_rt, RESUME_RUNS), ("file", file_rt, RESUME_RUNS // 4)):
                    resumes, asks = await _resume_vs_ask(rt, runs)
                    r, lo, hi = _median_ratio(resumes, asks)
                    out.append((
                        f"resume.vs_ask.{label}", round(r, 3),
                        f"resume of a run paused for approval (the approved call + the answer) vs a plain ask "
                        f"doing the same, {label} store: {statistics.median(resumes) * 1e6:.0f} µs vs "
                        f"{statistics.median(asks) * 1e6:.0f} µs -> {r:.2f}x ({RESUME_REPS} reps of {runs}: "
                        f"{lo:.2f}-{hi:.2f}; no target)",
                    ))
    return out


async def run() -> list[Result]:
    out: list[Result] = []
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        service = micro.Service("users", runtime=rt)
        service.handle(Users())
        async with service:
            out += await _loop_overhead(rt)
            out += await _fanout(rt)
            out += await _concurrent(rt)
            out += await _checkpoints(rt)
    out += await _append()
    return out
