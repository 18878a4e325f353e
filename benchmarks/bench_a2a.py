"""Issue 18's A2A benchmark: a round trip through the A2A gateway vs a direct ``Agent.Chat``.

One agent on a zero-latency scripted model (it answers at once: no tool), memory backends, and
the A2A gateway (``micro.gateway.a2a``, uvicorn on a free loopback port) in this process:

- **direct**: ``client.call(agent, "Agent.Chat", {...})`` in process (what a micro caller does);
- **network**: the same call from another runtime (its own client), over micro's wire on loopback;
- **a2a send**: :class:`micro.a2a.Client` ``send`` (the official ``a2a-sdk`` client, JSON-RPC
  ``SendMessage`` over HTTP): the gateway starts the run through ``Agent.StreamChat`` with its
  own run id, relays its events, then reads the run record back (``AgentInfo.Run``) as the task;
- **a2a stream**: the same over ``SendStreamingMessage`` (Server-Sent Events), every event read.

Each request is a new run in a new session on both sides. Sequential requests; repetitions
alternate which side goes first; a ratio is the median of the per-repetition ratios (how many
times a direct call one A2A round trip costs). No target: it says what the protocol costs.
"""

from __future__ import annotations

import gc
import socket
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import uvicorn

import micro
from micro.a2a.client import Client
from micro.ai import scripted
from micro.gateway.a2a import app

Result = tuple[str, float, str]

REPS = 7
RUNS = 60


async def _timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def _median_ratio(ours: list[float], base: list[float]) -> tuple[float, float, float]:
    ratios = [o / b for o, b in zip(ours, base, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: anyio.Event) -> None:
        super().__init__(config)
        self._started = started

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self._started.set()


async def run() -> list[Result]:
    out: list[Result] = []
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        agent = micro.Agent("bench", provider=scripted.function(lambda messages, tools: "done"), runtime=rt)
        async with agent, anyio.create_task_group() as tg:
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as micro a2a's socket (Nagle)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            started = anyio.Event()
            server = _Server(uvicorn.Config(app(rt), log_level="warning", lifespan="on"), started)
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            await started.wait()
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/agents/bench"
            # a caller in another runtime (its own client, the agent's registry): the network path
            async with Client(url) as a2a, micro.Runtime(registry=rt.registry, store="memory://",
                                                         broker="memory://") as other:
                out += await _measure(rt, other, a2a)
            server.should_exit = True
    return out


async def _measure(rt: micro.Runtime, other: micro.Runtime, a2a: Client) -> list[Result]:
    async def direct() -> None:
        for _ in range(RUNS):
            rsp = await rt.client.call("bench", "Agent.Chat", {"message": "hi", "session": uuid.uuid4().hex})
            assert rsp["reply"] == "done"

    async def network() -> None:
        for _ in range(RUNS):
            rsp = await other.client.call("bench", "Agent.Chat", {"message": "hi", "session": uuid.uuid4().hex})
            assert rsp["reply"] == "done"

    async def send() -> None:
        for _ in range(RUNS):
            task = await a2a.send("hi", context_id=uuid.uuid4().hex)
            assert Client.text(task) == "done"

    async def stream() -> None:
        for _ in range(RUNS):
            events = [ev async for ev in a2a.stream("hi", context_id=uuid.uuid4().hex)]
            assert events[-1].status_update.status.state == 3  # TASK_STATE_COMPLETED

    for fn in (direct, network, send, stream):  # warm up every path
        await fn()
    times: dict[str, list[float]] = {"direct": [], "network": [], "send": [], "stream": []}
    sides = [("direct", direct), ("network", network), ("send", send), ("stream", stream)]
    for rep in range(REPS):
        gc.collect()
        for name, fn in (sides if rep % 2 == 0 else sides[::-1]):
            times[name].append(await _timed(fn) / RUNS)
    base = statistics.median(times["direct"])
    out = []
    for name in ("send", "stream"):
        r, lo, hi = _median_ratio(times[name], times["direct"])
        out.append((
            f"a2a.{name}_vs_agent_chat", round(r, 2),
            f"A2A {'SendMessage' if name == 'send' else 'SendStreamingMessage (SSE)'} round trip through the gateway "
            f"(a2a-sdk client, HTTP, loopback) {statistics.median(times[name]) * 1e3:.2f} ms vs a direct in-process "
            f"Agent.Chat {base * 1e3:.3f} ms, zero-latency scripted model -> {r:.1f}x ({REPS} reps of {RUNS}: "
            f"{lo:.1f}-{hi:.1f})",
        ))
    r, lo, hi = _median_ratio(times["send"], times["network"])
    out.append((
        "a2a.send_vs_agent_chat_network", round(r, 2),
        f"A2A SendMessage round trip {statistics.median(times['send']) * 1e3:.2f} ms vs Agent.Chat from another "
        f"runtime over micro's wire {statistics.median(times['network']) * 1e3:.2f} ms -> {r:.1f}x ({REPS} reps of "
        f"{RUNS}: {lo:.1f}-{hi:.1f})",
    ))
    return out
