"""Staying up (issue 22): a NATS outage longer than a client's give-up window.

nats-py closes a client for good after ``max_reconnect`` attempts; the shared NATS
connection then starts over with fresh clients (capped backoff, jitter) for as long as
it is open, and the brokers re-create their subscriptions on them. The test shortens
the give-up window to two attempts 50 ms apart (the default is unbounded), keeps the
server down past it, and checks that a flow handles every event after the restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import micro
from micro.errors import Unavailable
from micro.flow import FlowRun
from tests._servers import NatsServer


class Watch(logging.Handler):
    """Collects ``micro.nats`` records and wakes a waiter when one contains a phrase."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._waiting: list[tuple[str, anyio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for phrase, event in self._waiting:
            if phrase in record.getMessage():
                event.set()

    def seen(self, phrase: str) -> list[str]:
        return [r.getMessage() for r in self.records if phrase in r.getMessage()]

    async def wait_for(self, phrase: str, timeout: float = 30) -> None:
        event = anyio.Event()
        self._waiting.append((phrase, event))
        if self.seen(phrase):
            return
        with anyio.fail_after(timeout):
            await event.wait()


@pytest.fixture
def nats_log() -> Iterator[Watch]:
    watch = Watch()
    logger = logging.getLogger("micro.nats")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


async def publish(rt: micro.Runtime, n: int) -> None:
    """Publish event ``n``; JetStream answers ``Unavailable`` for a moment after a restart."""
    with anyio.fail_after(30):
        while True:
            try:
                await rt.broker.publish("jobs.created", {"n": n}, headers={"Micro-Id": f"job-{n}"})
                return
            except Unavailable:
                await anyio.sleep(0.05)  # pacing retries while JetStream elects itself, not synchronisation


async def test_flow_consumes_again_after_an_outage_longer_than_the_give_up_window(
        own_nats_server: NatsServer, nats_log: Watch) -> None:
    server = own_nats_server
    url = server.url.replace("nats://", "nats+js://") + (
        "?max_reconnect=2&reconnect_wait=0.05&max_reconnect_wait=0.2&ack_wait=2&backoff=0.05")
    handled: dict[int, int] = {}
    changed = anyio.Event()

    async def step(event: dict[str, Any], run: FlowRun) -> int:
        nonlocal changed
        n = int(event["n"])
        handled[n] = handled.get(n, 0) + 1
        changed.set()
        changed = anyio.Event()
        return n

    async def handled_all(count: int) -> None:
        with anyio.fail_after(60):
            while set(handled) != set(range(count)):
                await changed.wait()

    async with micro.Runtime(registry="memory://", store="memory://", broker=url) as rt:
        flow = micro.NewFlow("jobs", trigger="jobs.created", steps=[step], runtime=rt)
        async with flow:
            for n in range(5):
                await publish(rt, n)
            await handled_all(5)

            await anyio.to_thread.run_sync(server.stop)
            await nats_log.wait_for("starting over with a fresh connection")  # nats-py gave up
            await nats_log.wait_for("a fresh connection failed")  # and micro keeps trying
            with pytest.raises(Unavailable, match="broker"):
                await rt.broker.publish("jobs.created", {"n": -1})

            await anyio.to_thread.run_sync(server.start)
            await nats_log.wait_for("connected again")
            for n in range(5, 10):
                await publish(rt, n)
            await handled_all(10)

    assert set(handled) == set(range(10))  # nothing lost, before or after the outage
    # one line per change of state, at warning or above: not one per attempt or operation
    loud = [r.getMessage() for r in nats_log.records if r.levelno >= logging.WARNING]
    assert len(nats_log.seen("reconnecting")) == 1, loud
    assert len(nats_log.seen("starting over with a fresh connection")) == 1, loud
    assert len(nats_log.seen("connected again")) == 1, loud
    assert len(loud) == 3, loud
