"""Stepped flows on JetStream with a real nats-server (issue 16).

A 4-step flow (debit, check, credit, finish) takes 100 events while its process is SIGKILLed at random
points, five times: every event ends with exactly one completed run and each side-effecting step took
effect exactly once (the ledger counts per idempotency key). An Await waits in that process and is
resumed from this one; an Await is satisfied by a published event; Verify's feedback reaches the next
attempt; two replicas of a scheduled flow over one NATS server (a shared KV store) fire each tick once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from test_flow_durable import eventually

import micro
from micro.errors import BadRequest
from micro.flow import Await, RunStore, State, Verify
from micro.store import from_url as store_from_url

WORKER = Path(__file__).parent / "apps" / "stepped_worker.py"
EVENTS = 100
KILLS = 5


class NRequest(msgspec.Struct):
    n: int


class Applied(msgspec.Struct):
    applied: bool


class Ledger:
    """Applies each idempotency key once per endpoint; keeps every raw call; signals progress."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int, str]]] = {"debit": [], "credit": []}
        self.effects: dict[str, dict[str, int]] = {"debit": {}, "credit": {}}
        self.target = 0
        self.reached = anyio.Event()

    def _apply(self, kind: str, n: int) -> Applied:
        key = micro.context.metadata().get("idempotency-key", "")
        self.calls[kind].append((n, key))
        fresh = key not in self.effects[kind]
        self.effects[kind].setdefault(key, n)
        if self.total() >= self.target:
            self.reached.set()
        return Applied(fresh)

    def total(self) -> int:
        return len(self.effects["debit"]) + len(self.effects["credit"])

    def wait_for(self, target: int) -> anyio.Event:
        self.target, self.reached = target, anyio.Event()
        if self.total() >= target:
            self.reached.set()
        return self.reached

    async def Debit(self, req: NRequest) -> Applied:
        """Debit once per key."""
        return self._apply("debit", req.n)

    async def Credit(self, req: NRequest) -> Applied:
        """Credit once per key."""
        return self._apply("credit", req.n)


def spawn_worker(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        rest = proc.stdout.read()
        proc.stdout.close()
        pytest.fail("stepped worker did not start:\n" + line + rest)
    return proc


@pytest.mark.slow
async def test_sigkilled_stepped_flow_completes_every_event_once_and_resumes_from_another_process(
        nats_url: str, micro_home: Path) -> None:
    broker_url = nats_url.replace("nats://", "nats+js://") + "?ack_wait=2&backoff=0.05&max_deliver=50"
    env = {**os.environ, "MICRO_BROKER": broker_url, "MICRO_REGISTRY": "local://", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(16)
    ledger = Ledger()
    workers: list[subprocess.Popen[str]] = []
    async with micro.Runtime(registry="local://", broker=broker_url, store="memory://") as rt:
        svc = micro.New("ledger", runtime=rt)
        svc.handle(ledger)
        async with svc, store_from_url(f"file://{micro_home}/store") as store:
            runs = RunStore(store, "orders")
            try:
                for n in range(EVENTS):
                    await rt.broker.publish("orders.placed", {"n": n}, headers={"Micro-Id": f"ord-{n}"})
                for _ in range(KILLS):  # each worker is killed after a random number of effects more
                    workers.append(spawn_worker(env))
                    reached = ledger.wait_for(min(ledger.total() + rng.randint(4, 30), 2 * EVENTS - 10))
                    with anyio.fail_after(60):
                        await reached.wait()
                    workers[-1].send_signal(signal.SIGKILL)
                    workers[-1].wait(10)
                assert ledger.total() < 2 * EVENTS  # the last worker has work left
                workers.append(spawn_worker(env))

                async def all_completed() -> bool:
                    found = [r for r in await runs.list(EVENTS * 2) if r.id.startswith("ord-")]
                    return len(found) == EVENTS and all(r.status == "completed" for r in found)

                await eventually(all_completed, timeout=120)
                records = await runs.list(EVENTS * 2)

                # an Await waits in the worker and is resumed from this process (over RPC)
                await rt.broker.publish("approvals.requested", {"n": 1000}, headers={"Micro-Id": "appr-1"})
                approvals = RunStore(store, "approvals")

                async def waiting() -> bool:
                    found = await approvals.get("appr-1")
                    return found is not None and found.status == "waiting"

                await eventually(waiting)
                with pytest.raises(BadRequest, match="the input does not fit its schema Confirm"):
                    await rt.client.call("approvals", "Flow.Resume", {"id": "appr-1", "input": {"ok": "y"}})
                rsp = await rt.client.call("approvals", "Flow.Resume", {"id": "appr-1", "input": {"ok": True}})
            finally:
                for w in workers:
                    if w.poll() is None:
                        w.terminate()
                        w.wait(20)
                    assert w.stdout is not None
                    w.stdout.close()

    assert sorted(r.id for r in records) == sorted(f"ord-{n}" for n in range(EVENTS))
    assert all(r.status == "completed" and r.steps["step4"] == {"done": int(r.id[4:])} for r in records)
    # every side-effecting step took effect once per event, under the one key of (run, step)
    for kind in ("debit", "credit"):
        assert ledger.effects[kind] == {f"ord-{n}:{kind}": n for n in range(EVENTS)} | (
            {"appr-1:credit": 1000} if kind == "credit" else {})
        assert {k for _, k in ledger.calls[kind]} == set(ledger.effects[kind])
    assert rsp["run"]["status"] == "completed" and rsp["run"]["steps"]["confirm"] == {"ok": True}


async def test_await_satisfied_by_an_event_and_verify_feedback_on_jetstream(nats_url: str) -> None:
    broker_url = nats_url.replace("nats://", "nats+js://") + "?backoff=0.01&max_deliver=3"
    drafts: list[str | None] = []

    def draft(state: State) -> str:
        drafts.append(state.feedback)
        return "ok" if state.feedback else "too short"

    steps: list[Any] = [
        Verify([draft], check=lambda s: (s.data == "ok", "longer please"), attempts=2, name="write"),
        Await("payment", topic="payments.settled", match="order_id"),
        lambda s: {"paid": s["payment"]["amount"], "text": s["write"]},
    ]
    async with micro.Runtime(registry="memory://", broker=broker_url, store="memory://") as rt:
        flow = micro.NewFlow("ship", trigger="orders.ready", steps=steps, runtime=rt)
        async with flow:
            await rt.broker.publish("orders.ready", {"order_id": "o-5"}, headers={"Micro-Id": "ready-1"})
            with anyio.fail_after(30):
                while (r := await flow.runs.get("ready-1")) is None or r.status != "waiting":
                    await anyio.wait_all_tasks_blocked()
            await rt.broker.publish("payments.settled", {"order_id": "o-5", "amount": 7},
                                    headers={"Micro-Id": "pay-1"})
            with anyio.fail_after(30):
                while (r := await flow.runs.get("ready-1")) is None or r.status != "completed":
                    await anyio.wait_all_tasks_blocked()
    assert drafts == [None, "longer please"]
    assert r.steps["step3"] == {"paid": 7, "text": "ok"} and r.steps["write[0]:check"]["ok"] is False


async def test_two_replicas_of_a_scheduled_flow_fire_each_tick_once(nats_url: str) -> None:
    fired: list[tuple[int, float]] = []
    enough = anyio.Event()

    def tick(replica: int) -> Any:
        def record(state: State) -> int:
            fired.append((replica, state.event["scheduled"]))
            if len(fired) >= 20:
                enough.set()
            return replica

        return record

    async with micro.Runtime(registry="memory://", broker="memory://", store=nats_url) as one, \
            micro.Runtime(registry="memory://", broker="memory://", store=nats_url) as two:
        a = micro.NewFlow("ticker", every="100ms", steps=[tick(1)], runtime=one)
        b = micro.NewFlow("ticker", every="100ms", steps=[tick(2)], runtime=two)
        async with a, b:
            with anyio.fail_after(30):
                await enough.wait()
    ticks = [t for _, t in fired]
    assert len(ticks) >= 20 and len(set(ticks)) == len(ticks)  # no tick fired twice
    assert {r for r, _ in fired} <= {1, 2}
