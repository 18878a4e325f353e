"""A counting service for the crash-recovery test: `python recovery_counter.py`.

``Counter.Add`` counts; ``Counter.Slow`` counts too, but only once ``Counter.Open`` is
called, and prints "slow started" when a call reaches it (the test kills the agent
then). Keys are honoured (``micro.idempotency``): ``work`` counts handler runs,
``requests`` every request that reached the service, with its key. Prints "ready".
"""

import asyncio
from collections import Counter as Tally

import msgspec

import micro


class Item(msgspec.Struct):
    item: str


class Done(msgspec.Struct):
    item: str
    count: int


class Empty(msgspec.Struct):
    pass


class Stats(msgspec.Struct):
    work: dict[str, int]
    requests: dict[str, int]
    keys: dict[str, list[str]]


class Counter:
    def __init__(self) -> None:
        self.work: Tally[str] = Tally()
        self.gate = asyncio.Event()

    async def Add(self, req: Item) -> Done:
        """Count an item."""
        self.work[req.item] += 1
        return Done(req.item, self.work[req.item])

    async def Slow(self, req: Item) -> Done:
        """Count an item, slowly."""
        print("slow started", flush=True)
        await self.gate.wait()
        self.work[req.item] += 1
        return Done(req.item, self.work[req.item])

    async def Reset(self, req: Item) -> Done:
        """Reset an item's count (needs a person's approval)."""
        self.work[f"reset {req.item}"] += 1
        return Done(req.item, 0)

    async def Open(self, req: Empty) -> Empty:
        """Let Slow calls finish."""
        self.gate.set()
        return Empty()


async def main() -> None:
    requests: Tally[str] = Tally()
    keys: dict[str, list[str]] = {}

    def tally(next_: micro.middleware.Next) -> micro.middleware.Next:
        async def handle(req: micro.middleware.Request) -> object:
            item = req.body.get("item") if isinstance(req.body, dict) else getattr(req.body, "item", None)
            if req.endpoint in ("Counter.Add", "Counter.Slow", "Counter.Reset") and item is not None:
                requests[item] += 1
                keys.setdefault(item, []).append(req.metadata.get("idempotency-key", ""))
            return await next_(req)

        return handle

    counter = Counter()
    service = micro.New("counter", handler_wrappers=[tally])

    class Inspect:
        async def Stats(self, req: Empty) -> Stats:
            """What was done, and asked."""
            return Stats(dict(counter.work), dict(requests), keys)

    service.handle(counter)
    service.handle(Inspect())
    micro.idempotency.enable(service, endpoints=["Counter.Add", "Counter.Slow", "Counter.Reset"])
    async with service:
        print("ready", flush=True)
        await service.wait()


if __name__ == "__main__":
    asyncio.run(main())
