"""Stepped flows on the memory broker (issue 16): Call, LLM, Dispatch, Await, Loop, Verify and plain functions;
per-step checkpoints and idempotency keys; waiting on the run engine, resume with one winner, timeouts; direct
runs; schedules with one firing per tick; and the bad-input rows."""

from __future__ import annotations

import re
from typing import Any

import anyio
import msgspec
import pytest
from test_flow import Counter, runtime

import micro
from micro.agent.record import AgentRun
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import BadRequest, Conflict, NotFound, UsageError
from micro.flow import LLM, Await, Call, Dispatch, Fn, Loop, State, Verify
from micro.flow.schedule import Schedule, tick_id


class Order(msgspec.Struct):
    id: str
    total: int
    customer: str


class GetRequest(msgspec.Struct):
    id: str


class Orders:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Get(self, req: GetRequest) -> Order:
        """An order by id."""
        self.calls.append(req.id)
        if req.id == "missing":
            raise micro.errors.NotFound(f"no order {req.id}")
        return Order(req.id, 40, "ada")


class RefundRequest(msgspec.Struct):
    id: str
    total: int


class RefundResponse(msgspec.Struct):
    refunded: int


class Payments:
    """Refunds once per idempotency key; counts every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.effects: dict[str, int] = {}
        self.fail_next = 0

    async def Refund(self, req: RefundRequest) -> RefundResponse:
        """Refund an order."""
        key = micro.context.metadata().get("idempotency-key", "")
        self.calls.append(key)
        if self.fail_next:
            self.fail_next -= 1
            raise micro.errors.Unavailable("payments is down")
        self.effects.setdefault(key, req.total)
        return RefundResponse(req.total)


class ChatRequest(msgspec.Struct):
    message: str
    parent_id: str = ""


class ChatReply(msgspec.Struct):
    reply: str


class Comms:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str, str]] = []

    async def Chat(self, req: ChatRequest) -> ChatReply:
        """Send a message."""
        self.messages.append((req.message, req.parent_id, micro.context.metadata().get("idempotency-key", "")))
        return ChatReply(f"sent: {req.message}")


class Decision(msgspec.Struct):
    qualifies: bool
    reason: str


class Approval(msgspec.Struct):
    approved: bool


def decide_model() -> scripted.ScriptedModel:
    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        return '```json\n{"qualifies": true, "reason": "within 30 days"}\n```'

    return scripted.function(brain)


def refund_steps(**await_kw: Any) -> list[Any]:
    def approved(state: State) -> dict[str, Any]:
        if not state["manager"]["approved"]:
            raise micro.errors.BadRequest("the manager said no")
        return {"id": state["order"]["id"], "total": state["order"]["total"]}

    return [
        Call("orders", "Orders.Get", name="order", request=lambda s: {"id": s.event["order_id"]}),
        LLM("Does order {order} qualify for a refund? Answer as JSON.", output=Decision, name="decision"),
        Await("manager", prompt="Approve refund of {order.total} for {order.customer}?", timeout="2d",
              schema=Approval, **await_kw),
        approved,
        Call("payments", "Payments.Refund", name="refund"),
        Dispatch("comms-mgr", message="Tell {order.customer} their refund of {refund.refunded} is on its way."),
    ]


class System:
    def __init__(self) -> None:
        self.orders = Orders()
        self.payments = Payments()
        self.comms = Comms()

    def services(self, rt: micro.Runtime) -> list[micro.Service]:
        out = []
        for name, handler, as_name in (("orders", self.orders, None), ("payments", self.payments, None),
                                       ("comms-mgr", self.comms, "Agent")):
            svc = micro.New(name, runtime=rt)
            svc.handle(handler, name=as_name)
            out.append(svc)
        return out


async def started(rt: micro.Runtime, system: System, flow: micro.Flow) -> Any:
    from contextlib import AsyncExitStack

    stack = AsyncExitStack()
    for svc in [*system.services(rt), flow]:
        await stack.enter_async_context(svc)
    return stack


async def test_a_refund_runs_its_steps_waits_for_the_manager_and_resumes() -> None:
    system = System()
    async with runtime() as rt:
        flow = micro.NewFlow("refund", trigger="events.refund.requested", steps=refund_steps(),
                             provider=decide_model(), runtime=rt)
        async with await started(rt, system, flow):
            run = await flow.run_event("ev-1", "events.refund.requested", {"order_id": "o-17"})
            assert run.status == "waiting" and run.waiting is not None
            assert (run.waiting.step, run.waiting.prompt) == ("manager", "Approve refund of 40 for ada?")
            assert run.waiting.until - run.waiting.since == 2 * 86400
            assert run.steps["order"] == {"id": "o-17", "total": 40, "customer": "ada"}
            assert run.steps["decision"] == {"qualifies": True, "reason": "within 30 days"}
            assert system.payments.calls == []
            # the same engine as agents: the run's record there waits too
            (rec,) = await rt.store.read("agent/refund/runs/ev-1")
            assert msgspec.json.decode(rec.value, type=AgentRun).status == "waiting"
            assert await flow.model_runs.waiting() == ["ev-1"]

            # a redelivery of the event while it waits runs nothing
            again = await flow.run_event("ev-1", "events.refund.requested", {"order_id": "o-17"})
            assert again.status == "waiting" and system.orders.calls == ["o-17"]

            # input that does not fit the schema: a clear error, the run unchanged
            with pytest.raises(BadRequest, match=r"run ev-1 waits at manager: the input does not fit its schema "
                                                 r"Approval: .*approved.*; the run still waits"):
                await flow.resume("ev-1", {"approved": "maybe"})
            assert (await flow.runs.get("ev-1")).status == "waiting"  # type: ignore[union-attr]

            rsp = await rt.client.call("refund", "Flow.Resume", {"id": "ev-1", "input": {"approved": True}})
            done = rsp["run"]
            assert done["status"] == "completed" and done["steps"]["manager"] == {"approved": True}
            assert done["trace"]["manager"]["status"] == "completed"
            assert [i["status"] for i in done["trace"].values()] == ["completed"] * 6
            assert system.payments.effects == {"ev-1:refund": 40}
            assert system.comms.messages == [("Tell ada their refund of 40 is on its way.", "ev-1",
                                              "ev-1:comms-mgr")]
            assert done["steps"]["comms-mgr"] == "sent: Tell ada their refund of 40 is on its way."
            (rec,) = await rt.store.read("agent/refund/runs/ev-1")
            assert msgspec.json.decode(rec.value, type=AgentRun).status == "completed"
            assert await flow.model_runs.waiting() == []

            with pytest.raises(Conflict, match="run ev-1 is completed, not waiting for input; nothing was changed"):
                await flow.resume("ev-1", {"approved": True})
            with pytest.raises(NotFound, match="flow refund has no run 'nope'"):
                await flow.resume("nope", {"approved": True})
    assert system.orders.calls == ["o-17"]  # no finished step ran twice


async def test_two_resumers_of_one_waiting_run_have_exactly_one_winner() -> None:
    system = System()
    async with runtime() as rt:
        flow = micro.NewFlow("refund", trigger="refunds", steps=refund_steps(), provider=decide_model(), runtime=rt)
        async with await started(rt, system, flow):
            await flow.run_event("ev-1", "refunds", {"order_id": "o-1"})
            results: list[Any] = []

            async def resume() -> None:
                try:
                    results.append(await flow.resume("ev-1", {"approved": True}))
                except Conflict as exc:
                    results.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(resume)
                tg.start_soon(resume)
    wins = [r for r in results if not isinstance(r, Conflict)]
    assert len(wins) == 1 and wins[0].status == "completed" and len(results) == 2
    assert system.payments.calls == ["ev-1:refund"] and len(system.comms.messages) == 1


async def test_an_await_that_times_out_fails_the_run_or_takes_its_on_timeout_steps() -> None:
    system = System()
    clock = [1000.0]

    def escalate(state: State) -> dict[str, bool]:
        return {"approved": True}  # nobody answered: the policy approves small refunds

    async with runtime() as rt:
        rt.store.clock = lambda: clock[0]
        strict = micro.NewFlow("refund", trigger="refunds", steps=refund_steps(), provider=decide_model(),
                               runtime=rt)
        lenient = micro.NewFlow("refund2", trigger="refunds2", steps=refund_steps(on_timeout=[escalate]),
                                provider=decide_model(), runtime=rt)
        async with await started(rt, system, strict), lenient:
            await strict.run_event("ev-1", "refunds", {"order_id": "o-1"})
            await lenient.run_event("ev-2", "refunds2", {"order_id": "o-2"})
            assert await strict.expire_waits() == [] and await lenient.expire_waits() == []
            clock[0] += 2 * 86400
            assert await strict.expire_waits() == ["ev-1"]
            assert await lenient.expire_waits() == ["ev-2"]
            failed = await strict.runs.get("ev-1")
            taken = await lenient.runs.get("ev-2")
            with pytest.raises(Conflict, match="not waiting"):
                await strict.resume("ev-1", {"approved": True})
    assert failed is not None and failed.status == "failed" and failed.error_kind == "step"
    assert "step manager: nobody gave it input within its timeout of 172800s" in failed.error
    assert taken is not None and taken.status == "completed"
    assert taken.steps["manager"] == {"approved": True} and taken.steps["manager.on_timeout.escalate"]
    assert system.payments.effects == {"ev-2:refund": 40}


async def test_an_await_is_satisfied_by_a_matching_event() -> None:
    system = System()
    steps = [Call("orders", "Orders.Get", name="order", request={"id": "{order_id}"}),
             Await("payment", topic="events.payment.settled", match="order_id"),
             lambda s: {"paid": s["payment"]["amount"], "for": s["order"]["id"]}]
    async with runtime() as rt:
        flow = micro.NewFlow("ship", trigger="events.order", steps=steps, runtime=rt)
        async with await started(rt, system, flow):
            run = await flow.run_event("ev-1", "events.order", {"order_id": "o-9"})
            assert run.status == "waiting"
            await rt.broker.publish("events.payment.settled", {"order_id": "o-8", "amount": 1},
                                    headers={"Micro-Id": "p-0"})  # another order's: not this run's
            await rt.broker.publish("events.payment.settled", {"order_id": "o-9", "amount": 12},
                                    headers={"Micro-Id": "p-1"})
            with anyio.fail_after(10):
                while (r := await flow.runs.get("ev-1")) is None or r.status != "completed":
                    await anyio.wait_all_tasks_blocked()
    assert r.steps["payment"] == {"order_id": "o-9", "amount": 12}
    assert r.steps["step3"] == {"paid": 12, "for": "o-9"}


async def test_finished_steps_never_run_again_and_calls_carry_per_step_keys() -> None:
    system = System()
    fails = [1]

    def flaky(state: State) -> str:
        if fails[0]:
            fails[0] -= 1
            raise RuntimeError("disk full")
        return "ok"

    steps = [Call("orders", "Orders.Get", name="order", request={"id": "{order_id}"}),
             Call("payments", "Payments.Refund", name="refund", request={"id": "{order.id}", "total": "{order.total}"}),
             flaky]
    async with runtime() as rt:
        flow = micro.NewFlow("f", trigger="t", steps=steps, runtime=rt)
        async with await started(rt, system, flow):
            with pytest.raises(RuntimeError):
                await flow.run_event("ev-1", "t", {"order_id": "o-1"})  # a redelivering broker retries it
            first = await flow.runs.get("ev-1")
            run = await flow.run_event("ev-1", "t", {"order_id": "o-1"})  # the redelivery
    assert first is not None and first.status == "retrying" and first.trace["flaky"].status == "failed"
    assert "step flaky: RuntimeError: disk full" in first.trace["flaky"].error
    assert run.status == "completed" and run.attempts == 2 and run.trace["flaky"].attempts == 2
    assert system.orders.calls == ["o-1"] and system.payments.calls == ["ev-1:refund"]
    # a template string that is one field is that field's value (a number stays a number)
    assert run.steps["refund"] == {"refunded": 40}


async def test_a_transient_failure_retries_in_place_and_a_refusal_fails_the_run_naming_the_step() -> None:
    system = System()
    system.payments.fail_next = 2
    steps = [Call("payments", "Payments.Refund", request=lambda s: {"id": "o", "total": 5}, retry=2)]
    async with runtime() as rt:
        flow = micro.NewFlow("f", trigger="t", steps=steps, runtime=rt)
        refused = micro.NewFlow("g", trigger="u", steps=[Call("orders", "Orders.Get", request={"id": "missing"})],
                                runtime=rt)
        async with await started(rt, system, flow), refused:
            run = await flow.run_event("ev-1", "t", {})
            bad = await refused.run_event("ev-2", "u", {})
    assert run.status == "completed" and run.trace["payments"].attempts == 3
    assert system.payments.calls == ["ev-1:payments"] * 3 and system.payments.effects == {"ev-1:payments": 5}
    assert bad.status == "failed" and bad.error == "step orders: NotFound: no order missing"


async def test_loop_runs_until_its_condition_and_verify_feeds_back_into_the_next_attempt() -> None:
    seen: list[tuple[int, str | None]] = []

    def count(state: State) -> int:
        return (state.data if isinstance(state.data, int) else 0) + 1

    def draft(state: State) -> str:
        seen.append((state.iteration, state.feedback))
        return "short" if state.feedback is None else "a longer draft"

    def long_enough(state: State) -> tuple[bool, str]:
        return len(state.data) > 5, "make it longer"

    steps = [Loop([count], until=lambda s: s.data >= 3, max=5, name="counting"),
             Verify([draft], check=long_enough, attempts=3, name="writing"),
             Loop([count], max=2, name="twice")]
    async with runtime() as rt:
        flow = micro.NewFlow("f", trigger="t", steps=steps, runtime=rt)
        run = await flow.run_event("ev-1", "t", {})
        never = micro.NewFlow("g", trigger="t", steps=[Loop([count], until=lambda s: False, max=2, name="l")],
                              runtime=rt)
        bad = await never.run_event("ev-2", "t", {})
        picky = micro.NewFlow("h", trigger="t", steps=[Verify([draft], check=lambda s: (False, "no"), attempts=2)],
                              runtime=rt)
        rejected = await picky.run_event("ev-3", "t", {})
    assert run.status == "completed", run.error
    assert run.steps["counting"] == 3 and run.steps["counting[2].count"] == 3 and "counting[3].count" not in run.steps
    assert [run.steps[f"counting[{i}]:until"] for i in range(3)] == [False, False, True]
    assert run.steps["writing"] == "a longer draft"
    assert run.steps["writing[0]:check"] == {"ok": False, "feedback": "make it longer"}
    assert seen[:2] == [(0, None), (1, "make it longer")]
    assert run.steps["twice"] == 2 and run.steps["twice[0].count"] == 1  # each iteration starts from the data
    assert bad.status == "failed" and "step l: the loop ran its max=2 iterations" in bad.error
    assert rejected.status == "failed"
    assert rejected.error == "step verify: no attempt passed the check in 2 attempts; the last feedback: no"


async def test_an_llm_step_calls_tools_with_keys_per_step_and_attempt_and_an_llm_grader_checks() -> None:
    counter = Counter()

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        text = messages[0].text
        if "Answer only with JSON" in text:
            ok = "second" in text.split("The output to grade:")[1]
            return msgspec.json.encode({"ok": ok, "feedback": "" if ok else "try harder"}).decode()
        if any(isinstance(b, ToolResultBlock) for b in messages[-1].content):
            return "first" if "try harder" not in text else "second"
        return scripted.call("counter_Counter_Add", job=1)

    steps = [Verify([LLM("Add job 1. {feedback}", services=["counter"], name="work")],
                    check="Is it the final answer?", attempts=2, name="check")]
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("f", trigger="t", steps=steps, provider=scripted.function(brain), runtime=rt)
        outside = micro.NewFlow("g", trigger="t", steps=[LLM("{feedback}")], provider=scripted.function(brain),
                                runtime=rt)
        async with svc, flow, outside:
            run = await flow.run_event("ev-1", "t", {})
            failed = await outside.run_event("ev-0", "t", {})  # {feedback} is only there inside a Verify
    assert failed.status == "failed" and "step llm: prompt: no step output or event field 'feedback'" in failed.error
    assert run.status == "completed", run.error
    assert run.steps["check"] == "second" and run.steps["check[0]:check"]["ok"] is False
    keys = [k for _, k in counter.calls]
    assert len(keys) == 2 and keys[0] != keys[1]  # one call per attempt, each with its own key
    assert keys[0].startswith("ev-1:check[0].work:") and keys[1].startswith("ev-1:check[1].work:")


async def test_direct_runs_rpc_and_status_filter() -> None:
    system = System()
    async with runtime() as rt:
        flow = micro.NewFlow("refund", trigger="refunds", steps=refund_steps(), provider=decide_model(), runtime=rt)
        async with await started(rt, system, flow):
            run = await flow.run({"order_id": "o-3"})
            assert run.status == "waiting" and run.topic == "direct" and len(run.id) == 32
            rsp = await rt.client.call("refund", "Flow.Run", {"data": {"order_id": "missing"}})
            assert rsp["run"]["status"] == "failed"
            assert rsp["run"]["error"] == "step order: NotFound: no order missing"
            waiting = await rt.client.call("refund", "Flow.Runs", {"status": ["waiting"]})
            assert [r["id"] for r in waiting["runs"]] == [run.id]
            with pytest.raises(BadRequest, match="unknown status \\['asleep'\\]"):
                await rt.client.call("refund", "Flow.Runs", {"status": ["asleep"]})
            with pytest.raises(BadRequest, match="does not fit its schema"):
                await rt.client.call("refund", "Flow.Resume", {"id": run.id, "input": {"approved": 3}})


async def test_a_schedule_fires_each_tick_once_across_replicas() -> None:
    ticks: list[str] = []

    def report(state: State) -> str:
        ticks.append(state.event["tick"])
        return "sent"

    async with runtime() as rt:
        replicas = [micro.NewFlow("nightly", every="15m", steps=[report], runtime=rt) for _ in range(2)]
        fired: list[bool] = []
        base = 1_700_000_100.0
        for i in range(20):
            async with anyio.create_task_group() as tg:
                for r in replicas:
                    async def fire(r: micro.Flow = r, tick: float = base + 900 * i) -> None:
                        fired.append(await r.fire(tick))
                    tg.start_soon(fire)
        runs = await replicas[0].runs.list(100)
        assert await replicas[1].last_tick() == base + 900 * 19
    assert fired.count(True) == 20 and len(fired) == 40
    assert len(ticks) == 20 and len(set(ticks)) == 20
    assert sorted(r.id for r in runs) == [tick_id(base + 900 * i) for i in range(20)]
    assert all(r.status == "completed" and r.topic == "schedule" for r in runs)


async def test_a_started_schedule_fires_on_its_ticks() -> None:
    ticks: list[float] = []
    three = anyio.Event()

    def record(state: State) -> None:
        ticks.append(state.event["scheduled"])
        if len(ticks) == 3:
            three.set()

    async with runtime() as rt:
        flow = micro.NewFlow("fast", every="50ms", steps=[record], runtime=rt)
        async with flow:
            with anyio.fail_after(10):
                await three.wait()
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    assert all(abs(t * 20 - round(t * 20)) < 1e-6 for t in ticks)  # on the period's grid: replicas agree on them


def test_schedules_compute_ticks_and_refuse_bad_expressions() -> None:
    cron = Schedule("f", cron="0 2 * * *")
    t = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    assert cron.next_after(t) == 1_700_013_600.0 and cron.latest(t) == 1_699_927_200.0
    assert cron.latest(1_700_013_600.0) == 1_700_013_600.0 and cron.next_after(1_700_013_600.0) == 1_700_100_000.0
    every = Schedule("f", every="15m")
    assert (every.next_after(900.0), every.next_after(899.0), every.latest(1799.0)) == (1800.0, 900.0, 900.0)
    with pytest.raises(UsageError, match="flow f: schedule '0 25 \\* \\* \\*' is not a cron expression"):
        Schedule("f", cron="0 25 * * *")
    with pytest.raises(UsageError, match="give schedule= \\(cron\\) or every=, not both"):
        Schedule("f", cron="* * * * *", every=5)
    with pytest.raises(UsageError, match="catch_up must be 'one' or 'none'"):
        Schedule("f", every=5, catch_up="all")
    with pytest.raises(UsageError, match="flow f: every: 'soon' is not a duration"):
        Schedule("f", every="soon")


def test_bad_definitions_are_refused_when_the_flow_is_built() -> None:
    call = Call("orders", "Orders.Get")
    cases: list[tuple[Any, str]] = [
        (lambda: {"steps": [call, Call("orders", "Orders.List")]},
         "two steps are named 'orders'; step outputs are stored by name, so give each a name="),
        (lambda: {"steps": [Dispatch("a", message="{later.x}"), Call("s", "S.T", name="later")]},
         "step a: the message template names {later}: the output of step 'later', which has not run by then"),
        (lambda: {"steps": [Dispatch("a", message="{a}")]}, "the output of itself"),
        (lambda: {"steps": [Dispatch("a", message="{oops")]}, "step a: message: the template is malformed"),
        (lambda: {"steps": [call, Await("ok", timeout="soon")]}, "step ok: timeout: 'soon' is not a duration"),
        (lambda: {"steps": [Loop([call], max=0)]}, "step loop: max must be a whole number of iterations"),
        (lambda: {"steps": [Verify([call], check=3)]}, "step verify: check must be a function"),  # type: ignore[arg-type]
        (lambda: {"steps": [Call("orders", "Get")]}, "Call needs a service and an endpoint such as 'Orders.Get'"),
        (lambda: {"steps": [Call("o", "O.G", name="data")]}, "'data' is reserved in templates"),
        (lambda: {"steps": [Call("o", "O.G", name="a.b")]}, "a step name is letters, digits"),
        (lambda: {"steps": [call], "prompt": "hi"}, "a flow with step kinds takes all its work as steps"),
        (lambda: {"steps": [call], "needs_approval": ["x"]}, "wait for a person with an Await step"),
        (lambda: {"steps": [Await("a", topic="t")]}, "give an Await both topic= and match="),
        (lambda: {"steps": [Await("a", on_timeout=[call])]}, "on_timeout steps need a timeout="),
        (lambda: {"steps": [Await("dead-letters", topic="t", match="id")]},
         "flow f: step dead-letters: an Await step on a topic cannot be named 'dead-letters'"),
        (lambda: {"steps": [Await("dead-letters-1a2b3c4d", topic="t", match="id")]},
         "flow f: step dead-letters-1a2b3c4d: an Await step on a topic cannot be named 'dead-letters'"),
        (lambda: {"steps": [call, 3]}, "a step must be Call, LLM, Dispatch, Await, Loop, Verify or a function, not 3"),
        (lambda: {"steps": [call], "schedule": "every day"}, "schedule 'every day' is not a cron expression"),
    ]
    for make, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            micro.NewFlow("f", provider="scripted", **{"trigger": "t", **make()})
    with pytest.raises(UsageError, match=r"give it a trigger topic, .* or a schedule"):
        micro.NewFlow("f", steps=[call])


async def test_bad_data_at_run_time_fails_the_run_with_the_step_named() -> None:
    class Opaque:
        pass

    async with runtime() as rt:
        unknown = micro.NewFlow("f", trigger="t", steps=[lambda s: 1, Dispatch("a", message="{nothing.x}")],
                                runtime=rt)
        run = await unknown.run_event("ev-1", "t", {"id": 1})
        opaque = micro.NewFlow("g", trigger="t", steps=[Fn(lambda s: Opaque(), name="odd")], runtime=rt)
        odd = await opaque.run_event("ev-2", "t", {})
    assert run.status == "failed" and run.error_kind == "template"
    assert run.error == ("step a: message: no step output or event field 'nothing.x' (step outputs so far: "
                         "step1; event fields: id)")
    assert odd.status == "failed" and odd.error_kind == "step_result"
    assert odd.error.startswith("step odd returned a Opaque the run record cannot hold")
