"""Issue 21's agent-memory benchmarks, on every store backend: ratios within one run.

(a) **window read**: ``StoreMemory.window`` of one session at turn 10 / 1,000 / 10,000
    (two messages per turn), all three sessions in the same store database, so the
    file store's directory and the NATS bucket are equally full for each. The window is
    20 messages, which turn 10 fills too: the figure is what the conversation's length
    costs, not a larger window. Target: turn 10,000 ≤ 1.5× turn 10 on every backend.
(b) **full ask**: ``Agent.ask`` on a zero-latency scripted model in those sessions (window
    read, model, append with its head compare-and-set, run record). Target: turn 10,000
    ≤ 1.2× turn 10.
(c) **compaction off the caller's path** (memory store): an ask that starts a compaction
    whose summariser takes 50 ms vs an ask that does not. Target: ≤ 1.5× (the compaction's
    first reads share the loop with the reply's last writes; the 50 ms never count).

Conversations are built with direct store writes (the layout ``StoreMemory`` writes: one
record per message and the head), a hundred at a time; building is not measured.
Repetitions alternate between the sessions; a figure is the median of its repetitions.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec

import micro
from benchmarks.bench_store import store_backends
from micro.agent import StoreMemory
from micro.ai import Message, scripted
from micro.store import Record, Store

Result = tuple[str, float, str]
TURNS = (10, 1_000, 10_000)
WINDOW = 20
REPS = {"memory": 200, "file": 60, "postgres": 60, "nats": 60}


def _reply(messages: list[Message], tools: list[Any]) -> str:
    return "Noted."


async def _build(store: Store, agent: str, session: str, turns: int) -> None:
    prefix = f"agent/{agent}/history/{session}/#"
    pair = [msgspec.json.encode(Message.user("How are my tasks?")),
            msgspec.json.encode(Message.assistant("Three are overdue; the rest are on time."))]
    keys = [(f"{prefix}{seq:012d}", pair[(seq - 1) % 2]) for seq in range(1, 2 * turns + 1)]
    for start in range(0, len(keys), 100):
        await asyncio.gather(*(store.write(Record(k, v)) for k, v in keys[start:start + 100]))
    head = msgspec.json.encode({"next": 2 * turns + 1, "start": 1, "summary": 0})
    await store.write(Record(f"agent/{agent}/memory/{session}", head))


async def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def _backend(name: str, make: Callable[[], Store]) -> list[Result]:
    store = make()
    async with micro.Runtime(registry="memory://", store=store, broker="memory://") as rt:
        for turns in TURNS:
            await _build(rt.store, "bench", f"t{turns}", turns)
        memory = StoreMemory(WINDOW, compact_at=0)
        async with micro.Agent("bench", provider=scripted.function(_reply), runtime=rt, memory=memory) as agent:
            history = agent.history
            reads: dict[int, list[float]] = {t: [] for t in TURNS}
            asks: dict[int, list[float]] = {t: [] for t in TURNS}
            for turns in TURNS:  # warm up
                assert len(await history.window(f"t{turns}")) == WINDOW
                await agent.ask("warm up", session=f"t{turns}")
            for rep in range(REPS[name]):
                order = TURNS if rep % 2 == 0 else TURNS[::-1]
                for turns in order:
                    session = f"t{turns}"
                    reads[turns].append(await _seconds(lambda s=session: history.window(s)))
                    asks[turns].append(await _seconds(
                        lambda s=session: agent.ask("How are my tasks?", session=s)))
    read_ms = {t: statistics.median(v) * 1e3 for t, v in reads.items()}
    ask_ms = {t: statistics.median(v) * 1e3 for t, v in asks.items()}
    r_read, r_ask = read_ms[10_000] / read_ms[10], ask_ms[10_000] / ask_ms[10]
    line_read = (f"memory {name:<8}: window of {WINDOW} at turn 10 / 1,000 / 10,000: "
                 + " / ".join(f"{read_ms[t]:.3f}" for t in TURNS)
                 + f" ms -> {r_read:.2f}x at 10,000 (target <= 1.5x: {'met' if r_read <= 1.5 else 'MISSED'})")
    line_ask = (f"memory {name:<8}: full ask at turn 10 / 1,000 / 10,000: "
                + " / ".join(f"{ask_ms[t]:.3f}" for t in TURNS)
                + f" ms -> {r_ask:.2f}x at 10,000 (target <= 1.2x: {'met' if r_ask <= 1.2 else 'MISSED'})")
    print(line_read)
    print(line_ask)
    return [(f"memory.{name}.window_10000_vs_10", round(r_read, 3), line_read),
            (f"memory.{name}.ask_10000_vs_10", round(r_ask, 3), line_ask)]


async def _compaction() -> list[Result]:
    async def slow(messages: list[Message]) -> str:
        await asyncio.sleep(0.05)  # a summariser model's latency
        return "the gist"

    plain: list[float] = []
    compacting: list[float] = []
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        memory = StoreMemory(20, compact_at=12, keep=4, summariser=slow)
        async with micro.Agent("bench", provider=scripted.function(_reply), runtime=rt, memory=memory) as agent:
            history = agent.history
            assert isinstance(history, StoreMemory)
            for rep in range(20):
                session = f"c{rep}"
                for _ in range(5):  # 10 messages: the 6th ask passes compact_at
                    await agent.ask("How are my tasks?", session=session)
                plain.append(await _seconds(lambda s=session: agent.ask("And now?", session=s)))
                compacting.append(await _seconds(
                    lambda s=session: agent.ask("And then?", session=s)))
                await history.settle()
                assert (await history.messages(session))[0].text.startswith("[Summary"), "no compaction ran"
    r = statistics.median(compacting) / statistics.median(plain)
    line = (f"memory compaction: an ask that starts a compaction (summariser 50 ms) vs one that does not: "
            f"{statistics.median(compacting) * 1e3:.3f} vs {statistics.median(plain) * 1e3:.3f} ms -> {r:.2f}x "
            f"(target <= 1.5x: {'met' if r <= 1.5 else 'MISSED'})")
    print(line)
    return [("memory.compaction_on_caller", round(r, 3), line)]


async def run() -> list[Result]:
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="micro-bench-memory-") as root:
        async with store_backends(root) as makers:
            for name, make in makers.items():
                if isinstance(make, str):
                    line = f"memory {name:<8}: {make}"
                    print(line)
                    out.append((f"memory.{name}.skipped", 0.0, line))
                    continue
                out += await _backend(name, make)
    out += await _compaction()
    return out
