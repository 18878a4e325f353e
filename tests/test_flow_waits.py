"""A flow's model step on the agents' run engine (issue 15): it waits for approval, and the agents' commands
continue it; the event is acknowledged once the run is recorded as paused, and a redelivery does not rerun it."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from test_flow import Counter, job_model, runtime

import micro
from micro.errors import BadRequest, Conflict, UsageError
from micro.flow import FlowRun


def flow_on(rt: micro.Runtime, model: Any, after: list[Any] | None = None, **kw: Any) -> micro.Flow:
    kw.setdefault("needs_approval", ["counter_Counter_*"])
    return micro.NewFlow("jobs", trigger="jobs.new", prompt="Run job {job}.", services=["counter"],
                         provider=model, runtime=rt, after=after or [], **kw)


async def test_a_flow_run_waits_for_approval_and_the_agents_commands_continue_it() -> None:
    counter = Counter()
    model = job_model()
    finished: list[str] = []

    async def notify(event: dict[str, Any], run: FlowRun) -> str:
        finished.append(run.reply)
        return "notified"

    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        async with svc, flow_on(rt, model, after=[notify]) as flow:
            run = await flow.run_event("ev-1", "jobs.new", {"job": 7})
            assert run.status == "paused" and counter.calls == [] and finished == []
            again = await flow.run_event("ev-1", "jobs.new", {"job": 7})  # a redelivery: not run again
            assert again.status == "paused" and len(model.calls) == 1
            pending = await rt.client.call("jobs", "AgentInfo.Pending", {})
            (waiting,) = pending["runs"]
            assert waiting["id"] == "ev-1" and waiting["pending"][0]["tool"] == "counter_Counter_Add"
            with pytest.raises(BadRequest, match="replaying it now would run its steps"):
                await rt.client.call("jobs", "Flow.Replay", {"id": "ev-1"})

            rsp = await rt.client.call("jobs", "Agent.Resume", {"run_id": "ev-1", "approve_all": True})
            assert (rsp["status"], rsp["reply"]) == ("completed", "done 1")
            done = await flow.runs.get("ev-1")
            assert done is not None and done.status == "completed" and done.reply == "done 1"
            assert done.steps["after[0]:notify"] == "notified" and finished == ["done 1"]
            with pytest.raises(Conflict, match="run ev-1 is completed, not waiting"):
                await flow.resume("ev-1", approve=True)
    assert [job for job, _ in counter.calls] == [7]
    assert counter.calls[0][1] == micro.idempotency.derived_key("ev-1", "counter", "Counter.Add", {"job": 7})


async def test_a_denied_flow_call_is_a_refusal_the_model_reads_and_cancel_ends_a_waiting_flow_run() -> None:
    counter = Counter()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        async with svc, flow_on(rt, job_model()) as flow:
            await flow.run_event("ev-2", "jobs.new", {"job": 2})
            rsp = await flow.resume("ev-2", approve=False, reason="not on Sundays")
            assert rsp.status == "completed"
            assert rsp.reply == ("failed: the call to counter_Counter_Add was not approved by a person: "
                                 "not on Sundays")
            await flow.run_event("ev-3", "jobs.new", {"job": 3})
            cancelled = await flow.cancel("ev-3", reason="obsolete")
            run = await flow.runs.get("ev-3")
    assert counter.calls == [] and cancelled.status == "cancelled"
    assert run is not None and (run.status, run.error) == ("cancelled", "cancelled by a person: obsolete")


async def test_flow_approval_options_are_checked_at_construction() -> None:
    with pytest.raises(UsageError, match="needs_approval must be a list"):
        micro.NewFlow("f", trigger="t", prompt="p", provider="scripted", needs_approval="x")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="builtins must be a list of built-in tools"):
        micro.NewFlow("f", trigger="t", prompt="p", provider="scripted", builtins=["shell"])


async def test_a_flow_run_record_of_the_model_step_is_an_agent_run() -> None:
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(Counter())
        async with svc, flow_on(rt, job_model(), needs_approval=[]) as flow:
            await flow.run_event("ev-4", "jobs.new", {"job": 4})
            (rec,) = await rt.store.read("agent/jobs/runs/ev-4")
    from micro.agent.record import AgentRun

    run = msgspec.json.decode(rec.value, type=AgentRun)
    assert (run.status, run.agent, run.message, run.reply) == ("completed", "jobs", "Run job 4.", "done 1")
    assert [c.state for c in run.tool_calls] == ["done"]


async def test_a_flow_whose_agent_pauses_fails_for_good_naming_the_agents_waiting_run() -> None:
    counter = Counter()
    async with runtime() as rt:
        svc = micro.New("counter", runtime=rt)
        svc.handle(counter)
        agent = micro.NewAgent("job-mgr", services=["counter"], provider=job_model(), runtime=rt,
                               needs_approval=["counter_*"])
        flow = micro.NewFlow("jobs", trigger="jobs.new", prompt="Run job {job}.", agent="job-mgr", runtime=rt)
        async with svc, agent, flow:
            run = await flow.run_event("ev-5", "jobs.new", {"job": 5})
            (waiting,) = await agent.pending()
    assert (run.status, run.error_kind) == ("failed", "agent_waits")
    assert f"agent job-mgr paused its run {waiting.id} (waiting for a person)" in run.error
    assert counter.calls == [] and "agent" not in run.steps  # no reply checkpointed for the step
