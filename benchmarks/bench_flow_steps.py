"""Issue 16's benchmarks: a 3-step ``Call`` flow on JetStream vs raw nats-py JetStream, and schedule jitter.

- **events/s**: the same setup as :mod:`benchmarks.bench_flow` (one nats-server, a fresh
  stream per repetition, ``N`` events ``{"n": i}``), but the flow is a stepped flow of three
  ``Call`` steps to an in-process counter service (``request={"job": "{n}"}``), each with its
  idempotency key, and a checkpoint write per step (five run-record writes per event: running,
  three steps, completed; memory store). Baseline: raw nats-py publish + ``MAX_CONCURRENCY`` pull
  workers fetch+ack. Repetitions interleave; the figure is the median per-repetition ratio
  (higher is better; the issue gives no target).
- **schedule jitter**: a flow with ``every=TICK`` fires ``TICKS`` ticks; its one step records
  how late it ran (``time.time()`` minus the tick's time). Baseline in the same run: a plain
  asyncio task that sleeps to the same grid and records how late it woke. The figure is the
  ratio of the medians (flow lateness / bare sleep lateness; lower is better), with both medians
  and the flow's 95th percentile in the note. A firing's lateness includes the per-tick
  create-if-absent write (memory store) and the run-record writes before the step runs.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import anyio

import micro
from micro.flow import Call, State

from .bench_broker import _start_nats
from .bench_flow import MAX_CONCURRENCY, TIMEOUT, Counter, CountingFlow, _interleaved, _payloads, _ratios, _raw, _tag

Result = tuple[str, float, str]

EVENTS = 1000
REPS = 5
TICK = 0.05
TICKS = 60


async def _stepped(url: str, n: int) -> float:
    """Events per second through a 3-step Call flow on nats+js://."""
    topic = f"{_tag('steps')}.created"
    counter = Counter()
    async with micro.Runtime(registry="memory://", store="memory://", broker=url.replace("nats://", "nats+js://")) \
            as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        steps = [Call("counter", "Counter.Add", name=name, request={"job": "{n}"}) for name in ("a", "b", "c")]
        flow = CountingFlow("benchsteps", trigger=topic, steps=steps, max_concurrency=MAX_CONCURRENCY, runtime=rt,
                            expect=n)
        async with svc, flow:
            start = time.perf_counter()
            for data in _payloads(n):
                await rt.broker.publish(topic, data)
            with anyio.fail_after(TIMEOUT):
                await flow.done.wait()
            elapsed = time.perf_counter() - start
            runs = await flow.runs.list(2 * n)
    bad = [r for r in runs if r.status != "completed" or r.attempts != 1 or len(r.steps) != 3]
    if len(runs) != n or bad or counter.total != 3 * n:
        raise RuntimeError(f"stepped flow: {len(runs)} runs for {n} events, {counter.total} calls, {len(bad)} bad")
    return n / elapsed


async def _flow_lateness() -> list[float]:
    late: list[float] = []
    done = anyio.Event()

    def record(state: State) -> None:
        late.append(time.time() - state.event["scheduled"])
        if len(late) == TICKS:
            done.set()

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        flow = micro.NewFlow("benchtick", every=TICK, steps=[record], runtime=rt, catch_up="none")
        async with flow:
            with anyio.fail_after(TICKS * TICK + 30):
                await done.wait()
    return late


async def _sleep_lateness() -> list[float]:
    late: list[float] = []
    tick = (int(time.time() / TICK) + 1) * TICK
    for _ in range(TICKS):
        await anyio.sleep(max(0.0, tick - time.time()))
        late.append(time.time() - tick)
        tick += TICK
    return late


async def run() -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="micro-bench-steps-") as tmp:
        proc, url = await _start_nats(f"{tmp}/nats")
        try:
            await _raw(url, 100)
            await _stepped(url, 100)
            raw_rates, our_rates = await _interleaved(REPS, lambda: _raw(url, EVENTS), lambda: _stepped(url, EVENTS))
        finally:
            proc.terminate()
            await proc.wait()
    bare = await _sleep_lateness()
    ours = await _flow_lateness()
    r, lo, hi = _ratios(our_rates, raw_rates)
    ours_med, bare_med = statistics.median(ours), statistics.median(bare)
    p95 = sorted(ours)[int(0.95 * len(ours)) - 1]
    return [
        ("flow_steps.vs_raw_jetstream", round(r, 3),
         f"3-step Call flow on nats+js:// (max_concurrency {MAX_CONCURRENCY}, 3 keyed calls to an in-process service, "
         f"5 run-record writes per event, memory store) {statistics.median(our_rates):,.0f} events/s vs raw nats-py "
         f"JetStream publish + {MAX_CONCURRENCY} pull workers fetch+ack {statistics.median(raw_rates):,.0f} events/s "
         f"-> {r:.3f}x ({REPS} reps of {EVENTS} events: {lo:.3f}-{hi:.3f}; no target)"),
        ("flow_steps.schedule_lateness_vs_sleep", round(ours_med / bare_med, 2) if bare_med > 0 else 0.0,
         f"every={TICK:g}s flow, {TICKS} ticks: a firing's step runs {ours_med * 1000:.2f} ms after its tick "
         f"(median; p95 {p95 * 1000:.2f} ms) vs a bare asyncio sleep to the same grid waking {bare_med * 1000:.2f} ms "
         f"late -> {ours_med / bare_med if bare_med > 0 else 0:.2f}x (lower is better; no target)"),
    ]


if __name__ == "__main__":
    for row in asyncio.run(run()):
        print(row[2])
