"""The A2A gateway's request handler (issue 18) driven in-process, where races can be gated.

The handler (:class:`micro.gateway.a2a.A2AHandler`) is called as the SDK's dispatchers call it,
over one agent on memory backends with a scripted model. Concurrency is arranged with events:
a call wrapper holds the gateway's record reads until both racing requests are inside them, and
a tool holds the run until the test lets it go. No sleeps.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from a2a.server.context import ServerCallContext
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import InternalError, InvalidParamsError, UnsupportedOperationError

import micro
import micro.gateway.a2a
from micro import idempotency
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import BadRequest, Unavailable
from micro.gateway.a2a import A2AHandler, app
from micro.middleware import Next, Request

GUARD = 30.0  # a deadlock guard, never a timing assertion


class RecordGate:
    """A call wrapper: while armed for n, the first n ``AgentInfo.Run`` calls wait until all n are in.
    With ``drop_started``, agent streams lose their ``started`` event (as an agent of an earlier micro)."""

    def __init__(self) -> None:
        self.needed = 0
        self.arrived = 0
        self.all_in = anyio.Event()
        self.drop_started = False
        self.stream_entered = anyio.Event()
        self.stream_release: anyio.Event | None = None  # while set, agent streams wait for it first
        self.stream_error: Exception | None = None  # the next agent stream fails with it (once)
        self.record_entered = anyio.Event()
        self.record_release: anyio.Event | None = None  # while set, AgentInfo.Run calls wait for it first

    def arm(self, n: int) -> None:
        self.needed, self.arrived, self.all_in = n, 0, anyio.Event()

    def __call__(self, next_: Next) -> Next:
        async def wrapped(req: Request) -> Any:
            if self.record_release is not None and req.endpoint == "AgentInfo.Run":
                self.record_entered.set()
                await self.record_release.wait()
            if req.streaming and req.endpoint.startswith("Agent.Stream"):
                if self.stream_release is not None:
                    self.stream_entered.set()
                    await self.stream_release.wait()
                if self.stream_error is not None:
                    error, self.stream_error = self.stream_error, None
                    raise error
            if self.needed and req.endpoint == "AgentInfo.Run":
                self.arrived += 1
                if self.arrived >= self.needed:
                    self.needed = 0
                    self.all_in.set()
                await self.all_in.wait()
            if self.drop_started and req.streaming:
                return self._without_started(await next_(req))
            return await next_(req)
        return wrapped

    @staticmethod
    async def _without_started(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for ev in events:
                if ev.type != "started":
                    yield ev
        finally:  # leaving the stream closes the agent's (which is what stops its run)
            await events.aclose()  # type: ignore[attr-defined]


@dataclass
class Held:
    """The `hold` tool's gates, by key: entered when the run is inside it, opened by the test."""

    entered: dict[str, anyio.Event] = field(default_factory=dict)
    opened: dict[str, anyio.Event] = field(default_factory=dict)

    def event(self, table: dict[str, anyio.Event], key: str) -> anyio.Event:
        return table.setdefault(key, anyio.Event())


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    """`book`: ask which room, then hold at that key. `work then fail`: a tool call, then the model fails."""
    first = next(m.text for m in messages if m.role == "user")
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if first == "work then fail":
        if results:
            raise RuntimeError("the model broke")
        return scripted.turn(scripted.call("note", text="started"))
    if first == "fail at once":
        raise RuntimeError("the model broke at once")
    if not results:
        return scripted.turn(scripted.call("request_input", question="Which room?"))
    if results[0].content.startswith("held "):
        return f"done: {results[0].content}"
    return scripted.turn(scripted.call("hold", key=results[0].content))


@dataclass
class System:
    handler: A2AHandler
    gate: RecordGate
    held: Held
    context: ServerCallContext
    runtime: micro.Runtime

    async def claims(self) -> list[bytes]:
        """The records of the messages the gateway remembers (which task each started)."""
        return [r.value for r in await self.runtime.store.read(f"{idempotency.PREFIX}desk/SendMessage/", prefix=True)]


@contextlib.asynccontextmanager
async def started() -> AsyncIterator[System]:
    """The agent and a handler over it (a context manager, not a fixture: its task group is the test's)."""
    gate, held = RecordGate(), Held()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://",
                             call_wrappers=[gate]) as rt:
        async def model(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
            if messages[-1].text == "slow":  # the model holds until the test opens its gate
                held.event(held.entered, "model").set()
                await held.event(held.opened, "model").wait()
                return "slow done"
            return brain(messages, tools)

        agent = micro.Agent("desk", provider=scripted.function(model), runtime=rt)

        @agent.tool
        async def hold(key: str) -> str:
            """Hold the run until the test opens the gate named key."""
            held.event(held.entered, key).set()
            await held.event(held.opened, key).wait()
            return f"held {key}"

        @agent.tool
        async def note(text: str) -> str:
            """Note something."""
            return f"noted {text}"

        async with agent, anyio.create_task_group() as tg:
            handler = A2AHandler(rt)
            handler.task_group = tg  # what the app's lifespan does
            try:
                yield System(handler, gate, held, ServerCallContext(state={"agent": "desk"}), rt)
            finally:
                for opened in held.opened.values():
                    opened.set()
                tg.cancel_scope.cancel()


def message(text: str, *, task_id: str = "", immediately: bool = False) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        message=pb.Message(role=pb.ROLE_USER, message_id=uuid.uuid4().hex, task_id=task_id,
                           parts=[pb.Part(text=text)]),
        configuration=pb.SendMessageConfiguration(return_immediately=immediately))


async def test_of_two_concurrent_answers_on_one_task_one_drives_it_and_the_gateway_keeps_it() -> None:
    """Both messages read the waiting record before either starts its drive: one resumes the run, the other
    is refused, and the gateway still knows the run it drives (a cancel reaches it)."""
    async with started() as system:
        await _two_answers(system)


async def _two_answers(system: System) -> None:
    h, ctx = system.handler, system.context
    with anyio.fail_after(GUARD):
        task = await h.on_message_send(message("book"), ctx)
        assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_INPUT_REQUIRED
        outcomes: list[str] = []
        refused = anyio.Event()

        async def answer() -> None:
            try:
                async for _ in h.on_message_send_stream(message("blue", task_id=task.id), ctx):
                    pass
                outcomes.append("streamed")
            except UnsupportedOperationError as exc:
                outcomes.append(f"refused: {exc.message}")
                refused.set()

        system.gate.arm(2)  # both answers' record reads wait until both are in
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer)
            tg.start_soon(answer)
            await system.held.event(system.held.entered, "blue").wait()
            await refused.wait()
            assert outcomes == [f"refused: task {task.id} is working; wait for it (SubscribeToTask) before "
                                "sending more"]
            cancelled = await h.on_cancel_task(pb.CancelTaskRequest(id=task.id), ctx)
        assert cancelled is not None and cancelled.status.state == pb.TASK_STATE_CANCELED
        assert outcomes[1:] == ["streamed"]  # the driven one's stream ended with the cancel
        got = await h.on_get_task(pb.GetTaskRequest(id=task.id), ctx)
    assert got is not None and got.status.state == pb.TASK_STATE_CANCELED


def _states(events: list[Any]) -> list[str]:
    out = []
    for ev in events:
        if isinstance(ev, pb.Task):
            out.append(f"task:{pb.TaskState.Name(ev.status.state)}")
        elif isinstance(ev, pb.TaskStatusUpdateEvent):
            out.append(pb.TaskState.Name(ev.status.state))
    return out


async def test_a_run_failing_mid_stream_says_failed_once() -> None:
    async with started() as system:
        h, ctx = system.handler, system.context
        with anyio.fail_after(GUARD):
            events = [ev async for ev in h.on_message_send_stream(message("work then fail"), ctx)]
    states = _states(events)
    assert states[0] == "task:TASK_STATE_WORKING" and states[-1] == "TASK_STATE_FAILED"
    assert states.count("TASK_STATE_FAILED") == 1, states
    assert "the model broke" in "".join(p.text for p in events[-1].status.message.parts)


@pytest.mark.parametrize("agent", ["current", "without started events"])
async def test_a_run_failing_before_its_first_event_is_a_failed_task_not_a_protocol_error(agent: str) -> None:
    """The model fails at once. A current agent's stream said `started` first, so the stream has the
    working task, then FAILED; an agent of an earlier micro (no `started` event: the gateway sees the
    error first) still gives a failed task, since its record exists, not a protocol error."""
    async with started() as system:
        h, ctx = system.handler, system.context
        system.gate.drop_started = agent != "current"
        with anyio.fail_after(GUARD):
            task = await h.on_message_send(message("fail at once"), ctx)
            events = [ev async for ev in h.on_message_send_stream(message("fail at once"), ctx)]
            assert isinstance(task, pb.Task) and task.id
            got = await h.on_get_task(pb.GetTaskRequest(id=task.id), ctx)
    assert task.status.state == pb.TASK_STATE_FAILED
    assert "the model broke at once" in "".join(p.text for p in task.status.message.parts)
    assert got == task
    assert isinstance(events[0], pb.Task) and events[0].id != task.id  # the stream says which task failed
    if agent == "current":
        assert _states(events) == ["task:TASK_STATE_WORKING", "TASK_STATE_FAILED"]
    else:
        assert _states(events) == ["task:TASK_STATE_FAILED"]
    assert "the model broke at once" in events[-1].status.message.parts[0].text


async def test_a_message_refused_before_any_run_exists_is_still_a_protocol_error() -> None:
    async with started() as system:
        h, ctx = system.handler, system.context
        with anyio.fail_after(GUARD):
            task = await h.on_message_send(message("book"), ctx)
            assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_INPUT_REQUIRED
            # a new message in the waiting task's context: the agent refuses it, and no run is made
            request = message("something else")
            request.message.context_id = task.context_id
            with pytest.raises(InvalidParamsError, match="waiting for an answer to 'Which room\\?'"):
                await h.on_message_send(request, ctx)


async def test_return_immediately_returns_the_working_task_before_the_model_answers() -> None:
    async with started() as system:
        h, ctx, held = system.handler, system.context, system.held
        with anyio.fail_after(GUARD):
            task = await h.on_message_send(message("slow", immediately=True), ctx)
            assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_WORKING
            got = await h.on_get_task(pb.GetTaskRequest(id=task.id), ctx)
            assert got is not None and got.status.state == pb.TASK_STATE_WORKING
            events = h.on_subscribe_to_task(pb.SubscribeToTaskRequest(id=task.id), ctx)
            first = await anext(events)
            assert isinstance(first, pb.Task) and first.id == task.id
            held.event(held.opened, "model").set()  # only now may the model answer
            rest = [ev async for ev in events]
            final = await h.on_get_task(pb.GetTaskRequest(id=task.id), ctx)
    assert _states(rest)[-1] == "TASK_STATE_COMPLETED"
    assert final is not None and final.status.state == pb.TASK_STATE_COMPLETED
    assert final.artifacts[0].parts[0].text == "slow done"


# -- a message sent again (its messageId): claims, refusals, takeover --------------------------------


async def test_a_message_refused_after_its_caller_left_can_be_sent_again() -> None:
    """The caller leaves while its run is starting; the agent then refuses the message. The message is
    forgotten (by the drive, which outlives the caller): sent again, it runs, instead of naming a task
    that never existed."""
    async with started() as system:
        h, ctx, gate = system.handler, system.context, system.gate
        request = message("book")
        with anyio.fail_after(GUARD):
            gate.stream_release, gate.stream_error = anyio.Event(), BadRequest("desk: not now")
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.on_message_send, request, ctx)
                await gate.stream_entered.wait()
                (drive,) = h.drives.values()
                tg.cancel_scope.cancel()  # the caller leaves while its run is starting
            gate.stream_release.set()
            await drive.finished.wait()
            assert drive.error is not None and "not now" in drive.error.message
            assert await system.claims() == []
            gate.stream_release = None
            task = await h.on_message_send(request, ctx)
    assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_INPUT_REQUIRED


async def test_a_transport_error_before_the_run_keeps_the_claim_and_a_retry_takes_it_over_after_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Unavailable before the first event says nothing of whether the agent got the message: the claim
    stays (a retry must not start a second run while the first may be starting). A claim whose run
    never appeared within the grace (its gateway stopped) is taken over by a retry, under its task id."""
    async with started() as system:
        h, ctx, gate = system.handler, system.context, system.gate
        request = message("book")
        with anyio.fail_after(GUARD):
            gate.stream_error = Unavailable("desk: connection lost")
            with pytest.raises(InternalError, match="connection lost"):
                await h.on_message_send(request, ctx)
            (claim,) = await system.claims()
            claimed = json.loads(claim)["task"]
            monkeypatch.setattr(micro.gateway.a2a, "CLAIM_GRACE", 0.0)
            task = await h.on_message_send(request, ctx)
    assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_INPUT_REQUIRED
    assert task.id == claimed


async def test_a_messageid_sent_again_with_other_content_is_refused_and_on_another_task_is_another_message(
        ) -> None:
    async with started() as system:
        h, ctx, held = system.handler, system.context, system.held
        with anyio.fail_after(GUARD):
            first = message("book")
            task = await h.on_message_send(first, ctx)
            assert isinstance(task, pb.Task) and task.status.state == pb.TASK_STATE_INPUT_REQUIRED
            changed = message("fail at once")
            changed.message.message_id = first.message.message_id
            with pytest.raises(InvalidParamsError, match=f"messageId '{first.message.message_id}' was sent before "
                                                         "with other content"):
                await h.on_message_send(changed, ctx)
            # the same messageId on the task (a client numbering its messages per task): a message of its own
            answer = message("blue", task_id=task.id, immediately=True)
            answer.message.message_id = first.message.message_id
            resumed = await h.on_message_send(answer, ctx)
            assert isinstance(resumed, pb.Task) and resumed.id == task.id
            await held.event(held.entered, "blue").wait()  # the run was resumed by it
            held.event(held.opened, "blue").set()


async def test_a_start_that_was_reading_when_the_gateway_began_to_stop_is_refused_not_cut() -> None:
    """A message past the stopping check but still reading its task when the drain takes its snapshot
    must not add a drive the drain never waits for: it is refused (nothing started) and forgotten."""
    async with started() as system:
        h, ctx, gate = system.handler, system.context, system.gate
        with anyio.fail_after(GUARD):
            task = await h.on_message_send(message("book"), ctx)
            assert isinstance(task, pb.Task)
            answer = message("blue", task_id=task.id)
            outcome: list[str] = []

            async def send() -> None:
                try:
                    await h.on_message_send(answer, ctx)
                except InternalError as exc:
                    outcome.append(exc.message)

            gate.record_release = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                await gate.record_entered.wait()  # inside its start, reading the task
                await h.drain(GUARD)  # nothing driven yet: returns at once
                gate.record_release.set()
            assert outcome == ["this A2A gateway is stopping: send the message to another one (or again once it "
                               "has restarted); nothing of it was started"]
            assert h.drives == {} and len(await system.claims()) == 1  # the first message's: the answer's is gone
            gate.record_release = None
            h.draining = False  # started again (what the app's lifespan does)
            resumed = await h.on_message_send(message("blue", task_id=task.id, immediately=True), ctx)
            assert isinstance(resumed, pb.Task) and resumed.id == task.id


async def test_an_app_started_again_after_a_stop_takes_messages_again() -> None:
    """The gateway's lifespan ran, stopped (refusing messages while it drained), and runs again (a server
    restarted in the same process): it takes messages again."""
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        agent = micro.Agent("desk", provider=scripted.function(brain), runtime=rt)
        async with agent:
            gateway = app(rt)
            body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                    "params": {"message": {"messageId": "", "role": "ROLE_USER", "parts": [{"text": "book"}]}}}
            for _ in range(2):
                async with gateway.router.lifespan_context(gateway):
                    async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway),
                                                 base_url="http://127.0.0.1") as http:
                        body["params"]["message"]["messageId"] = uuid.uuid4().hex  # type: ignore[index]
                        with anyio.fail_after(GUARD):
                            rsp = await http.post("/agents/desk", json=body, headers={"A2A-Version": "1.0"})
                assert rsp.json()["result"]["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED", rsp.text
