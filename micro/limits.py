"""Overload protection: a per-service limit on calls in flight, with a bounded queue.

Past ``max_concurrency`` calls in flight, up to ``max_queue`` more wait their turn
(first come, first served); beyond that a call fails at once with
``ResourceExhausted`` instead of piling up memory. It applies on both paths (in
process and over gRPC). Streaming endpoints are not counted: their slot would be
held for as long as the client keeps reading.
"""

from __future__ import annotations

import asyncio
from typing import Any

from micro import metrics
from micro.errors import ResourceExhausted, UsageError
from micro.middleware import Next, Request


class Limiter:
    """A handler wrapper that bounds concurrent and queued calls of one service."""

    def __init__(self, service: str, max_concurrency: int, max_queue: int = 0) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise UsageError(f"{service}: max_concurrency must be >= 1 and max_queue >= 0")
        self.service = service
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiting = 0
        self.rejected = 0
        self._slots = asyncio.Semaphore(max_concurrency)

    def __call__(self, next: Next) -> Next:
        async def limited(req: Request) -> Any:
            if req.streaming:
                return await next(req)
            if self._slots.locked():
                if self.waiting >= self.max_queue:
                    self.rejected += 1
                    metrics.count("overload", self.service)
                    raise ResourceExhausted(
                        f"{self.service} is at its limit of {self.max_concurrency} calls in flight "
                        f"and {self.max_queue} queued: retry later"
                    )
                self.waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self.waiting -= 1
            else:
                await self._slots.acquire()
            self.in_flight += 1
            try:
                return await next(req)
            finally:
                self.in_flight -= 1
                self._slots.release()

        return limited
