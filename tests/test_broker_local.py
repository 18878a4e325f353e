"""The local broker: the broker conformance kit across runtimes that share a registry, and two OS
processes exchanging messages through the machine-wide registry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

import micro
from micro.broker import Broker, Message
from micro.broker.local import SERVICE, LocalBroker
from micro.broker.memory import MemoryBroker
from micro.errors import BrokerError
from micro.registry.memory import MemoryRegistry
from micro.testing.broker_kit import CHECKS
from micro.wire import unix

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


class _OwnRuntimeBroker(LocalBroker):
    """A local broker with a runtime of its own, so the kit can enter and close it like any broker."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__("local://")
        self._rt = micro.Runtime(registry=registry, broker="memory://", store="memory://")
        self.attach(self._rt)

    async def _open(self) -> None:
        await self._rt.acquire()
        await super()._open()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            await self._rt.release()


@pytest.fixture
def make_local() -> Callable[[], Broker]:
    registry = MemoryRegistry()  # shared: every broker a check makes sees the others
    return lambda: _OwnRuntimeBroker(registry)


@pytest.mark.parametrize("check", list(CHECKS))
async def test_conformance(check: str, make_local: Callable[[], Broker]) -> None:
    await CHECKS[check](make_local)


async def test_queue_group_spans_runtimes_and_each_message_reaches_one_member() -> None:
    registry = MemoryRegistry()
    got: dict[str, list[int]] = {"a": [], "b": []}
    plain: list[int] = []
    done = anyio.Event()

    def member(name: str) -> Callable[[Message], object]:
        async def handle(m: Message) -> None:
            got[name].append(msgspec.json.decode(m.data)["i"])
            if sum(map(len, got.values())) == 10 and len(plain) == 10:
                done.set()
        return handle

    async def watcher(m: Message) -> None:
        plain.append(msgspec.json.decode(m.data)["i"])
        if sum(map(len, got.values())) == 10 and len(plain) == 10:
            done.set()

    rts = [micro.Runtime(registry=registry, broker="local://", store="memory://") for _ in range(3)]
    async with rts[0] as a, rts[1] as b, rts[2] as pub:
        await a.broker.subscribe("jobs.run", member("a"), queue="workers")
        await b.broker.subscribe("jobs.run", member("b"), queue="workers")
        await b.broker.subscribe("jobs.*", watcher)
        for i in range(10):
            await pub.broker.publish("jobs.run", {"i": i})
        with anyio.fail_after(10):
            await done.wait()
    assert sorted(got["a"] + got["b"]) == list(range(10))  # each to exactly one member
    assert got["a"] and got["b"]  # and shared between the two processes' members
    assert sorted(plain) == list(range(10))


async def test_a_tight_publishing_loop_in_process_loses_nothing() -> None:
    """As on memory://, publish yields once a buffer is past half full, so the subscriber keeps up."""
    got = 0
    done = anyio.Event()

    async def handle(m: Message) -> None:
        nonlocal got
        got += 1
        if got == 5000:
            done.set()

    async with micro.Runtime(registry=MemoryRegistry(), broker="local://?queue_size=64", store="memory://") as rt:
        sub = await rt.broker.subscribe("t.tight", handle)
        for _ in range(5000):
            await rt.broker.publish("t.tight", b"x")
        with anyio.fail_after(10):
            await done.wait()
        assert sub.dropped == 0  # type: ignore[attr-defined]


async def test_needs_a_runtime() -> None:
    broker = LocalBroker()
    async with broker:
        with pytest.raises(BrokerError, match="needs a runtime"):
            await broker.subscribe("t", lambda m: anyio.lowlevel.checkpoint())
        with pytest.raises(BrokerError, match="needs a runtime"):
            await broker.publish("t", b"x")


def test_micro_subscribe_sees_events_published_by_a_running_app() -> None:
    env = {**os.environ, "MICRO_BROKER": "local://"}
    app = subprocess.Popen([*MICRO, "run", "examples/tasks"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env, cwd=ROOT)
    sub = subprocess.Popen([*MICRO, "subscribe", "events.user.created", "-n", "1"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert app.stdout is not None and sub.stderr is not None
        for line in app.stdout:
            if "Ctrl-C to stop" in line:
                break
        assert sub.stderr.readline().strip() == "subscribed to events.user.created"
        res = subprocess.run([*MICRO, "call", "user", "User.Create", '{"name": "Eve", "email": "eve@x.io"}'],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        out, _ = sub.communicate(timeout=60)
        event = msgspec.json.decode(out.splitlines()[0])
        assert event["topic"] == "events.user.created"
        assert event["data"] == {"id": "u1", "name": "Eve", "email": "eve@x.io"}
    finally:
        for p in (sub, app):
            if p.poll() is None:
                p.send_signal(2)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


async def test_a_close_that_fails_still_stops_the_delivery_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subscribers' delivery server (its ports, its Unix socket file) stops even when the rest of the
    broker's close fails: nothing is left listening for a broker that is gone."""
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, broker="local://", store="memory://") as rt:
        await rt.broker.subscribe("t.x", lambda m: anyio.lowlevel.checkpoint())
        (node,) = [n for r in await registry.get(SERVICE) for n in r.nodes]
        path = node.metadata[unix.UNIX]
        os.lstat(path)  # there

        async def fails(self: MemoryBroker) -> None:
            raise RuntimeError("the subscriptions did not drain")

        monkeypatch.setattr(MemoryBroker, "_close", fails)
        with pytest.raises(RuntimeError, match="did not drain"):
            await rt.broker.aclose()
        monkeypatch.undo()
        with pytest.raises(FileNotFoundError):  # gone with the server
            os.lstat(path)
