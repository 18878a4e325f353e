"""Staying up (issue 22): outages, failing background work.

**NATS outage longer than a client's give-up window.** nats-py closes a client for
good after ``max_reconnect`` attempts; the shared NATS connection then starts over
with fresh clients (capped backoff, jitter) for as long as it is open, and the brokers
re-create their subscriptions on them. The test shortens the give-up window to two
attempts 50 ms apart (the default is unbounded), keeps the server down past it, and
checks that a flow handles every event after the restart.

**Supervised background work.** A registry watch, a heartbeat or a keep-alive loop
that fails is started again (``BackgroundTasks.supervise``) and logged once per streak.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.errors import Unavailable
from micro.flow import FlowRun
from micro.registry import Event as RegistryEvent
from micro.registry import Watcher
from micro.registry.memory import MemoryRegistry
from micro.tasks import BackgroundTasks
from tests._servers import NatsServer


class Watch(logging.Handler):
    """Collects a logger's records and wakes a waiter when one contains a phrase."""

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


def watching(name: str) -> Iterator[Watch]:
    watch = Watch()
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


@pytest.fixture
def nats_log() -> Iterator[Watch]:
    yield from watching("micro.nats")


@pytest.fixture
def runtime_log() -> Iterator[Watch]:
    yield from watching("micro.runtime")


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


async def test_a_failing_background_task_is_started_again_and_logged_once_per_streak() -> None:
    logger = logging.getLogger("tests.supervise")
    log = Watch()
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    runs = 0
    running_again = anyio.Event()
    sibling_ran = anyio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"failure {runs}")
        running_again.set()
        await anyio.sleep_forever()

    async def sibling() -> None:
        await running_again.wait()
        sibling_ran.set()  # a failing task does not end the others in the group

    tasks = BackgroundTasks("owner", logger)
    try:
        await tasks.start()
        tasks.start_soon(sibling)
        tasks.supervise(work, name="work", first_wait=0.001, max_wait=0.05)
        with anyio.fail_after(10):
            await running_again.wait()
            await sibling_ran.wait()
        assert tasks.failing == {"work"}
        await log.wait_for("recovered")  # the streak ends once a run lasts max_wait
        assert tasks.failing == set()
    finally:
        await tasks.aclose()
        logger.removeHandler(log)
        logger.setLevel(logging.NOTSET)
    errors = [r for r in log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failure 1" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the first failure carries its traceback
    assert len(log.seen("in a row")) == 2  # the other two at debug level
    assert runs == 4


class _BrokenWatcher(Watcher):
    async def __anext__(self) -> RegistryEvent:
        raise OSError(errno.EMFILE, "Too many open files")

    async def aclose(self) -> None:
        pass


class FlakyWatchRegistry(MemoryRegistry):
    """The first watch fails as a watch did when the process ran out of descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.watches = 0

    def _watch(self) -> Watcher:
        self.watches += 1
        return _BrokenWatcher() if self.watches == 1 else super()._watch()


class PingRequest(msgspec.Struct):
    text: str = ""


class Echo:
    async def Ping(self, req: PingRequest) -> PingRequest:
        """Answer with the request."""
        return req


async def test_a_failed_registry_watch_starts_again_and_still_delivers_changes(runtime_log: Watch) -> None:
    registry = FlakyWatchRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        await runtime_log.wait_for("registry watch failed")
        with anyio.fail_after(10):
            while registry.watches < 2:  # started again after its backoff
                await anyio.wait_all_tasks_blocked()
        first = micro.Service("echo", runtime=rt)
        first.handle(Echo())
        async with first:
            record, _ = await rt.client.resolve("echo", "Echo.Ping")
            assert [n.id for n in record.nodes] == [first.id]
        second = micro.Service("echo", runtime=rt)
        second.handle(Echo())
        async with second:
            with anyio.fail_after(10):  # the watch drops the cached record: no call has to fail first
                while [n.id for n in (await rt.client.resolve("echo", "Echo.Ping"))[0].nodes] != [second.id]:
                    await anyio.wait_all_tasks_blocked()
    assert len(runtime_log.seen("registry watch failed")) == 1
