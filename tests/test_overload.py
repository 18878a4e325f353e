"""Overload: a service at its limit answers RESOURCE_EXHAUSTED at once instead of queueing without bound."""

from __future__ import annotations

import anyio
import msgspec
import pytest

import micro
from micro.errors import ResourceExhausted, UsageError
from micro.registry.memory import MemoryRegistry

CALLS = 10_000
LIMIT = 100
QUEUE = 100


class Ping(msgspec.Struct):
    n: int


class Gate:
    def __init__(self) -> None:
        self.open = anyio.Event()
        self.peak = 0
        self.inside = 0

    async def Hold(self, req: Ping) -> Ping:
        """Wait for the gate."""
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await self.open.wait()
        self.inside -= 1
        return req


@pytest.mark.parametrize("path", ["in-process", "grpc", "native"])
async def test_ten_thousand_calls_against_a_limit_of_one_hundred(path: str) -> None:
    registry = MemoryRegistry()
    gate = Gate()
    ok = 0
    rejected = 0
    all_rejected = anyio.Event()
    server_rt = micro.Runtime(registry=registry, store="memory://", broker="memory://")
    client_rt = server_rt if path == "in-process" else micro.Runtime(registry=registry, store="memory://",
                                                                      broker="memory://", transport=path)
    async with server_rt, client_rt:
        svc = micro.New("busy", runtime=server_rt, max_concurrency=LIMIT, max_queue=QUEUE)
        svc.handle(gate)
        async with svc:

            async def one(n: int) -> None:
                nonlocal ok, rejected
                try:
                    await client_rt.client.call("busy", "Gate.Hold", {"n": n}, timeout=120)
                    ok += 1
                except ResourceExhausted as exc:
                    assert "limit of 100 calls in flight and 100 queued" in str(exc)
                    rejected += 1
                    if rejected == CALLS - LIMIT - QUEUE:
                        all_rejected.set()

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for n in range(CALLS):
                        tg.start_soon(one, n)
                    await all_rejected.wait()  # everything beyond the limit and the queue failed fast
                    assert gate.inside == LIMIT and svc.limiter is not None
                    assert svc.limiter.waiting == QUEUE
                    gate.open.set()
    assert ok + rejected == CALLS  # every call answered
    assert ok == LIMIT + QUEUE and gate.peak == LIMIT


def test_limits_are_checked() -> None:
    with pytest.raises(UsageError, match="max_concurrency"):
        micro.New("x", max_concurrency=0)
