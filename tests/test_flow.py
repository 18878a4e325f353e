"""Flows on the memory broker: the pipeline, checkpoints, idempotency, templates, concurrency, replay."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.agent.loop import EndRun, Run
from micro.agent.tools import function_tool
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import UsageError
from micro.flow import Flow, FlowRun, TemplateError, render


class AddRequest(msgspec.Struct):
    job: int


class AddResponse(msgspec.Struct):
    total: int
    key: str


class Counter:
    """A side-effecting service that remembers which idempotency keys it has applied."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.effects: dict[str, int] = {}
        self.fail_next = 0

    async def Add(self, req: AddRequest) -> AddResponse:
        """Count a job once per idempotency key."""
        key = micro.context.metadata().get("idempotency-key", "")
        self.calls.append((req.job, key))
        if self.fail_next:
            self.fail_next -= 1
            raise micro.errors.Unavailable("counter is having a bad day")
        self.effects.setdefault(key, req.job)
        return AddResponse(len(self.effects), key)


def job_model(**kw: Any) -> scripted.ScriptedModel:
    """Calls counter_Counter_Add with the job number from the prompt, then answers 'done N'."""

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        last = messages[-1]
        results = [b for b in last.content if isinstance(b, ToolResultBlock)]
        if results:
            if results[0].is_error:
                return f"failed: {results[0].content}"
            return f"done {msgspec.json.decode(results[0].content)['total']}"
        job = int(messages[0].text.split("job ")[1].split(".")[0])
        return scripted.call("counter_Counter_Add", job=job)

    return scripted.function(brain, **kw)


def runtime() -> micro.Runtime:
    return micro.Runtime(registry="memory://", store="memory://", broker="memory://")


def test_render_fills_fields_and_refuses_missing_ones() -> None:
    event = {"name": "Dana", "profile": {"email": "d@x.io"}, "tags": ["a", "b"]}
    assert render("Hi {name} <{profile.email}> {tags.1}", event) == "Hi Dana <d@x.io> b"
    assert render("{data}", {"a": 1}) == '{"a":1}'
    assert render("{profile}", event) == '{"email":"d@x.io"}'
    with pytest.raises(TemplateError, match=r"no field 'profile\.phone'"):
        render("{profile.phone}", event)
    with pytest.raises(TemplateError, match="no field '__class__'"):
        render("{__class__}", event)
    with pytest.raises(TemplateError, match="malformed"):
        render("{unclosed", event)


def test_flow_needs_a_trigger_and_work() -> None:
    with pytest.raises(UsageError, match="trigger"):
        Flow("f", trigger="", prompt="x", provider=scripted.turns())
    with pytest.raises(UsageError, match="prompt"):
        Flow("f", trigger="t")


async def test_event_runs_the_tool_loop_and_is_recorded() -> None:
    counter = Counter()
    model = job_model()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=model, runtime=rt)
        async with svc, flow:
            assert flow.record.metadata["type"] == "flow"
            assert flow.record.metadata["trigger"] == "jobs.created"
            run = await flow.run_event("ev-1", "jobs.created", {"n": 7})
            assert run.status == "completed" and run.reply == "done 1" and run.attempts == 1
            assert run.prompt == "Process job 7."
            (call,) = run.tool_calls
            assert call.name == "counter_Counter_Add" and call.input == {"job": 7}
            assert call.key.startswith("ev-1:counter.Counter.Add:")
            assert counter.calls == [(7, call.key)]  # the service saw the idempotency key
            stored = await flow.runs.get("ev-1")
            assert stored is not None and stored.status == "completed"

            # the same event again (a redelivery): acknowledged without running
            again = await flow.run_event("ev-1", "jobs.created", {"n": 7})
            assert again.attempts == 1 and len(model.calls) == 2 and len(counter.calls) == 1

            # through the broker: a published event becomes a run
            await svc.client.publish("jobs.created", {"n": 8}, headers={"Micro-Id": "ev-2"})
            with anyio.fail_after(10):
                while (r := await flow.runs.get("ev-2")) is None or r.status != "completed":
                    await anyio.wait_all_tasks_blocked()
            assert counter.effects[r.tool_calls[0].key] == 8


async def test_a_retried_event_reuses_completed_steps_and_tool_calls() -> None:
    counter = Counter()
    seen: list[str] = []
    attempts = {"n": 0}

    async def prepare(event: dict[str, Any], run: FlowRun) -> dict[str, Any]:
        seen.append("prepare")
        return {"n": event["n"] * 10}

    async def finish(event: dict[str, Any], run: FlowRun) -> str:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("crash after the tool call")
        seen.append("finish")
        return run.reply.upper()

    model = job_model()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=model, steps=[prepare], after=[finish], runtime=rt)
        async with svc, flow:
            with pytest.raises(RuntimeError, match="crash after the tool call"):
                await flow.run_event("ev-9", "jobs.created", {"n": 3})
            first = await flow.runs.get("ev-9")
            assert first is not None and first.status == "retrying" and first.error_kind == "RuntimeError"
            assert first.steps == {"before[0]:prepare": {"n": 30}} and len(first.tool_calls) == 1

            run = await flow.run_event("ev-9", "jobs.created", {"n": 3})
    assert run.status == "completed" and run.attempts == 2
    assert run.steps == {"before[0]:prepare": {"n": 30}, "after[0]:finish": "DONE 1"}
    assert seen == ["prepare", "finish"]  # prepare ran once
    assert len(counter.calls) == 1  # the tool call was reused, not repeated
    assert len(run.tool_calls) == 1


async def test_a_transient_tool_failure_ends_the_run_and_is_retried_with_the_same_idempotency_key() -> None:
    counter = Counter()
    counter.fail_next = 1
    model = job_model()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=model, runtime=rt)
        async with svc, flow:
            # Unavailable is transient: the run fails (the broker redelivers), the model does not carry on
            with pytest.raises(EndRun, match=r"tool counter_Counter_Add failed: Unavailable: counter is having"):
                await flow.run_event("ev-3", "jobs.created", {"n": 5})
            first = await flow.runs.get("ev-3")
            assert first is not None and first.status == "retrying" and first.error_kind == "Unavailable"
            assert first.error == "tool counter_Counter_Add failed: Unavailable: counter is having a bad day"
            (failed,) = first.tool_calls
            assert failed.is_error and failed.name == "counter_Counter_Add"
            assert failed.result == "Unavailable: counter is having a bad day"
            assert len(model.calls) == 1  # the model never saw the failure

            run = await flow.run_event("ev-3", "jobs.created", {"n": 5})  # the redelivery
    assert run.status == "completed" and run.reply == "done 1" and run.attempts == 2
    assert [c.is_error for c in run.tool_calls] == [True, False]
    keys = {k for _, k in counter.calls}
    assert len(counter.calls) == 2 and len(keys) == 1
    assert list(counter.effects.values()) == [5]


class Picky:
    """Refuses job 0 (a deterministic error); hangs on job 99 until released."""

    def __init__(self) -> None:
        self.release = anyio.Event()

    async def Add(self, req: AddRequest) -> AddResponse:
        """Count a job."""
        if req.job == 0:
            raise micro.errors.BadRequest("job must be positive")
        if req.job == 99:
            await self.release.wait()
        return AddResponse(req.job, "")


async def test_a_deterministic_tool_error_goes_back_to_the_model_and_is_recorded() -> None:
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(Picky(), name="Counter")
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=job_model(), runtime=rt)
        async with svc, flow:
            run = await flow.run_event("ev-0", "jobs.created", {"n": 0})
    assert run.status == "completed" and run.reply == "failed: BadRequest: job must be positive"
    (call,) = run.tool_calls
    assert call.is_error and call.result == "BadRequest: job must be positive"


async def test_a_tool_call_past_tool_timeout_ends_the_run_as_a_timeout() -> None:
    picky = Picky()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(picky, name="Counter")
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=job_model(), tool_timeout=0.2, runtime=rt)
        async with svc, flow:
            with pytest.raises(EndRun, match=r"counter_Counter_Add failed: Timeout"):
                await flow.run_event("ev-99", "jobs.created", {"n": 99})
            picky.release.set()
            run = await flow.runs.get("ev-99")
    assert run is not None and run.status == "retrying" and run.error_kind == "Timeout"
    assert run.tool_calls[0].is_error


async def test_a_transient_failure_among_parallel_tool_calls_ends_the_run_as_itself() -> None:
    counter = Counter()

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if any(isinstance(b, ToolResultBlock) for b in messages[-1].content):
            return "done"
        return scripted.turn(scripted.call("counter_Counter_Add", job=1), scripted.call("counter_Counter_Add", job=2))

    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process both.", services=["counter"],
                             provider=scripted.function(brain), runtime=rt)
        async with svc, flow:
            counter.fail_next = 1  # whichever call comes first fails; the other completes and is recorded
            with pytest.raises(EndRun, match="Unavailable"):  # not an ExceptionGroup
                await flow.run_event("ev-p", "jobs.created", {})
            first = await flow.runs.get("ev-p")
            assert first is not None and sorted(c.is_error for c in first.tool_calls) == [False, True]
            run = await flow.run_event("ev-p", "jobs.created", {})
    assert run.status == "completed" and run.reply == "done"
    assert len(counter.calls) == 3 and sorted(counter.effects.values()) == [1, 2]  # one call reused


async def test_end_run_leaves_the_agent_loop_as_itself_and_other_tool_errors_do_not() -> None:
    async def flaky(n: int) -> str:
        """Fails for good."""
        raise EndRun("flaky", micro.errors.Unavailable("down"))

    async def broken(n: int) -> str:
        """Raises an ordinary error."""
        raise micro.errors.Unavailable("down")

    async def fine(n: int) -> str:
        """Works."""
        return f"ok {n}"

    tools = {t.name: t for t in (function_tool(flaky), function_tool(broken), function_tool(fine))}

    async def get_tools() -> dict[str, Any]:
        return tools

    # without EndRun (agents): a tool's error is an is_error result for the model
    model = scripted.turns(scripted.turn(scripted.call("broken", n=1), scripted.call("fine", n=2)), "answered")
    loop = Run(model, None, get_tools)
    assert await loop([], Message.user("go")) == "answered"
    assert [c.is_error for c in loop.calls] == [True, False]
    # a tool that raises EndRun ends the run with it, also from concurrent calls
    model = scripted.turns(scripted.turn(scripted.call("flaky", n=1), scripted.call("fine", n=2)), "never")
    loop = Run(model, None, get_tools)
    with pytest.raises(EndRun, match="tool flaky failed: Unavailable: down") as caught:
        await loop([], Message.user("go"))
    assert isinstance(caught.value.error, micro.errors.Unavailable)
    assert {c.name: c.is_error for c in loop.calls} == {"flaky": True, "fine": False}


async def test_missing_template_field_is_recorded_not_retried() -> None:
    async with runtime() as rt:
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Job {n} for {owner.email}",
                             provider=scripted.turns(), runtime=rt)
        async with flow:
            run = await flow.run_event("ev-x", "jobs.created", {"n": 1})
            assert run.status == "failed" and run.error_kind == "template"
            assert "no field 'owner.email'" in run.error
            # recorded, so a redelivery would run it again only because it is not "completed"
            assert (await flow.runs.get("ev-x")) is not None


async def test_concurrency_is_bounded_by_max_concurrency() -> None:
    gate = anyio.Event()
    inside = 0
    peak = 0
    two_in = anyio.Event()

    async def step(event: dict[str, Any], run: FlowRun) -> int:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        if inside == 2:
            two_in.set()
        await gate.wait()
        inside -= 1
        return int(event["n"])

    async with runtime() as rt:
        flow = micro.NewFlow("jobs", trigger="jobs.created", steps=[step], max_concurrency=2, runtime=rt)
        async with flow:
            for n in range(10):
                await flow.client.publish("jobs.created", {"n": n}, headers={"Micro-Id": f"e{n}"})
            with anyio.fail_after(10):
                await two_in.wait()
                await anyio.wait_all_tasks_blocked()
                assert inside == 2  # eight events wait their turn
                gate.set()
                while len([r for r in await flow.runs.list(100) if r.status == "completed"]) < 10:
                    await anyio.wait_all_tasks_blocked()
    assert peak == 2


async def test_flow_can_hand_the_prompt_to_an_agent_and_replay_a_run() -> None:
    agent_model = scripted.function(lambda messages, tools: f"agent got: {messages[-1].text}")
    async with runtime() as rt:
        agent = micro.NewAgent("helper", services=[], provider=agent_model, runtime=rt)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Handle {n}", agent="helper", runtime=rt)
        async with agent, flow:
            run = await flow.run_event("ev-a", "jobs.created", {"n": 4})
            assert run.reply == "agent got: Handle 4"
            rsp = await rt.client.call("jobs", "Flow.Replay", {"id": "ev-a"})
            assert rsp["run"]["id"] == "ev-a-replay-1" and rsp["run"]["replay_of"] == "ev-a"
            assert rsp["run"]["status"] == "completed"
            runs = await rt.client.call("jobs", "Flow.Runs", {"limit": 10})
            assert {r["id"] for r in runs["runs"]} == {"ev-a", "ev-a-replay-1"}
            shown = await rt.client.call("jobs", "Flow.Show", {"id": "nope"})
            assert shown["run"] is None
            with pytest.raises(micro.errors.NotFound, match="no run 'nope'"):
                await rt.client.call("jobs", "Flow.Replay", {"id": "nope"})


async def test_replay_refuses_a_run_that_is_still_running_or_retrying() -> None:
    effects: list[str] = []
    entered = anyio.Event()
    gate = anyio.Event()

    async def charge(event: dict[str, Any], run: FlowRun) -> str:
        effects.append(run.id)
        entered.set()
        await gate.wait()
        return "charged"

    async with runtime() as rt:
        flow = micro.NewFlow("pay", trigger="pay.due", steps=[charge], runtime=rt)
        async with flow, anyio.create_task_group() as tg:
            tg.start_soon(flow.run_event, "ev-1", "pay.due", {"n": 1})
            with anyio.fail_after(10):
                await entered.wait()
            with pytest.raises(micro.errors.BadRequest, match="run 'ev-1' is running; replaying it now"):
                await rt.client.call("pay", "Flow.Replay", {"id": "ev-1"})
            assert effects == ["ev-1"]  # charged once
            gate.set()
        async with flow:
            run = await flow.runs.get("ev-1")
            assert run is not None and run.status == "completed"
            run.status = "retrying"  # the broker will deliver it again
            await flow.runs.put(run)
            with pytest.raises(micro.errors.BadRequest, match="is retrying"):
                await rt.client.call("pay", "Flow.Replay", {"id": "ev-1"})
            run.status = "failed"
            await flow.runs.put(run)
            rsp = await rt.client.call("pay", "Flow.Replay", {"id": "ev-1"})
    assert rsp["run"]["status"] == "completed" and effects == ["ev-1", "ev-1-replay-1"]


async def test_a_cancelled_run_is_recorded_as_cancelled_and_runs_again() -> None:
    entered = anyio.Event()
    hang = {"on": True}

    async def slow(event: dict[str, Any], run: FlowRun) -> str:
        entered.set()
        if hang["on"]:
            await anyio.sleep_forever()
        return "ok"

    async with runtime() as rt:
        flow = micro.NewFlow("slow", trigger="slow.x", steps=[slow], runtime=rt)
        async with flow:
            # a shutdown (or any cancellation) mid-run
            async with anyio.create_task_group() as tg:
                tg.start_soon(flow.run_event, "ev-1", "slow.x", {})
                with anyio.fail_after(10):
                    await entered.wait()
                tg.cancel_scope.cancel()
            run = await flow.runs.get("ev-1")
            assert run is not None and run.status == "cancelled" and run.error_kind == "cancelled"
            assert "cancelled before it completed" in run.error and "micro flow replay ev-1" in run.error
            # a replay whose deadline runs out is cancelled too, not left running
            with pytest.raises(micro.errors.Timeout):
                await rt.client.call("slow", "Flow.Replay", {"id": "ev-1"}, timeout=0.2)
            with anyio.fail_after(10):
                while (replay := await flow.runs.get("ev-1-replay-1")) is None or replay.status == "running":
                    await anyio.wait_all_tasks_blocked()
            assert replay.status == "cancelled"
            # the redelivery runs it again, and a cancelled run can be replayed
            hang["on"] = False
            again = await flow.run_event("ev-1", "slow.x", {})
            assert again.status == "completed" and again.attempts == 2 and again.error == ""
            rsp = await rt.client.call("slow", "Flow.Replay", {"id": "ev-1-replay-1"})
            assert rsp["run"]["status"] == "completed"


def test_a_value_its_format_spec_does_not_fit_is_a_template_error_naming_the_field() -> None:
    assert render("{amount:>6}", {"amount": 12}) == "    12"
    with pytest.raises(TemplateError, match=r"event field 'amount' \(null\) cannot be formatted with \{amount:>8\}"):
        render("Amount: {amount:>8}", {"amount": None})
    with pytest.raises(TemplateError, match=r"field 'order\.total' \(\"1\.5\"\) cannot be formatted"):
        render("{order.total:.2f}", {"order": {"total": "1.5"}})
    # {data} is the whole event, unless the event has a data field of its own
    assert render("{data}", {"a": 1}) == '{"a":1}'
    assert render("{data} {other}", {"data": "inner", "other": 1}) == "inner 1"


async def test_a_template_value_error_fails_the_run_for_good() -> None:
    async with runtime() as rt:
        flow = micro.NewFlow("pay", trigger="pay.due", prompt="Amount: {amount:>8}", provider=scripted.turns("ok"),
                             runtime=rt)
        async with flow:
            run = await flow.run_event("ev-1", "pay.due", {"amount": None})
    assert run.status == "failed" and run.error_kind == "template" and "'amount'" in run.error


async def test_a_failed_run_on_a_broker_that_never_redelivers_is_failed() -> None:
    async def boom(event: dict[str, Any], run: FlowRun) -> None:
        raise RuntimeError("boom")

    async with runtime() as rt:
        flow = micro.NewFlow("f", trigger="boom.x", steps=[boom], runtime=rt)
        async with flow:
            await rt.broker.publish("boom.x", {"n": 1}, headers={"Micro-Id": "ev-1"})
            with anyio.fail_after(10):
                while (run := await flow.runs.get("ev-1")) is None or run.status == "running":
                    await anyio.wait_all_tasks_blocked()
            assert run.status == "failed" and run.error == "RuntimeError: boom"
            # a replay is not delivered again either
            rsp = await rt.client.call("f", "Flow.Replay", {"id": "ev-1"})
            assert rsp["run"]["status"] == "failed"


async def test_steps_are_checkpointed_by_place_and_name() -> None:
    import functools

    ran: list[str] = []

    async def note(event: dict[str, Any], run: FlowRun) -> int:
        ran.append("note")
        return len(ran)

    async def agent(event: dict[str, Any], run: FlowRun) -> str:
        return "a step called agent"

    def add(k: int, event: dict[str, Any], run: FlowRun) -> int:
        return k

    helper = scripted.function(lambda messages, tools: f"agent got: {messages[-1].text}")
    async with runtime() as rt:
        helper_agent = micro.NewAgent("helper", services=[], provider=helper, runtime=rt)
        flow = micro.NewFlow("f", trigger="t.x", prompt="Handle {n}", agent="helper", runtime=rt,
                             steps=[lambda e, run: ran.append("A") or "a", lambda e, run: ran.append("B") or "b",
                                    note, note, agent, functools.partial(add, 1)],
                             after=[note])
        async with helper_agent, flow:
            run = await flow.run_event("ev-1", "t.x", {"n": 1})
    assert ran == ["A", "B", "note", "note", "note"]
    assert run.reply == "agent got: Handle 1"  # the step named agent did not stand in for the agent
    assert run.steps == {"before[0]:<lambda>": "a", "before[1]:<lambda>": "b", "before[2]:note": 3,
                         "before[3]:note": 4, "before[4]:agent": "a step called agent", "before[5]:add": 1,
                         "agent": "agent got: Handle 1", "after[0]:note": 5}


async def test_a_step_result_that_is_not_json_fails_the_run_for_good() -> None:
    class Receipt:
        pass

    effects: list[int] = []

    async def charge(event: dict[str, Any], run: FlowRun) -> Receipt:
        effects.append(run.attempts)
        return Receipt()

    async with runtime() as rt:
        flow = micro.NewFlow("pay", trigger="pay.due", steps=[charge], runtime=rt)
        async with flow:
            await rt.broker.publish("pay.due", {}, headers={"Micro-Id": "ev-1"})
            with anyio.fail_after(10):
                while (run := await flow.runs.get("ev-1")) is None or run.status == "running":
                    await anyio.wait_all_tasks_blocked()
    assert run.status == "failed" and run.error_kind == "step_result" and effects == [1]
    assert run.error.startswith("step before[0]:charge returned a Receipt the run record cannot hold")
    assert "must return JSON-able data" in run.error
