"""Flows on JetStream with a real nats-server: a flow process killed mid-way loses nothing and
repeats no side effect; poison events are dead-lettered after max_deliver."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.broker import Message
from micro.errors import BadRequest
from micro.flow import FlowRun, RunStore
from micro.store import Record
from micro.store import from_url as store_from_url

WORKER = Path(__file__).parent / "apps" / "flow_worker.py"
EVENTS = 100


class AddRequest(msgspec.Struct):
    job: int


class AddResponse(msgspec.Struct):
    applied: bool


class Counter:
    """Applies each idempotency key once; counts raw calls too.

    Once ``threshold`` effects are applied, calls apply their effect and then hang
    until ``release`` is set: the flow process is killed while they hang, so those
    side effects happened but were never recorded by the flow.
    """

    def __init__(self, threshold: int) -> None:
        self.calls: list[tuple[int, str]] = []
        self.effects: dict[str, int] = {}
        self.reached = anyio.Event()
        self.release = anyio.Event()
        self.all_done = anyio.Event()
        self.threshold = threshold

    async def Add(self, req: AddRequest) -> AddResponse:
        """Apply a job once per idempotency key."""
        key = micro.context.metadata().get("idempotency-key", "")
        self.calls.append((req.job, key))
        fresh = key not in self.effects
        self.effects.setdefault(key, req.job)
        if len(self.effects) >= EVENTS:
            self.all_done.set()
        if len(self.effects) >= self.threshold and not self.release.is_set():
            self.reached.set()
            await self.release.wait()
        return AddResponse(fresh)


def spawn_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        rest = proc.stdout.read()
        proc.stdout.close()
        pytest.fail("flow worker did not start:\n" + line + rest)
    return proc


async def eventually(check: Callable[[], Any], timeout: float = 60) -> None:
    """Poll another process's progress (its records on disk) until ``check()`` is true."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - another process writes these files
            await anyio.sleep(0.05)


@pytest.mark.slow
async def test_killed_flow_process_resumes_and_applies_every_event_once(nats_url: str, micro_home: Path) -> None:
    broker_url = nats_url.replace("nats://", "nats+js://") + "?ack_wait=2&backoff=0.05&max_deliver=10"
    env = {**os.environ, "MICRO_BROKER": broker_url, "MICRO_REGISTRY": "local://", "PYTHONUNBUFFERED": "1"}
    counter = Counter(threshold=EVENTS // 4)
    workers: list[subprocess.Popen[str]] = []
    async with micro.Runtime(registry="local://", broker=broker_url, store="memory://") as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        async with svc:
            try:
                workers.append(spawn_worker(env))
                for n in range(EVENTS):
                    await rt.broker.publish("jobs.created", {"n": n}, headers={"Micro-Id": f"job-{n}"})
                with anyio.fail_after(60):
                    await counter.reached.wait()
                workers[0].send_signal(signal.SIGKILL)  # mid-way: calls in flight, their effects unrecorded
                workers[0].wait(10)
                assert len(counter.effects) < EVENTS
                counter.release.set()
                workers.append(spawn_worker(env))
                with anyio.fail_after(90):
                    await counter.all_done.wait()

                async with store_from_url(f"file://{micro_home}/store") as store:
                    runs = RunStore(store, "jobs")

                    async def all_completed() -> bool:
                        found = [r for r in await runs.list(EVENTS * 2) if r.id.startswith("job-")]
                        return len(found) == EVENTS and all(r.status == "completed" for r in found)

                    await eventually(all_completed)
                    records: list[FlowRun] = await runs.list(EVENTS * 2)
            finally:
                for w in workers:
                    if w.poll() is None:
                        w.terminate()
                        w.wait(20)
                    assert w.stdout is not None
                    w.stdout.close()

    assert sorted(r.id for r in records) == sorted(f"job-{n}" for n in range(EVENTS))
    assert all(r.status == "completed" and len(r.tool_calls) == 1 for r in records)
    # every event applied exactly once, whatever was retried
    assert sorted(counter.effects.values()) == list(range(EVENTS))
    per_job: dict[int, set[str]] = {}
    for job, key in counter.calls:
        per_job.setdefault(job, set()).add(key)
    assert all(len(keys) == 1 for keys in per_job.values())
    # the calls that hung when the process died were made again, with the same keys
    assert len(counter.calls) > EVENTS


async def test_poison_event_goes_to_the_dead_letter_topic(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=3"
    attempts: list[int] = []

    async def check(event: dict[str, Any], run: FlowRun) -> str:
        attempts.append(run.attempts)
        if event.get("poison"):
            raise ValueError("cannot digest this event")
        return "ok"

    dead: list[Message] = []
    got = anyio.Event()

    async def on_dead(msg: Message) -> None:
        dead.append(msg)
        got.set()

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        flow = micro.NewFlow("eater", trigger="food.served", steps=[check], runtime=rt)
        sub = await rt.broker.subscribe("dlq.food.served", on_dead)
        async with flow:
            written: list[str] = []  # the statuses bad-1's record went through
            put = flow.runs.put

            async def recording_put(run: FlowRun) -> None:
                if run.id == "bad-1":
                    written.append(run.status)
                await put(run)

            monkeypatch.setattr(flow.runs, "put", recording_put)
            await rt.broker.publish("food.served", {"poison": True}, headers={"Micro-Id": "bad-1"})
            await rt.broker.publish("food.served", {"poison": False}, headers={"Micro-Id": "good-1"})
            with anyio.fail_after(30):
                await got.wait()
                while (good := await flow.runs.get("good-1")) is None or good.status != "completed":
                    await anyio.wait_all_tasks_blocked()
            bad = await flow.runs.get("bad-1")
            # the run says its event was dead-lettered; Flow.Runs lists those, and Flow.Replay runs one again
            listed = await rt.client.call("eater", "Flow.Runs", {"dead_lettered": True})
            replayed = await rt.client.call("eater", "Flow.Replay", {"id": "bad-1"})
        await sub.unsubscribe()
    assert bad is not None and bad.status == "failed" and bad.attempts == 3 and bad.dead_lettered
    assert good is not None and not good.dead_lettered
    assert [r["id"] for r in listed["runs"]] == ["bad-1"]
    replay = replayed["run"]  # no broker delivers a replay: failing, it is not dead-lettered again
    assert (replay["id"], replay["replay_of"], replay["status"], replay["dead_lettered"]) == (
        "bad-1-replay-1", "bad-1", "failed", False)
    # JetStream delivers a failed event again: retrying until its last attempt
    assert written == ["running", "retrying", "running", "retrying", "running", "failed"]
    assert "cannot digest this event" in bad.error
    (msg,) = dead
    assert msgspec.json.decode(msg.data) == {"poison": True}
    assert "cannot digest this event" in msg.headers.get("Micro-Error", "")


async def test_an_event_dead_lettered_without_its_handler_marks_its_run_dead_lettered(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # its earlier attempts died unsettled (a crash, an OOM, a hang past ack_wait): JetStream delivers it once
    # more than max_deliver and the broker dead-letters it without calling the handler. Before, the run the
    # dead process had recorded stayed `running`: not listed as dead-lettered, and Flow.Replay refused it
    # ack_wait 1 s: a delivery lost with the stopped subscription's pull request comes back in 1 s, not 30
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=1&ack_wait=1"
    ran: list[Any] = []

    async def step(event: dict[str, Any], run: FlowRun) -> str:
        ran.append(event)
        return "ok"

    marked = anyio.Event()
    put = RunStore.put

    async def watched_put(self: RunStore, run: FlowRun, **kw: Any) -> int:
        version = await put(self, run, **kw)
        if run.dead_lettered:
            marked.set()
        return version

    monkeypatch.setattr(RunStore, "put", watched_put)
    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        flow = micro.NewFlow("sinker", trigger="ships.sail", steps=[step], runtime=rt)
        # what the dead process left: its run record, `running`, and the event's one delivery used up
        # (written long ago: a record written within ack_wait is left to its owner, alive as far as we know)
        lost_run = FlowRun("lost-1", "sinker", "ships.sail", event={"ship": 1}, status="running", attempts=1,
                           started=1.0)
        await rt.store.write(Record(flow.runs.key("lost-1"), msgspec.json.encode(lost_run),
                                    metadata={"status": "running", "updated": "1.0"}))
        taken = anyio.Event()

        async def dies(msg: Message) -> None:
            await msg.nack()  # unsettled as far as the flow is concerned: the handler never finished
            taken.set()

        sub = await rt.broker.subscribe("ships.sail", dies, durable="sinker", prefetch=1)
        await rt.broker.publish("ships.sail", {"ship": 1}, headers={"Micro-Id": "lost-1"})
        with anyio.fail_after(30):
            await taken.wait()
        await sub.unsubscribe()
        async with flow:
            with anyio.fail_after(30):
                await marked.wait()
            lost = await flow.runs.get("lost-1")
            listed = await rt.client.call("sinker", "Flow.Runs", {"dead_lettered": True})
            replayed = await rt.client.call("sinker", "Flow.Replay", {"id": "lost-1"})
    assert lost is not None and (lost.status, lost.dead_lettered, lost.error_kind) == ("failed", True, "dead_lettered")
    assert re.search(r"not acknowledged after \d+ deliveries", lost.error), lost.error
    assert [r["id"] for r in listed["runs"]] == ["lost-1"]
    assert replayed["run"]["status"] == "completed" and ran == [{"ship": 1}]  # only the replay ran it


async def test_a_flow_on_the_dead_letter_topic_does_not_call_its_failures_dead_lettered(nats_url: str) -> None:
    # the broker terminates a dead letter that fails again: it is not dead-lettered a second time
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=1"

    async def refuse(event: dict[str, Any], run: FlowRun) -> str:
        raise ValueError("no")

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        assert rt.broker.dead_letter_topic("dlq.meals.x") is None
        assert rt.broker.dead_letter_topic("meals.x") == "dlq.meals.x"
        flow = micro.NewFlow("mourner", trigger="dlq.meals.x", steps=[refuse], runtime=rt)
        async with flow:
            failed = anyio.Event()
            put = flow.runs.put

            async def watched_put(run: FlowRun) -> None:
                await put(run)
                if run.status == "failed":
                    failed.set()

            flow.runs.put = watched_put  # type: ignore[method-assign]
            await rt.broker.publish("dlq.meals.x", {"meal": 1}, headers={"Micro-Id": "sad-1"})
            with anyio.fail_after(30):
                await failed.wait()
            sad = await flow.runs.get("sad-1")
    assert sad is not None and sad.status == "failed" and not sad.dead_lettered


async def test_a_flow_whose_trigger_changed_starts_again_under_its_name(nats_url: str) -> None:
    # the dead-letter stream outlives the trigger's: its durable consumer, bound to the old trigger's dead-letter
    # topic, refused the flow's start under the same name (found by make bench, whose flows change triggers)
    broker_url = nats_url.replace("nats://", "nats+js://")

    async def step(event: dict[str, Any], run: FlowRun) -> str:
        return "ok"

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        for trigger in ("left.moved", "right.moved"):  # two streams; the dead letters share one
            flow = micro.NewFlow("mover", trigger=trigger, steps=[step], runtime=rt)
            async with flow:
                done = anyio.Event()
                put = flow.runs.put

                async def watched_put(run: FlowRun, put: Any = put, done: anyio.Event = done) -> None:
                    await put(run)
                    if run.status == "completed":
                        done.set()

                flow.runs.put = watched_put  # type: ignore[method-assign]
                await rt.broker.publish(trigger, {"n": 1})
                with anyio.fail_after(30):
                    await done.wait()


async def test_graceful_restarts_do_not_use_up_deliveries_of_events_that_never_ran(nats_url: str) -> None:
    # a flow used to pull 16 events ahead per subscription; a stop gave the unstarted ones back (nak),
    # each give-back counted as a delivery, and after max_deliver restarts such events went to the
    # dead-letter topic without ever running ("process died or hung")
    # ack_wait 5 s: a stop can leave one event delivered to its cancelled pull request, back after ack_wait
    # (at the default 30 s the last round waited ~29.98 s of its 30)
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=2&ack_wait=5"
    handled: list[int] = []
    enough = anyio.Event()
    target = [0]

    async def work(event: dict[str, Any], run: FlowRun) -> str:
        handled.append(event["n"])
        if len(set(handled)) >= target[0]:
            enough.set()
        return "ok"

    dead: list[Message] = []

    async def on_dead(msg: Message) -> None:
        dead.append(msg)

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        sub = await rt.broker.subscribe("dlq.chores.due", on_dead)
        for n in range(12):
            await rt.broker.publish("chores.due", {"n": n})
        for round_ in range(4):  # three stops part-way, then a run to the end
            # (a flow may handle several more before its stop takes effect: never wait for more than there are)
            target[0] = 12 if round_ == 3 else min(len(set(handled)) + 2, 12)
            enough = anyio.Event()
            if len(set(handled)) >= target[0]:
                enough.set()
            flow = micro.NewFlow("chores", trigger="chores.due", steps=[work], runtime=rt, max_concurrency=1)
            async with flow:
                with anyio.fail_after(30):
                    await enough.wait()
        await sub.unsubscribe()
    assert sorted(set(handled)) == list(range(12))  # every event ran (none was dead-lettered unrun)
    assert dead == []


async def test_one_flows_dead_letter_leaves_another_flows_run_of_the_event_alone(nats_url: str) -> None:
    # every flow on a trigger has its own consumer on dlq.<trigger>: alpha giving up on an event used to mark
    # beta's run of it failed and dead_lettered while beta's step still ran, and Flow.Replay then ran it twice
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=1&ack_wait=5"
    release = anyio.Event()
    beta_ran: list[str] = []

    async def fails(event: dict[str, Any], run: FlowRun) -> str:
        raise ValueError("alpha cannot digest it")

    async def slow(event: dict[str, Any], run: FlowRun) -> str:
        beta_ran.append(run.id)
        await release.wait()
        return "ok"

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        alpha = micro.NewFlow("alpha", trigger="orders.new", steps=[fails], runtime=rt)
        beta = micro.NewFlow("beta", trigger="orders.new", steps=[slow], runtime=rt)
        seen = anyio.Event()  # beta handled alpha's dead letter
        handle = beta._on_dead_letter

        async def watched(message: Message) -> None:
            await handle(message)
            seen.set()

        beta._on_dead_letter = watched  # type: ignore[method-assign]
        got: list[Message] = []
        sub = await rt.broker.subscribe("dlq.orders.new", lambda m: _append(got, m))
        async with alpha, beta:
            await rt.broker.publish("orders.new", {"n": 1}, headers={"Micro-Id": "ev-1"})
            with anyio.fail_after(30):
                await seen.wait()
            while_running = await beta.runs.get("ev-1")
            with pytest.raises(BadRequest, match="replaying it now would run its steps"):
                await rt.client.call("beta", "Flow.Replay", {"id": "ev-1"})
            release.set()
            with anyio.fail_after(30):
                while (done := await beta.runs.get("ev-1")) is None or done.status != "completed":
                    await anyio.wait_all_tasks_blocked()
            failed = await alpha.runs.get("ev-1")
        await sub.unsubscribe()
    assert while_running is not None and (while_running.status, while_running.dead_lettered) == ("running", False)
    assert not done.dead_lettered and beta_ran == ["ev-1"]  # its step ran once
    assert failed is not None and (failed.status, failed.dead_lettered) == ("failed", True)
    (letter,) = got  # the dead letter says whose deliveries were used up, and when the event was published
    assert letter.headers["Micro-Consumer"] == "alpha"
    assert 0 < float(letter.headers["Micro-Published"]) <= time.time()


async def _append(into: list[Message], message: Message) -> None:
    into.append(message)


async def test_a_dead_letter_marks_only_a_run_left_running_or_retrying_by_a_gone_owner(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    broker_url = nats_url.replace("nats://", "nats+js://") + "?ack_wait=30"

    def letter(run_id: str, consumer: str = "keeper", **headers: str) -> Message:
        return Message(topic="dlq.goods.in", data=b'{"n": 1}', id=run_id,
                       headers={"Micro-Consumer": consumer, "Micro-Error": "not acknowledged after 5 deliveries",
                                "Micro-Topic": "goods.in", **headers})

    async def old(run: FlowRun) -> None:  # a record its owner wrote long ago
        await rt.store.write(Record(flow.runs.key(run.id), msgspec.json.encode(run),
                                    metadata={"status": run.status, "updated": "1.0"}))

    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        flow = micro.NewFlow("keeper", trigger="goods.in", steps=[lambda e, r: "ok"], runtime=rt)
        # a failed run keeps the error its step recorded; a cancelled one stays cancelled
        await old(FlowRun("f", "keeper", "goods.in", status="failed", error="StepFailed: bad order"))
        await old(FlowRun("c", "keeper", "goods.in", status="cancelled"))
        # another subscriber's dead letter, or one without a consumer, is not this flow's
        await old(FlowRun("o", "keeper", "goods.in", status="running"))
        # a run written within ack_wait: its owner is alive
        await flow.runs.put(FlowRun("r", "keeper", "goods.in", status="retrying"))
        # a run being handled in this process
        await old(FlowRun("h", "keeper", "goods.in", status="running"))
        flow._inflight["h"] = anyio.Event()
        for run_id, consumer in [("f", "keeper"), ("c", "keeper"), ("o", "other"), ("o", ""), ("r", "keeper"),
                                 ("h", "keeper")]:
            await flow._on_dead_letter(letter(run_id, consumer))
        kept = {i: await flow.runs.get(i) for i in "fcorh"}
        # a run its owner left: marked; one never recorded: made, started when the event was published
        await old(FlowRun("gone", "keeper", "goods.in", status="running", started=5.0))
        await flow._on_dead_letter(letter("gone"))
        await flow._on_dead_letter(letter("new", **{"Micro-Published": "123.5"}))
        gone, new = await flow.runs.get("gone"), await flow.runs.get("new")
        # a write between the read and the mark wins (its owner finished it meanwhile)
        await old(FlowRun("race", "keeper", "goods.in", status="running"))
        read = flow.runs.get_versioned

        async def raced(run_id: str) -> tuple[FlowRun, int, float] | None:
            found = await read(run_id)
            await flow.runs.put(FlowRun("race", "keeper", "goods.in", status="completed"))
            return found

        monkeypatch.setattr(flow.runs, "get_versioned", raced)
        await flow._on_dead_letter(letter("race"))
        race = await flow.runs.get("race")
    assert {i: (r.status, r.dead_lettered) for i, r in kept.items() if r is not None} == {
        "f": ("failed", False), "c": ("cancelled", False), "o": ("running", False), "r": ("retrying", False),
        "h": ("running", False)}
    assert kept["f"] is not None and kept["f"].error == "StepFailed: bad order"
    assert gone is not None and (gone.status, gone.dead_lettered, gone.started) == ("failed", True, 5.0)
    assert "not acknowledged after 5 deliveries" in gone.error
    assert new is not None and (new.status, new.dead_lettered, new.started, new.event) == (
        "failed", True, 123.5, {"n": 1})
    assert race is not None and (race.status, race.dead_lettered) == ("completed", False)
