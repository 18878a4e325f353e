"""The broker conformance kit: the behaviour every broker backend must show.

A backend passes when every check in :data:`CHECKS` passes against it. Each check
gets a factory that returns a new, unconnected broker, enters it, and uses topics
of its own under ``kit.<random>`` (so one server can serve many runs, and a
JetStream backend keeps them all in one stream). No check sleeps: ordering is
proven with a barrier message published last, and waits are bounded::

    from micro.testing.broker_kit import CHECKS, check_broker

    await check_broker(lambda: MyBroker("my://server"))          # all checks

    @pytest.mark.parametrize("check", CHECKS)                   # or one test each
    async def test_my_broker(check):
        await CHECKS[check](lambda: MyBroker("my://server"))
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import msgspec

from micro.broker import Broker, Message, Subscription, encode_message
from micro.errors import BrokerError, MicroError, UsageError

__all__ = ["CHECKS", "TIMEOUT", "BrokerFactory", "Inbox", "check_broker"]

BrokerFactory = Callable[[], Broker]
TIMEOUT = 10.0
"""Seconds any single wait in a check may take before the check fails."""


class Inbox:
    """A handler that records messages and lets a test wait for them."""

    def __init__(self, *, fail_on: bytes | None = None, gate: anyio.Event | None = None) -> None:
        self.messages: list[Message] = []
        self.fail_on = fail_on
        self.gate = gate
        self.entered = anyio.Event()
        self._changed = anyio.Event()

    async def __call__(self, message: Message) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.messages.append(message)
        self._changed.set()
        self._changed = anyio.Event()
        if self.fail_on is not None and message.data == self.fail_on:
            self.fail_on = None
            raise RuntimeError("kit: handler failure on purpose")

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.messages]

    async def wait_for(self, predicate: Callable[[list[Message]], bool], what: str) -> None:
        """Wait until ``predicate(messages)`` holds; fail after :data:`TIMEOUT` seconds."""
        try:
            with anyio.fail_after(TIMEOUT):
                while not predicate(self.messages):
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.data!r}") from None

    async def wait_data(self, data: bytes) -> None:
        await self.wait_for(lambda ms: any(m.data == data for m in ms), f"message {data!r}")

    async def wait_count(self, n: int) -> None:
        await self.wait_for(lambda ms: len(ms) >= n, f"{n} messages")


def _topic() -> str:
    return f"kit.{uuid.uuid4().hex[:12]}"


class _Point(msgspec.Struct):
    x: int
    y: int


async def roundtrip(make_broker: BrokerFactory) -> None:
    """Bytes, dicts and Structs arrive as their encoding, with headers, topic and id."""
    topic = _topic()
    async with make_broker() as broker:
        inbox = Inbox()
        await broker.subscribe(topic, inbox)
        await broker.publish(topic, b"raw", headers={"X-Kind": "bytes"})
        await broker.publish(topic, {"a": 1})
        await broker.publish(topic, _Point(1, 2))
        await inbox.wait_count(3)
        assert inbox.data == [b"raw", b'{"a":1}', b'{"x":1,"y":2}'], inbox.data
        first = inbox.messages[0]
        assert first.topic == topic
        assert first.headers.get("X-Kind") == "bytes", first.headers
        assert first.delivery == 1
        ids = [m.id for m in inbox.messages]
        assert all(ids) and len(set(ids)) == 3, ids
        assert encode_message(_Point(1, 2)) == b'{"x":1,"y":2}'


async def message_id(make_broker: BrokerFactory) -> None:
    """Every subscriber sees the same id for one message; a publisher's Micro-Id wins."""
    topic, mine = _topic(), f"mine-{uuid.uuid4().hex}"  # unique: JetStream de-duplicates ids
    async with make_broker() as broker:
        a, b = Inbox(), Inbox()
        await broker.subscribe(topic, a)
        await broker.subscribe(topic, b)
        await broker.publish(topic, b"1")
        await broker.publish(topic, b"2", headers={"Micro-Id": mine})
        await a.wait_count(2)
        await b.wait_count(2)
        assert [m.id for m in a.messages] == [m.id for m in b.messages]
        assert a.messages[1].id == mine
        assert a.messages[1].headers["Micro-Id"] == mine


async def fan_out(make_broker: BrokerFactory) -> None:
    """Every subscriber without a queue gets every message, in publish order."""
    topic = _topic()
    async with make_broker() as broker:
        inboxes = [Inbox() for _ in range(3)]
        for inbox in inboxes:
            await broker.subscribe(topic, inbox)
        sent = [str(i).encode() for i in range(20)]
        for data in sent:
            await broker.publish(topic, data)
        for inbox in inboxes:
            await inbox.wait_count(len(sent))
            assert inbox.data == sent, inbox.data


async def queue_group(make_broker: BrokerFactory) -> None:
    """Each message goes to exactly one member of a group; the group shares the work."""
    topic = _topic()
    async with make_broker() as broker:
        group, everyone = Inbox(), Inbox()
        work: dict[int, list[bytes]] = {0: [], 1: []}
        both = anyio.Event()

        def member(i: int) -> Callable[[Message], Awaitable[None]]:
            async def handle(message: Message) -> None:
                work[i].append(message.data)
                if all(work.values()):
                    both.set()
                with anyio.fail_after(TIMEOUT):  # hold a member until the other has had work
                    await both.wait()
                await group(message)

            return handle

        for i in work:
            await broker.subscribe(topic, member(i), queue="workers")
        await broker.subscribe(topic, everyone)
        sent = [str(i).encode() for i in range(40)]
        for data in sent:
            await broker.publish(topic, data)
        await everyone.wait_count(len(sent))
        await group.wait_count(len(sent))
        assert sorted(group.data) == sorted(sent), f"duplicates or losses: {sorted(group.data)}"
        assert all(work.values()), f"a member got no work: {work}"


async def wildcards(make_broker: BrokerFactory) -> None:
    """``*`` matches one token, ``>`` one or more trailing tokens."""
    base = _topic()
    async with make_broker() as broker:
        star, tail, exact = Inbox(), Inbox(), Inbox()
        await broker.subscribe(f"{base}.*", star)
        await broker.subscribe(f"{base}.>", tail)
        await broker.subscribe(f"{base}.a", exact)
        await broker.publish(f"{base}.a", b"a")
        await broker.publish(f"{base}.a.b", b"a.b")
        await broker.publish(f"{base}.b", b"b")
        await broker.publish(f"{base}.z", b"end")  # barrier: last for * and >
        await star.wait_data(b"end")
        await tail.wait_data(b"end")
        assert star.data == [b"a", b"b", b"end"], star.data
        assert tail.data == [b"a", b"a.b", b"b", b"end"], tail.data
        await broker.publish(f"{base}.a", b"end")
        await exact.wait_data(b"end")
        assert exact.data == [b"a", b"end"], exact.data


async def handler_error(make_broker: BrokerFactory) -> None:
    """A handler that raises does not end its subscription."""
    topic = _topic()
    async with make_broker() as broker:
        inbox = Inbox(fail_on=b"boom")
        await broker.subscribe(topic, inbox)
        await broker.publish(topic, b"boom")
        await broker.publish(topic, b"after")
        await inbox.wait_data(b"after")


async def slow_subscriber(make_broker: BrokerFactory) -> None:
    """A blocked subscriber holds up neither the publisher nor the other subscribers."""
    topic = _topic()
    async with make_broker() as broker:
        gate = anyio.Event()
        slow, fast = Inbox(gate=gate), Inbox()
        await broker.subscribe(topic, slow)
        await broker.subscribe(topic, fast)
        sent = [str(i).encode() for i in range(20)]
        with anyio.fail_after(TIMEOUT):
            for data in sent:
                await broker.publish(topic, data)
        await fast.wait_count(len(sent))
        assert not slow.messages
        gate.set()
        await slow.wait_count(len(sent))
        assert slow.data == sent


async def unsubscribe(make_broker: BrokerFactory) -> None:
    """After ``unsubscribe`` (idempotent) a subscription gets nothing more."""
    topic = _topic()
    async with make_broker() as broker:
        gone, stays = Inbox(), Inbox()
        sub: Subscription = await broker.subscribe(topic, gone)
        assert sub.topic == topic and sub.queue is None
        await broker.subscribe(topic, stays)
        await broker.publish(topic, b"1")
        await gone.wait_count(1)
        await sub.unsubscribe()
        await sub.unsubscribe()
        await broker.publish(topic, b"2")
        await stays.wait_count(2)
        assert gone.data == [b"1"], gone.data


async def unsubscribe_in_handler(make_broker: BrokerFactory) -> None:
    """A handler may unsubscribe its own subscription; it finishes, nothing more arrives."""
    topic = _topic()
    async with make_broker() as broker:
        seen: list[bytes] = []
        finished = anyio.Event()

        async def once(message: Message) -> None:
            seen.append(message.data)
            await sub.unsubscribe()
            await anyio.lowlevel.checkpoint()  # still running after unsubscribing
            finished.set()

        sub = await broker.subscribe(topic, once)
        await broker.publish(topic, b"1")
        with anyio.fail_after(TIMEOUT):
            await finished.wait()
        other = Inbox()
        await broker.subscribe(topic, other)
        await broker.publish(topic, b"2")
        await other.wait_data(b"2")
        assert seen == [b"1"], seen


async def close_drains(make_broker: BrokerFactory) -> None:
    """``aclose`` lets a running handler finish, is idempotent, and ends publishing."""
    topic = _topic()
    broker = make_broker()
    async with broker:
        gate = anyio.Event()
        inbox = Inbox(gate=gate)
        await broker.subscribe(topic, inbox)
        await broker.publish(topic, b"in flight")
        with anyio.fail_after(TIMEOUT):
            await inbox.entered.wait()
        # open the gate only once aclose has begun waiting for the handler
        asyncio.get_running_loop().call_soon(gate.set)
        await broker.aclose()
        assert inbox.data == [b"in flight"], "aclose did not let the handler finish"
    await broker.aclose()
    try:
        await broker.publish(topic, b"too late")
    except MicroError:
        pass
    else:
        raise AssertionError("publish after aclose did not raise")


async def _refuses(action: Callable[[], Awaitable[object]], what: str) -> None:
    try:
        await action()
    except BrokerError:
        return
    raise AssertionError(f"{what} should raise BrokerError")


async def lifecycle(make_broker: BrokerFactory) -> None:
    """Use before ``async with`` and after the last exit fails with ``BrokerError``; entering twice takes
    two references; ``aclose`` is idempotent; a closed broker opens again and delivers."""
    topic = _topic()
    broker = make_broker()
    await _refuses(lambda: broker.publish(topic, b"early"), "publish() before async with")
    async with broker as entered:
        assert entered is broker
        async with broker:  # a second reference
            pass
        inbox = Inbox()
        await broker.subscribe(topic, inbox)  # still open: leaving the inner block did not close it
        await broker.publish(topic, b"1")
        await inbox.wait_data(b"1")
    await _refuses(lambda: broker.publish(topic, b"late"), "publish() after the last exit")
    await broker.aclose()
    await broker.aclose()
    async with broker:  # opens again
        again = Inbox()
        await broker.subscribe(topic, again)
        await broker.publish(topic, b"2")
        await again.wait_data(b"2")
        assert b"1" not in again.data, "a subscription of the closed broker came back"
    await _refuses(lambda: broker.subscribe(topic, Inbox()), "subscribe() after aclose")


async def bad_input(make_broker: BrokerFactory) -> None:
    """Bad topics are ``UsageError``; unsupported payloads are ``TypeError``."""
    async with make_broker() as broker:
        for topic in ("", "a..b", "a b", "a.*", "a.>"):
            try:
                await broker.publish(topic, b"x")
            except UsageError:
                continue
            raise AssertionError(f"publish to {topic!r} did not raise UsageError")
        for pattern in ("a.>.b", "a.b*", ""):
            try:
                await broker.subscribe(pattern, Inbox())
            except UsageError:
                continue
            raise AssertionError(f"subscribe to {pattern!r} did not raise UsageError")
        try:
            await broker.publish(_topic(), object())
        except TypeError as e:
            assert "object" in str(e)
        else:
            raise AssertionError("publishing an object() did not raise TypeError")


CHECKS: dict[str, Callable[[BrokerFactory], Awaitable[None]]] = {
    "lifecycle": lifecycle,
    "roundtrip": roundtrip,
    "message_id": message_id,
    "fan_out": fan_out,
    "queue_group": queue_group,
    "wildcards": wildcards,
    "handler_error": handler_error,
    "slow_subscriber": slow_subscriber,
    "unsubscribe": unsubscribe,
    "unsubscribe_in_handler": unsubscribe_in_handler,
    "close_drains": close_drains,
    "bad_input": bad_input,
}
"""Every check by name, in a sensible order."""


async def check_broker(make_broker: BrokerFactory) -> None:
    """Run every check in :data:`CHECKS` against brokers from ``make_broker``."""
    for check in CHECKS.values():
        await check(make_broker)
