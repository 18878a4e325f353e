"""Runs that wait (issue 15): approval, questions, resume anywhere with exactly one winner, bad input.

In-process on memory backends with scripted models. "Another process" is a second
Runtime (its own registry and client, its own agent instance) sharing the one store,
which is what replicas sharing a store are; the tests across real OS processes are in
test_agent_recovery.py. Waiting is on events, never sleeps; expiry moves the store's clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

import micro
from micro.agent.engine import Checkpoint
from micro.agent.loop import Run, ToolCallRecord
from micro.agent.record import AgentRun
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import BadRequest, Conflict, NotFound, UsageError
from micro.store import Record
from micro.store.memory import MemoryStore

GUARD = 30.0  # a deadlock guard, never a timing assertion


class TransferReq(msgspec.Struct):
    to: str
    amount: int


class DeleteReq(msgspec.Struct):
    id: str


class Receipt(msgspec.Struct):
    ok: bool
    detail: str


class Ledger:
    def __init__(self) -> None:
        self.transfers: list[tuple[str, int, str | None]] = []
        self.deleted: list[str] = []

    async def Transfer(self, req: TransferReq) -> Receipt:
        """Move money to someone."""
        self.transfers.append((req.to, req.amount, micro.idempotency.current_key()))
        return Receipt(True, f"sent {req.amount} to {req.to}")

    async def DeleteEntry(self, req: DeleteReq) -> Receipt:
        """Delete a ledger entry."""
        self.deleted.append(req.id)
        return Receipt(True, f"deleted {req.id}")

    async def Balance(self, req: DeleteReq) -> Receipt:
        """Read a balance."""
        return Receipt(True, f"balance of {req.id}: 10")


def results_seen(messages: list[Message]) -> list[ToolResultBlock]:
    return [b for m in messages for b in m.content if isinstance(b, ToolResultBlock)]


def banker_brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    """Transfer and read the balance in one turn; then report every result it saw."""
    if not results_seen(messages[-1:]):
        return scripted.turn("Working. ",
                             scripted.call("ledger_Ledger_Transfer", to="bob", amount=5),
                             scripted.call("ledger_Ledger_Balance", id="me"))
    return " | ".join(f"{'ERR ' if r.is_error else ''}{r.content}" for r in results_seen(messages[-1:]))


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as s:
        yield s


def runtime(store: MemoryStore) -> micro.Runtime:
    return micro.Runtime(registry="memory://", store=store, broker="memory://")


def banker(rt: micro.Runtime, model: Any = None, **kw: Any) -> micro.Agent:
    kw.setdefault("needs_approval", ["ledger_Ledger_Transfer", "ledger_*_Delete*"])
    return micro.NewAgent("banker", services=["ledger"], prompt="You move money when asked.",
                          provider=model or scripted.function(banker_brain), runtime=rt, **kw)


def ledger_service(rt: micro.Runtime, ledger: Ledger) -> micro.Service:
    svc = micro.New("ledger", runtime=rt)
    svc.handle(ledger)
    micro.idempotency.enable(svc)
    return svc


async def stored(store: MemoryStore, run_id: str) -> tuple[bytes, int]:
    (rec,) = await store.read(f"agent/banker/runs/{run_id}")
    return rec.value, rec.version


# -- approval ----------------------------------------------------------------------------------


async def test_approval_pauses_the_run_the_other_calls_of_the_turn_run_and_approve_completes_it(
        store: MemoryStore) -> None:
    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt) as agent:
        rsp = await agent.ask("Transfer 5 EUR to Bob")
        assert rsp.status == "paused" and rsp.reply == ""
        (p,) = rsp.pending
        assert (p.tool, msgspec.json.decode(p.input), p.kind) == ("ledger_Ledger_Transfer", {"to": "bob", "amount": 5},
                                                                  "approval")
        assert "matches 'ledger_Ledger_Transfer'" in p.reason
        assert ledger.transfers == []  # not before a person says so
        # the balance call of the same turn ran, and its result is in the checkpoint
        run = await agent.runs.get(rsp.run_id)
        assert run is not None and run.status == "paused"
        states = {c.name: (c.state, c.result) for c in run.tool_calls}
        assert states["ledger_Ledger_Balance"] == ("done", '{"ok":true,"detail":"balance of me: 10"}')
        assert states["ledger_Ledger_Transfer"][0] == "pending"
        assert [r.id for r in await agent.pending()] == [rsp.run_id]
        assert len(run.turns) == 1  # the model turn that asked for the calls

        done = await agent.resume(rsp.run_id, approve={p.call_id: True})
        after = await agent.runs.get(rsp.run_id)
    # the resumed run keeps the turn before the pause (from the checkpoint) and adds the one after it
    assert after is not None and len(after.turns) == 2 and after.turns[0] == run.turns[0]
    assert after.turns[1].started >= max(c.started for c in after.tool_calls)
    assert done.status == "completed" and done.run_id == rsp.run_id
    assert done.reply == '{"ok":true,"detail":"sent 5 to bob"} | {"ok":true,"detail":"balance of me: 10"}'
    assert [(to, n) for to, n, _ in ledger.transfers] == [("bob", 5)]
    assert sorted(c.name for c in done.tool_calls) == ["ledger_Ledger_Balance", "ledger_Ledger_Transfer"]


async def test_a_denial_is_a_refused_result_the_model_reads_and_the_run_goes_on(store: MemoryStore) -> None:
    ledger = Ledger()
    model = scripted.function(banker_brain)
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt, model) as agent:
        rsp = await agent.ask("Transfer 5 EUR to Bob")
        done = await agent.resume(rsp.run_id, approve=False, reason="not today")
    assert done.status == "completed" and ledger.transfers == []
    refused = results_seen(model.calls[-1].messages[-1:])[0]
    assert refused.is_error and refused.content == (
        "the call to ledger_Ledger_Transfer was not approved by a person: not today")
    assert done.reply.startswith("ERR the call to ledger_Ledger_Transfer was not approved by a person: not today")


async def test_approve_hook_may_ask_for_function_tools_and_refusal_beats_asking(store: MemoryStore) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    def approve(tool: str, args: dict[str, Any]) -> Any:
        asked.append((tool, args))
        if tool == "wipe":
            return ("ask", "wiping needs a person")
        return tool != "ledger_Ledger_DeleteEntry" or (False, "never delete")

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not results_seen(messages[-1:]):
            return scripted.turn(scripted.call("wipe", what="cache"),
                                 scripted.call("ledger_Ledger_DeleteEntry", id="e1"))
        return " | ".join(r.content for r in results_seen(messages[-1:]))

    ledger = Ledger()
    wiped: list[str] = []
    async with runtime(store) as rt, ledger_service(rt, ledger):
        agent = banker(rt, scripted.function(brain), approve=approve)

        @agent.tool
        def wipe(what: str) -> str:
            """Wipe something."""
            wiped.append(what)
            return f"wiped {what}"

        async with agent:
            rsp = await agent.ask("clean up")
            assert rsp.status == "paused" and [(p.tool, p.reason) for p in rsp.pending] == [
                ("wipe", "wiping needs a person")]
            done = await agent.resume(rsp.run_id, approve=True)
    # the delete matched needs_approval, but the hook refused it: refused at once, no pause for it
    assert done.reply == "wiped cache | the call to ledger_Ledger_DeleteEntry was not approved: never delete"
    assert wiped == ["cache"] and ledger.deleted == []


async def test_a_question_makes_the_run_input_required_and_the_answer_is_the_tools_result(
        store: MemoryStore) -> None:
    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        seen = results_seen(messages[-1:])
        if not seen:
            return scripted.call("request_input", question="Which account?")
        return f"Using {seen[0].content}."

    model = scripted.function(brain)
    async with runtime(store) as rt, banker(rt, model) as agent:
        rsp = await agent.ask("pay the rent")
        assert rsp.status == "input_required"
        (p,) = rsp.pending
        assert (p.kind, p.question, p.tool) == ("question", "Which account?", "request_input")
        with pytest.raises(BadRequest, match=r"asked a question and needs an answer, not an approval"):
            await agent.resume(rsp.run_id, approve=True)
        done = await agent.resume(rsp.run_id, answer="the savings account")
    assert (done.status, done.reply) == ("completed", "Using the savings account.")
    assert any(t.name == "request_input" for t in model.calls[0].tools)


async def test_builtins_can_leave_request_input_out_and_bad_options_are_usage_errors(store: MemoryStore) -> None:
    model = scripted.turns("hi")
    async with runtime(store) as rt, banker(rt, model, builtins=[]) as agent:
        await agent.ask("hello")
    assert model.calls[0].tool_names == []
    with pytest.raises(UsageError, match="needs_approval must be a list"):
        micro.NewAgent("a", needs_approval="x_*", provider=scripted.turns("x"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="builtins must be a list of built-in tools"):
        micro.NewAgent("a", builtins=["shell"], provider=scripted.turns("x"))
    with pytest.raises(UsageError, match="pause_ttl must be a positive"):
        micro.NewAgent("a", pause_ttl=0, provider=scripted.turns("x"))


# -- resume anywhere, exactly once -------------------------------------------------------------


async def test_another_replica_sharing_the_store_resumes_the_run(store: MemoryStore) -> None:
    ledger = Ledger()
    async with runtime(store) as rt1, ledger_service(rt1, ledger), banker(rt1) as first:
        rsp = await first.ask("Transfer 5 EUR to Bob")
    # the first replica is gone; a new one (its own runtime, registry and ledger node) resumes the run
    ledger2 = Ledger()
    async with runtime(store) as rt2, ledger_service(rt2, ledger2), banker(rt2) as second:
        done = await second.resume(rsp.run_id, approve=True)
        again = await second.runs.get(rsp.run_id)
    assert done.status == "completed" and ledger.transfers == [] and len(ledger2.transfers) == 1
    assert again is not None and again.resumes == 1 and again.owner == second.id


async def test_two_racing_resumers_one_wins_the_other_gets_conflict(store: MemoryStore) -> None:
    ledger = Ledger()
    async with runtime(store) as rt1, runtime(store) as rt2, ledger_service(rt1, ledger):
        async with banker(rt1) as a:
            rsp = await a.ask("Transfer 5 EUR to Bob")
        one, two = banker(rt1), banker(rt2)
        # rt2 reaches the ledger in rt1 only through its registry: give it one of its own
        async with ledger_service(rt2, ledger), one, two:
            outcomes: list[Any] = []

            async def resume(agent: micro.Agent) -> None:
                try:
                    outcomes.append(await agent.resume(rsp.run_id, approve=True))
                except Conflict as exc:
                    outcomes.append(exc)

            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(resume, one)
                    tg.start_soon(resume, two)
    won = [o for o in outcomes if not isinstance(o, Exception)]
    lost = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(won) == 1 and len(lost) == 1 and won[0].status == "completed"
    assert rsp.run_id in str(lost[0]) and ("another resumer" in str(lost[0]) or "is completed" in str(lost[0])
                                           or "is running" in str(lost[0]))
    assert len(ledger.transfers) == 1  # approved once, done once


async def test_resume_over_rpc_and_conflict_travels_as_aborted(store: MemoryStore) -> None:
    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt):
        rsp = await rt.client.call("banker", "Agent.Chat", {"message": "Transfer 5 EUR to Bob"})
        assert rsp["status"] == "paused"
        call_id = rsp["pending"][0]["call_id"]
        assert msgspec.json.decode(rsp["pending"][0]["input"]) == {"to": "bob", "amount": 5}
        done = await rt.client.call("banker", "Agent.Resume",
                                    {"run_id": rsp["run_id"], "decisions": [{"call_id": call_id, "approve": True}]})
        assert done["status"] == "completed" and len(ledger.transfers) == 1
        with pytest.raises(Conflict, match=rf"run {rsp['run_id']} is completed, not waiting") as info:
            await rt.client.call("banker", "Agent.Resume", {"run_id": rsp["run_id"], "approve_all": True})
        assert info.value.code == "ABORTED"
        runs = await rt.client.call("banker", "AgentInfo.Runs", {"status": ["completed"]})
        assert [r["id"] for r in runs["runs"]] == [rsp["run_id"]]
        with pytest.raises(BadRequest, match="no run status 'done'"):
            await rt.client.call("banker", "AgentInfo.Runs", {"status": ["done"]})


async def test_stream_chat_ends_with_a_paused_event_and_stream_resume_finishes(store: MemoryStore) -> None:
    async with runtime(store) as rt, ledger_service(rt, Ledger()), banker(rt):
        events = [ev async for ev in rt.client.stream("banker", "Agent.StreamChat", {"message": "pay bob"})]
        assert events[-1]["type"] == "paused"
        assert [e["tool_call"]["name"] for e in events if e["type"] == "tool_end"] == ["ledger_Ledger_Balance"]
        run_id = events[-1]["response"]["run_id"]
        more = [ev async for ev in rt.client.stream("banker", "Agent.StreamResume",
                                                   {"run_id": run_id, "approve_all": True})]
    assert [e["tool_call"]["name"] for e in more if e["type"] == "tool_end"] == ["ledger_Ledger_Transfer"]
    assert more[-1]["type"] == "done" and more[-1]["response"]["status"] == "completed"


async def test_partial_decisions_are_kept_until_every_call_is_decided(store: MemoryStore) -> None:
    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not results_seen(messages[-1:]):
            return scripted.turn(scripted.call("ledger_Ledger_Transfer", to="bob", amount=5),
                                 scripted.call("ledger_Ledger_DeleteEntry", id="e9"))
        return " | ".join(r.content for r in results_seen(messages[-1:]))

    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt, scripted.function(brain)) as agent:
        rsp = await agent.ask("pay bob and drop e9")
        transfer, delete = rsp.pending
        half = await agent.resume(rsp.run_id, approve={delete.call_id: "keep it"}, partial=True)
        assert half.status == "paused" and ledger.deleted == []
        with pytest.raises(BadRequest, match=rf"no decision on {transfer.call_id} \(ledger_Ledger_Transfer\)"):
            await agent.resume(rsp.run_id, approve={delete.call_id: "keep it"})
        # a recorded decision is never reversed (a stale page, another person): refused, nothing changes
        with pytest.raises(Conflict, match=rf"run {rsp.run_id}: call {delete.call_id} \(ledger_Ledger_DeleteEntry\) "
                                           r"was already denied \(keep it\)"):
            await agent.resume(rsp.run_id, approve={delete.call_id: True, transfer.call_id: True})
        again = await agent.resume(rsp.run_id, approve={delete.call_id: False}, partial=True)  # the same: quietly
        assert again.status == "paused"
        done = await agent.resume(rsp.run_id, approve={transfer.call_id: True})
    assert done.reply == ('{"ok":true,"detail":"sent 5 to bob"} | the call to ledger_Ledger_DeleteEntry was not '
                          "approved by a person: keep it")
    assert ledger.deleted == [] and len(ledger.transfers) == 1


async def test_approving_all_after_a_partial_decision_decides_only_the_undecided_calls(store: MemoryStore) -> None:
    # `micro agent approve` / A2A "approve" after one call was denied on its own: refused as a Conflict before
    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not results_seen(messages[-1:]):
            return scripted.turn(scripted.call("ledger_Ledger_Transfer", to="bob", amount=5),
                                 scripted.call("ledger_Ledger_DeleteEntry", id="e9"))
        return " | ".join(r.content for r in results_seen(messages[-1:]))

    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt, scripted.function(brain)) as agent:
        rsp = await agent.ask("pay bob and drop e9")
        _transfer, delete = rsp.pending
        await agent.resume(rsp.run_id, approve={delete.call_id: "keep it"}, partial=True)
        done = await agent.resume(rsp.run_id, approve=True)  # all: the transfer; the denial stands
    assert done.status == "completed"
    assert done.reply == ('{"ok":true,"detail":"sent 5 to bob"} | the call to ledger_Ledger_DeleteEntry was not '
                          "approved by a person: keep it")
    assert ledger.deleted == [] and len(ledger.transfers) == 1


# -- sessions, cancel, expiry ------------------------------------------------------------------


async def test_a_session_with_a_waiting_run_refuses_new_messages_until_it_is_answered(store: MemoryStore) -> None:
    async with runtime(store) as rt, ledger_service(rt, Ledger()), banker(rt) as agent:
        rsp = await agent.ask("Transfer 5 EUR to Bob", session="alice")
        with pytest.raises(BadRequest, match=rf"session 'alice' has run {rsp.run_id} waiting for approval of "
                                             r"ledger_Ledger_Transfer .*micro agent approve banker .*"
                                             rf"micro agent cancel banker {rsp.run_id}"):
            await rt.client.call("banker", "Agent.Chat", {"message": "and Carol?", "session": "alice"})
        other = await agent.ask("Transfer 5 EUR to Bob", session="dan")  # other sessions go on
        assert other.status == "paused"
        cancelled = await agent.cancel(rsp.run_id, reason="changed my mind")
        assert cancelled.status == "cancelled"
        after = await agent.ask("Transfer 5 EUR to Bob", session="alice")
        assert after.status == "paused"
        run = await agent.runs.get(rsp.run_id)
    assert run is not None and run.error == "cancelled by a person: changed my mind"
    assert all(c.state == "done" for c in run.tool_calls)
    assert [c.result for c in run.tool_calls if c.name == "ledger_Ledger_Transfer"] == [
        "the call was refused: the run was cancelled (changed my mind)"]


async def test_a_run_waiting_past_pause_ttl_expires_and_its_calls_are_refused(store: MemoryStore) -> None:
    now = [1_000_000.0]
    store.clock = lambda: now[0]
    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt, pause_ttl=60) as agent:
        rsp = await agent.ask("Transfer 5 EUR to Bob", session="s")
        now[0] += 61
        assert await agent.pending() == []
        with pytest.raises(Conflict, match=rf"run {rsp.run_id} expired: the run waited for approval of "
                                           r"ledger_Ledger_Transfer .* longer than pause_ttl=60s"):
            await agent.resume(rsp.run_id, approve=True)
        run = await agent.runs.get(rsp.run_id)
        assert run is not None and run.status == "expired" and run.pending == []
        assert [c.result for c in run.tool_calls if c.name == "ledger_Ledger_Transfer"] == [
            "the call was refused: nobody decided before the run expired"]
        again = await agent.ask("Transfer 5 EUR to Bob", session="s")  # the session is free again
    assert again.status == "paused" and ledger.transfers == []


# -- bad input: a clear error naming the run and what it waits for; nothing in the run changes ---


async def test_every_bad_resume_names_the_run_and_changes_nothing(store: MemoryStore) -> None:
    async with runtime(store) as rt, ledger_service(rt, Ledger()), banker(rt) as agent:
        rsp = await agent.ask("Transfer 5 EUR to Bob")
        (p,) = rsp.pending
        before = await stored(store, rsp.run_id)
        waits = rf"run {rsp.run_id} waits for approval of ledger_Ledger_Transfer \(call {p.call_id}\)"
        cases: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"approve": {"nope": True}}, BadRequest, waits + "; it has no pending approval 'nope'"),
            ({"approve": {p.call_id: True, "nope": False}}, BadRequest, "no pending approval 'nope'"),
            ({"answer": "yes"}, BadRequest, waits + "; it asked no question, so there is nothing to answer"),
            ({}, BadRequest, waits + "; say what to do"),
            ({"approve": {p.call_id: 3}}, BadRequest, "must be true, false or a reason"),
        ]
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                await agent.resume(rsp.run_id, **kwargs)
            assert await stored(store, rsp.run_id) == before, kwargs
        with pytest.raises(NotFound, match="agent banker has no run 'missing'"):
            await agent.resume("missing", approve=True)
        with pytest.raises(BadRequest, match="run id 'a/b'"):
            await agent.resume("a/b", approve=True)
        with pytest.raises(BadRequest, match="approve_all and deny_all contradict"):
            await rt.client.call("banker", "Agent.Resume", {"run_id": rsp.run_id, "approve_all": True,
                                                            "deny_all": True})
        assert await stored(store, rsp.run_id) == before
        done = await agent.resume(rsp.run_id, approve=True)
        final = await stored(store, rsp.run_id)
        with pytest.raises(Conflict, match=rf"run {rsp.run_id} is completed, not waiting .*nothing was changed"):
            await agent.resume(rsp.run_id, approve=True)
        with pytest.raises(Conflict, match=rf"run {rsp.run_id} is completed; only a run that waits"):
            await agent.cancel(rsp.run_id)
        assert await stored(store, rsp.run_id) == final and done.status == "completed"


async def test_a_run_record_is_the_checkpoint_written_at_each_step(store: MemoryStore) -> None:
    seen: list[AgentRun] = []
    gate = anyio.Event()

    class Slow:
        async def Wait(self, req: DeleteReq) -> Receipt:
            """Wait for the gate."""
            await gate.wait()
            return Receipt(True, "waited")

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not results_seen(messages[-1:]):
            return scripted.turn(scripted.call("slow_Slow_Wait", id="x"),
                                 scripted.call("ledger_Ledger_Balance", id="y"))
        return "done"

    async with runtime(store) as rt, ledger_service(rt, Ledger()):
        slow = micro.New("slow", runtime=rt)
        slow.handle(Slow())
        agent = micro.NewAgent("banker", services=["ledger", "slow"], provider=scripted.function(brain), runtime=rt)
        async with slow, agent:
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent.ask, "go")
                with anyio.fail_after(GUARD):
                    while True:  # the balance result is checkpointed while the slow call is still in flight
                        for rec in await store.read("agent/banker/runs/", prefix=True):
                            run = msgspec.json.decode(rec.value, type=AgentRun)
                            if any(c.state == "done" for c in run.tool_calls):
                                seen.append(run)
                        if seen:
                            break
                        await anyio.wait_all_tasks_blocked()
                gate.set()
    (run,) = seen[:1]
    assert run.status == "running" and run.owner == agent.id
    assert {c.name: c.state for c in run.tool_calls} == {"slow_Slow_Wait": "running", "ledger_Ledger_Balance": "done"}
    assert [m.role for m in run.messages] == ["user", "assistant"]


async def test_results_that_come_in_together_are_checkpointed_in_one_write() -> None:
    """Ten calls answered at once (as one read of the wire answers them): one checkpoint write carries all
    ten results, and each call's save returns (its ``tool_end`` goes out) only once that write is done; a
    result that comes in alone while others are still in flight is written on its own."""

    class Counting(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.runs: list[AgentRun] = []  # each write of the run record, as written

        async def _put(self, record: Record, if_version: int | None) -> int:
            if record.key.startswith("agent/waiter/runs/"):
                self.runs.append(msgspec.json.decode(record.value, type=AgentRun))
            return await super()._put(record, if_version)

    gate, first = anyio.Event(), anyio.Event()
    written_when_saved: list[int] = []

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if not results_seen(messages[-1:]):
            return scripted.turn(*(scripted.call("wait", i=i) for i in range(11)))
        return "done"

    async with Counting() as store, runtime(store) as rt:
        agent = micro.NewAgent("waiter", provider=scripted.function(brain), runtime=rt)

        @agent.tool
        async def wait(i: int) -> int:
            """Wait for the gate (call 0 for the first one)."""
            await (first if i == 0 else gate).wait()
            return i

        async def ask() -> None:  # each tool_end comes after the save of its call: the write is done
            async for ev in agent.stream("go"):
                if ev.type == "tool_end":
                    assert any(c.id == ev.tool_call.id and c.state == "done" for c in store.runs[-1].tool_calls)
                    ended.append(ev.tool_call.id)

        ended: list[str] = []
        async with agent:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                with anyio.fail_after(GUARD):
                    await anyio.wait_all_tasks_blocked()
                    first.set()  # call 0 alone: written while the ten others are in flight
                    while not any(c.state == "done" for r in store.runs for c in r.tool_calls):
                        await anyio.wait_all_tasks_blocked()
                    written_when_saved.append(len(store.runs))
                    gate.set()
    done = [sorted(c.name + str(c.input["i"]) for c in r.tool_calls if c.state == "done") for r in store.runs]
    # the turn that asked, call 0 alone, the ten together, the end
    assert [len(d) for d in done] == [0, 1, 11, 11] and written_when_saved == [2] and len(ended) == 11
    assert store.runs[-1].status == "completed" and store.runs[2].status == "running"


class FailingRuns:
    """The run records' store for a Checkpoint: the first write fails; each write's done calls are kept."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []

    async def save(self, run: AgentRun, version: int) -> int:
        self.writes.append(sorted(c.id for c in run.tool_calls if c.state == "done"))
        if len(self.writes) == 1:
            raise OSError("disk full")
        return version + 1


@pytest.mark.parametrize("strict", [False, True])
async def test_a_failed_checkpoint_write_is_logged_once_and_the_saves_it_carried_return(
        strict: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Five results in together: one write carries them and fails. It is logged once and every save
    returns (the record lags until the next write); none writes it again, unless it is strict."""
    runs = FailingRuns()
    checkpoint = Checkpoint(runs, AgentRun("r", "waiter", "m", "", ""), 1)  # type: ignore[arg-type]
    run = Run(scripted.function(lambda m, t: "x"), None, None)
    run.calls = [ToolCallRecord(f"c{i}", "t", {}, state="running") for i in range(5)]
    checkpoint.run = run
    failed: list[Exception] = []

    async def finish(i: int) -> None:
        run.calls[i].state = "done"
        try:
            await checkpoint.save(strict=strict and i > 0)
        except OSError as exc:
            failed.append(exc)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(finish, i)
    everything = [f"c{i}" for i in range(5)]
    assert caplog.text.count("could not write the checkpoint of run r") == 1
    if strict:  # the four strict saves write again: the first of them carries all, the others are done
        assert runs.writes == [everything, everything] and not failed
    else:
        assert runs.writes == [everything]
        await checkpoint.save()  # the next step's write
        assert runs.writes == [everything, everything] and checkpoint.version == 2


# -- interrupted runs in one process: a record whose owner is gone ---------------------------------


async def test_resume_interrupted_true_continues_a_run_whose_owner_is_gone_at_start(store: MemoryStore) -> None:
    from micro.agent.record import AgentRuns, RunToolCall
    from micro.ai import ToolUseBlock

    finished = anyio.Event()

    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        finished.set()
        return "recovered: " + " | ".join(r.content for r in results_seen(messages[-1:]))

    ledger = Ledger()
    crashed = AgentRun(
        "0000000000000001crashed", "banker", "pay bob", status="running", owner="banker-deadbeef0000",
        key="banker/0000000000000001crashed",
        messages=[Message.user("pay bob"),
                  Message.assistant(ToolUseBlock("t1", "ledger_Ledger_Balance", {"id": "me"}),
                                    ToolUseBlock("t2", "ledger_Ledger_Transfer", {"to": "bob", "amount": 5}))],
        tool_calls=[RunToolCall("t1", "ledger_Ledger_Balance", {"id": "me"}, "from the checkpoint", state="done"),
                    RunToolCall("t2", "ledger_Ledger_Transfer", {"to": "bob", "amount": 5}, state="running")])
    async with runtime(store) as rt, ledger_service(rt, ledger):
        await AgentRuns(rt.store, "banker").save(crashed, 0)
        async with banker(rt, scripted.function(brain), needs_approval=[], resume_interrupted=True) as agent:
            with anyio.fail_after(GUARD):
                await finished.wait()
                while (run := await agent.runs.get(crashed.id)) is None or run.status == "running":
                    await anyio.wait_all_tasks_blocked()
    assert run.status == "completed" and run.owner == agent.id and run.resumes == 1
    assert run.reply == 'recovered: from the checkpoint | {"ok":true,"detail":"sent 5 to bob"}'
    # the completed call was not made again; the one in flight was, with the run's key
    assert ledger.transfers == [("bob", 5, micro.idempotency.derived_key(
        crashed.key, "ledger", "Ledger.Transfer", {"to": "bob", "amount": 5}))]


async def test_delegate_can_need_approval_and_the_other_agents_pause_is_reported(store: MemoryStore) -> None:
    def boss(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        seen = results_seen(messages[-1:])
        if not seen:
            return scripted.call("delegate", agent="banker", message="Transfer 5 EUR to Bob")
        return f"banker said: {seen[0].content}"

    ledger = Ledger()
    async with runtime(store) as rt, ledger_service(rt, ledger), banker(rt):
        chief = micro.NewAgent("chief", agents=["banker"], provider=scripted.function(boss), runtime=rt,
                               needs_approval=["delegate"])
        async with chief:
            rsp = await chief.ask("pay bob")
            assert [p.tool for p in rsp.pending] == ["delegate"]
            done = await chief.resume(rsp.run_id, approve=True)
    # the delegation ran once approved; the banker's own run waits for its approval, and the chief's model
    # is told so (status and pending), not handed an empty reply
    result = msgspec.json.decode(done.reply.removeprefix("banker said: "))
    assert result["status"] == "paused" and result["pending"][0]["tool"] == "ledger_Ledger_Transfer"
    assert ledger.transfers == []
