"""Overload: 10,000 concurrent calls over loopback gRPC against a blocked handler, with and without
``max_concurrency=100, max_queue=100``.

Reports how many calls were answered and refused, the most the handler held at
once, and the peak traced Python memory of each run (tracemalloc), the unlimited
run being the baseline measured in the same process.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import anyio
import msgspec

import micro
from micro.errors import ResourceExhausted
from micro.registry.memory import MemoryRegistry

Row = tuple[str, float, str]
CALLS = 10_000
LIMIT = 100


class Q(msgspec.Struct):
    n: int = 0


class Gate:
    def __init__(self) -> None:
        self.open = anyio.Event()
        self.inside = 0
        self.peak = 0
        self.arrived = anyio.Event()
        self.expect = 0

    async def Hold(self, req: Q) -> Q:
        """Block until the gate opens."""
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        if self.inside == self.expect:
            self.arrived.set()
        await self.open.wait()
        self.inside -= 1
        return req


async def _run(limit: int | None) -> dict[str, Any]:
    registry = MemoryRegistry()
    gate = Gate()
    gate.expect = limit if limit is not None else 1600  # the client pool's bound per node
    res = {"ok": 0, "rejected": 0}
    settled = anyio.Event()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as client:
        kw: dict[str, Any] = {"max_concurrency": limit, "max_queue": limit} if limit else {}
        svc = micro.New("busy", runtime=server, **kw)
        svc.handle(gate)
        async with svc:
            tracemalloc.start()

            async def one(n: int) -> None:
                try:
                    await client.client.call("busy", "Gate.Hold", {"n": n}, timeout=600)
                    res["ok"] += 1
                except ResourceExhausted:
                    res["rejected"] += 1
                    if res["rejected"] == CALLS - 2 * LIMIT:
                        settled.set()

            async with anyio.create_task_group() as tg:
                for n in range(CALLS):
                    tg.start_soon(one, n)
                await (settled.wait() if limit else gate.arrived.wait())
                peak = tracemalloc.get_traced_memory()[1]
                gate.open.set()
            tracemalloc.stop()
    return {**res, "held": gate.peak, "peak_mib": peak / 2**20}


async def run() -> list[Row]:
    free = await _run(None)
    limited = await _run(LIMIT)
    ratio = limited["peak_mib"] / free["peak_mib"]
    return [
        ("overload_limited_ok", float(limited["ok"]),
         f"{CALLS:,} calls, max_concurrency={LIMIT}, max_queue={LIMIT}: {limited['ok']} answered, "
         f"{limited['rejected']:,} refused at once (RESOURCE_EXHAUSTED), handler held at most {limited['held']}"),
        ("overload_unlimited_held", float(free["held"]),
         f"{CALLS:,} calls, no limit: handler held {free['held']:,} at once (the client pool's bound per node)"),
        ("overload_peak_memory_ratio", ratio,
         f"peak traced memory: limited {limited['peak_mib']:.1f} MiB vs unlimited {free['peak_mib']:.1f} MiB "
         f"-> {ratio:.2f}x"),
    ]


if __name__ == "__main__":
    import asyncio

    for _, _, line in asyncio.run(run()):
        print(line)
