"""Flows on the memory broker: the pipeline, checkpoints, idempotency, templates, concurrency, replay."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

import micro
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
            assert call.name == "counter.Counter.Add" and call.input == {"job": 7}
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
            assert first.steps == {"prepare": {"n": 30}} and len(first.tool_calls) == 1

            run = await flow.run_event("ev-9", "jobs.created", {"n": 3})
    assert run.status == "completed" and run.attempts == 2
    assert run.steps == {"prepare": {"n": 30}, "finish": "DONE 1"}
    assert seen == ["prepare", "finish"]  # prepare ran once
    assert len(counter.calls) == 1  # the tool call was reused, not repeated
    assert len(run.tool_calls) == 1


async def test_a_failed_tool_call_is_retried_with_the_same_idempotency_key() -> None:
    counter = Counter()
    counter.fail_next = 1
    model = job_model()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Process job {n}.", services=["counter"],
                             provider=model, runtime=rt)
        async with svc, flow:
            run = await flow.run_event("ev-3", "jobs.created", {"n": 5})
            # the model saw the failure as a tool error and the run ended; the event is re-run
            assert run.status == "completed"
            run.status = "retrying"
            await flow.runs.put(run)
            run = await flow.run_event("ev-3", "jobs.created", {"n": 5})
    keys = {k for _, k in counter.calls}
    assert len(counter.calls) == 2 and len(keys) == 1
    assert list(counter.effects.values()) == [5]


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
