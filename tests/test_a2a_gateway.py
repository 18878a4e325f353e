"""The A2A gateway (issue 18), driven by the official `a2a-sdk` client against the example system.

One example system per module (examples/tasks on memory backends, its agents on the
key-free scripted demo model) runs in a thread of its own (an anyio blocking portal),
with the gateway served by uvicorn on a free loopback port. The tests speak HTTP to it
through the SDK's client, as any A2A client would, and ask the portal to restart the
gateway or start a second one. Waiting is on events, never sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import msgspec
import pytest
import uvicorn
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import (
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from test_gateway_http import Program
from test_readme import README
from test_readme import _matches as readme_matches

import micro
import micro.a2a
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.cli.run import load_app, runnables
from micro.gateway.a2a import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tasks"
TOKEN = "a2a-test-token"
_TASK_ID = re.compile(r"\b[0-9a-f]{32}\b")
GUARD = 30.0  # seconds: a deadlock guard, never a timing assertion


class Gateway:
    """One gateway (uvicorn + the A2A app) in the system's loop."""

    def __init__(self, runtime: micro.Runtime, token: str | None = None, max_body: int = 1 << 20,
                 **options: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as micro a2a's socket (Nagle)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app(runtime, token=token, max_body=max_body, **options),
                                                    log_level="warning", lifespan="on"))
        self.stopped = anyio.Event()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = anyio.Event()
        server = self.server
        original = server.startup

        async def startup(sockets: Any = None) -> None:
            await original(sockets=sockets)
            started.set()

        server.startup = startup  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            await started.wait()
            task_status.started()

    async def _run(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            self.sock.close()
            self.stopped.set()

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.stopped.wait()


class WaitReq(msgspec.Struct):
    key: str


class WaitRsp(msgspec.Struct):
    opened: str


class Gate:
    """A service whose Wait returns when the test opens the gate: a run that is working until then."""

    def __init__(self) -> None:
        self.events: dict[str, anyio.Event] = {}
        self.entered: dict[str, anyio.Event] = {}

    def _event(self, table: dict[str, anyio.Event], key: str) -> anyio.Event:
        return table.setdefault(key, anyio.Event())

    async def Wait(self, req: WaitReq) -> WaitRsp:
        """Wait until the gate named key opens."""
        self._event(self.entered, req.key).set()
        await self._event(self.events, req.key).wait()
        return WaitRsp(f"gate {req.key} opened")

    async def entered_gate(self, key: str) -> None:
        await self._event(self.entered, key).wait()

    def open(self, key: str) -> None:
        self._event(self.events, key).set()


def _waiter_brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    last = messages[-1]
    results = [b for b in last.content if isinstance(b, ToolResultBlock)]
    if results:
        return json.loads(results[0].content)["opened"]
    return scripted.turn("Waiting at the gate...", scripted.call("gate_Gate_Wait", key=last.text.split()[-1]))


def _asker_brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return f"Looking at {results[0].content}'s tasks."
    return scripted.turn(scripted.call("request_input", question="Whose tasks?"))


class System:
    def __init__(self, module: ModuleType, tg: anyio.abc.TaskGroup) -> None:
        self.module = module
        self.tg = tg
        self.runtime: micro.Runtime = module.task_mgr.runtime
        self.gateway: Gateway | None = None
        self.gate = Gate()

    async def start_gateway(self, runtime: micro.Runtime | None = None, **options: Any) -> Gateway:
        gw = Gateway(runtime or self.runtime, **options)
        await self.tg.start(gw.serve)
        return gw


@contextlib.asynccontextmanager
async def _system() -> AsyncIterator[System]:
    saved = {v: os.environ.get(v) for v in ("MICRO_REGISTRY", "MICRO_STORE", "MICRO_BROKER", "ANTHROPIC_API_KEY")}
    for var in ("MICRO_REGISTRY", "MICRO_STORE", "MICRO_BROKER"):
        os.environ[var] = "memory://"
    os.environ.pop("ANTHROPIC_API_KEY", None)  # the labelled demo model, not Claude
    before, path = set(sys.modules), list(sys.path)
    loaded: set[str] = set()
    try:
        module = load_app(EXAMPLE)
        # the app's own modules (app, services, demo_model), and no others: a library imported meanwhile
        # must stay, or its classes would exist twice (an `except httpx.HTTPError` missing a new ConnectError)
        loaded = {n for n in set(sys.modules) - before
                  if str(getattr(sys.modules[n], "__file__", "") or "").startswith(str(EXAMPLE))}
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
            for item in runnables(module):
                await stack.enter_async_context(item)
            system = System(module, tg)
            gate = micro.Service("gate", runtime=system.runtime)
            gate.handle(system.gate)
            waiter = micro.Agent("waiter", services=["gate"], prompt="You wait at gates.",
                                 provider=scripted.function(_waiter_brain), runtime=system.runtime)
            asker = micro.Agent("asker", prompt="You ask first.", provider=scripted.function(_asker_brain),
                                runtime=system.runtime)
            await stack.enter_async_context(gate)
            await stack.enter_async_context(waiter)
            await stack.enter_async_context(asker)
            system.gateway = await system.start_gateway()
            yield system
            await system.gateway.stop()
            tg.cancel_scope.cancel()
    finally:
        sys.path[:] = path
        for name in loaded:
            sys.modules.pop(name, None)
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@pytest.fixture(scope="module")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as p:
        yield p


@pytest.fixture(scope="module")
def system(portal: anyio.from_thread.BlockingPortal) -> Iterator[System]:
    with portal.wrap_async_context_manager(_system()) as s:
        yield s


@pytest.fixture
def url(system: System) -> str:
    assert system.gateway is not None
    return system.gateway.url


@contextlib.asynccontextmanager
async def a2a_client(agent_url: str, *, streaming: bool = False, token: str | None = None,
                     binding: str = "JSONRPC") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=GUARD) as http:
        config = ClientConfig(streaming=streaming, httpx_client=http, supported_protocol_bindings=[binding])
        client = await ClientFactory(config).create_from_url(agent_url)
        yield client


def message(text: str = "", *, task_id: str = "", context_id: str = "", parts: list[pb.Part] | None = None
            ) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(message=pb.Message(
        role=pb.ROLE_USER, message_id=uuid.uuid4().hex, task_id=task_id, context_id=context_id,
        parts=parts if parts is not None else [pb.Part(text=text)]))


async def send(client: Client, request: pb.SendMessageRequest) -> list[pb.StreamResponse]:
    with anyio.fail_after(GUARD):
        return [ev async for ev in client.send_message(request)]


def reply_of(task: pb.Task) -> str:
    (artifact,) = task.artifacts
    return "".join(p.text for p in artifact.parts)


def status_text(status: pb.TaskStatus) -> str:
    return "\n".join(p.text for p in status.message.parts if p.text)


OVERDUE = ["Alice has 3 overdue tasks:", "1. Write quarterly report (due June 1)", "2. Review PR #42 (due June 2)",
           "3. Update deployment docs (due June 3)"]


# -- cards ----------------------------------------------------------------------------------------


async def test_every_agent_of_the_registry_has_a_card(url: str) -> None:
    async with httpx.AsyncClient() as http:
        cards = (await http.get(f"{url}/agents")).json()
        assert [c["name"] for c in cards] == ["asker", "comms-mgr", "project-mgr", "task-mgr", "waiter"]
        card = (await http.get(f"{url}/agents/task-mgr/.well-known/agent-card.json")).json()
    assert card == next(c for c in cards if c["name"] == "task-mgr")
    assert card["description"].startswith("You manage tasks and projects.")
    assert card["capabilities"]["streaming"] is True
    assert card["supportedInterfaces"] == [
        {"url": f"{url}/agents/task-mgr", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        {"url": f"{url}/agents/task-mgr/rest", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}]
    skills = {s["id"] for s in card["skills"]}
    assert {"task.Task.ListOverdue", "task.Task.Delete", "project.Project.List"} <= skills
    assert not any(s.startswith("milestone.") for s in skills)  # task-mgr does not manage milestones
    assert "securitySchemes" not in card  # no token: nothing to declare


async def test_the_sdk_resolves_a_card_and_an_unknown_agent_is_a_clear_404(url: str) -> None:
    async with httpx.AsyncClient() as http:
        card = await A2ACardResolver(http, f"{url}/agents/project-mgr").get_agent_card()
        assert card.name == "project-mgr" and card.capabilities.streaming
        assert card.supported_interfaces[0].url == f"{url}/agents/project-mgr"
        rsp = await http.get(f"{url}/agents/nobody/.well-known/agent-card.json")
        assert rsp.status_code == 404
        assert "no agent 'nobody'" in rsp.json()["error"]["message"]
        assert "task-mgr" in rsp.json()["error"]["message"]
        rpc = await http.post(f"{url}/agents/nobody", json={"jsonrpc": "2.0", "id": 1, "method": "GetTask",
                                                              "params": {"id": "x"}})
        assert rpc.status_code == 404


# -- send, get, list, stream ---------------------------------------------------------------------


async def test_send_message_is_a_run_and_get_task_reads_its_record(url: str, system: System,
                                                                   portal: anyio.from_thread.BlockingPortal) -> None:
    async with a2a_client(f"{url}/agents/task-mgr") as client:
        (ev,) = await send(client, message("What tasks are overdue for Alice?", context_id="ctx-send"))
        task = ev.task
        assert task.status.state == pb.TASK_STATE_COMPLETED
        assert reply_of(task).splitlines() == OVERDUE
        assert task.context_id == "ctx-send"
        fetched = await client.get_task(pb.GetTaskRequest(id=task.id))
    assert fetched == task
    # the task is the agent's run: same id, the context is its session, visible as `micro agent runs` shows it
    run = portal.call(system.module.task_mgr.runs.get, task.id)
    assert run is not None and run.status == "completed" and run.session == "ctx-send"
    assert [c.name for c in run.tool_calls] == ["task_Task_ListOverdue"]
    assert fetched.history[0].parts[0].text == "What tasks are overdue for Alice?"


async def test_streaming_sends_the_task_then_tool_activity_and_reply_chunks(url: str) -> None:
    async with a2a_client(f"{url}/agents/task-mgr", streaming=True) as client:
        events = await send(client, message("What tasks are overdue for Alice?"))
        first = events[0]
        assert first.HasField("task") and first.task.status.state == pb.TASK_STATE_WORKING
        tool_lines = [status_text(e.status_update.status) for e in events if e.HasField("status_update")
                      and e.status_update.status.state == pb.TASK_STATE_WORKING]
        assert tool_lines[0] == '→ task_Task_ListOverdue({"user_id": "alice"})'
        assert tool_lines[1].startswith("← task_Task_ListOverdue: ")
        chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
        assert len(chunks) > 3 and all(c.artifact.artifact_id == "reply" for c in chunks)
        assert chunks[-1].last_chunk and not chunks[-1].append  # the whole reply, last
        assert "".join(p.text for p in chunks[-1].artifact.parts).splitlines() == OVERDUE
        assert not any(c.last_chunk for c in chunks[:-1])
        last = events[-1].status_update
        assert last.status.state == pb.TASK_STATE_COMPLETED
        task = await client.get_task(pb.GetTaskRequest(id=first.task.id))
    assert task.status.state == pb.TASK_STATE_COMPLETED and reply_of(task).splitlines() == OVERDUE


async def test_list_tasks_by_context_and_state(url: str) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(f"{url}/agents/project-mgr") as client:
        ids = []
        for text in ("What projects are there?", "What milestones are there?"):
            (ev,) = await send(client, message(text, context_id=context))
            ids.append(ev.task.id)
        page = await client.list_tasks(pb.ListTasksRequest(context_id=context))
        assert [t.id for t in page.tasks] == ids[::-1]  # newest first
        assert all(t.context_id == context for t in page.tasks)
        one = await client.list_tasks(pb.ListTasksRequest(context_id=context, page_size=1))
        assert [t.id for t in one.tasks] == [ids[1]] and one.next_page_token
        two = await client.list_tasks(pb.ListTasksRequest(context_id=context, page_size=1,
                                                          page_token=one.next_page_token))
        assert [t.id for t in two.tasks] == [ids[0]]
        waiting = await client.list_tasks(pb.ListTasksRequest(context_id=context,
                                                              status=pb.TASK_STATE_INPUT_REQUIRED))
        assert list(waiting.tasks) == []
        done = await client.list_tasks(pb.ListTasksRequest(context_id=context, status=pb.TASK_STATE_COMPLETED))
        assert [t.id for t in done.tasks] == ids[::-1]
        rejected = await client.list_tasks(pb.ListTasksRequest(status=pb.TASK_STATE_REJECTED))  # no run ever is
        assert list(rejected.tasks) == [] and rejected.total_size == 0


async def test_the_http_json_binding_serves_the_same_tasks(url: str) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(f"{url}/agents/task-mgr", binding="HTTP+JSON") as rest, \
            a2a_client(f"{url}/agents/task-mgr", binding="HTTP+JSON", streaming=True) as streaming, \
            a2a_client(f"{url}/agents/task-mgr") as jsonrpc:
        (ev,) = await send(rest, message("What tasks are overdue for Alice?", context_id=context))
        assert reply_of(ev.task).splitlines() == OVERDUE
        assert await jsonrpc.get_task(pb.GetTaskRequest(id=ev.task.id)) == await rest.get_task(
            pb.GetTaskRequest(id=ev.task.id))
        events = await send(streaming, message("What tasks are overdue for Bob?", context_id=context))
        assert events[0].HasField("task") and events[-1].status_update.status.state == pb.TASK_STATE_COMPLETED
        listed = await rest.list_tasks(pb.ListTasksRequest(context_id=context))
        assert [t.id for t in listed.tasks] == [events[0].task.id, ev.task.id]
        with pytest.raises(TaskNotFoundError):
            await rest.get_task(pb.GetTaskRequest(id="18ee0000000000000000000000000000"))


# -- input required: an approval answered over A2A ------------------------------------------------


async def _delete_request(client: Client, task_id: str, context: str) -> pb.Task:
    (ev,) = await send(client, message(f"Delete task {task_id}", context_id=context))
    assert ev.task.status.state == pb.TASK_STATE_INPUT_REQUIRED
    return ev.task


async def test_an_approval_is_an_input_required_task_answered_by_a_message(url: str) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(f"{url}/agents/task-mgr") as client:
        task = await _delete_request(client, "t7", context)
        text = status_text(task.status)
        assert text.startswith('Approve task_Task_Delete({"id": "t7"})?')
        assert 'Reply "approve"' in text
        (data,) = [p.data for p in task.status.message.parts if p.HasField("data")]
        (pending,) = data.struct_value.fields["pending"].list_value.values
        assert pending.struct_value.fields["tool"].string_value == "task_Task_Delete"
        # a message that decides nothing is refused, and the task still waits
        with pytest.raises(InvalidParamsError, match="reply \"approve\" or \"deny: <reason>\""):
            await send(client, message("maybe later", task_id=task.id))
        assert (await client.get_task(pb.GetTaskRequest(id=task.id))).status.state == pb.TASK_STATE_INPUT_REQUIRED
        # a new message in the same context is refused while the run waits
        later = message("What tasks are overdue for Alice?", context_id=context)
        with pytest.raises(InvalidParamsError, match="waiting for approval of task_Task_Delete"):
            await send(client, later)
        (ev,) = await send(client, message("approve", task_id=task.id))
        # refused, that message was not remembered: sent again now, it runs
        (overdue,) = await send(client, later)
    assert ev.task.id == task.id and ev.task.status.state == pb.TASK_STATE_COMPLETED
    assert reply_of(ev.task) == "Deleted: Write release notes (due February 1)"
    assert overdue.task.id != task.id and reply_of(overdue.task).splitlines() == OVERDUE


async def test_a_question_is_answered_by_the_text_of_a_message_on_the_task(url: str) -> None:
    async with a2a_client(f"{url}/agents/asker") as client:
        (ev,) = await send(client, message("show me some tasks"))
        assert ev.task.status.state == pb.TASK_STATE_INPUT_REQUIRED
        assert status_text(ev.task.status) == "Whose tasks?"
        waiting = await client.list_tasks(pb.ListTasksRequest(status=pb.TASK_STATE_INPUT_REQUIRED))
        assert ev.task.id in [t.id for t in waiting.tasks]
        (done,) = await send(client, message("bob", task_id=ev.task.id, context_id=ev.task.context_id))
    assert done.task.status.state == pb.TASK_STATE_COMPLETED
    assert reply_of(done.task) == "Looking at bob's tasks."
    assert next(m.parts[0].text for m in done.task.history if m.role == pb.ROLE_USER) == "show me some tasks"


async def test_a_denial_reaches_the_model_and_streams(url: str) -> None:
    async with a2a_client(f"{url}/agents/task-mgr", streaming=True) as client:
        events = await send(client, message("Delete task t5", context_id=uuid.uuid4().hex))
        waiting = events[-1].status_update
        assert waiting.status.state == pb.TASK_STATE_INPUT_REQUIRED
        events = await send(client, message("deny: keep it for the audit", task_id=waiting.task_id))
    assert events[0].task.id == waiting.task_id
    ended = [e.status_update for e in events if e.HasField("status_update")]
    refused = [status_text(s.status) for s in ended if status_text(s.status).startswith("✗ task_Task_Delete")]
    assert refused and "keep it for the audit" in refused[0]
    assert ended[-1].status.state == pb.TASK_STATE_COMPLETED


async def test_cancel_ends_a_waiting_task_and_its_run(url: str, system: System,
                                                      portal: anyio.from_thread.BlockingPortal) -> None:
    async with a2a_client(f"{url}/agents/task-mgr") as client:
        task = await _delete_request(client, "t6", uuid.uuid4().hex)
        cancelled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        assert cancelled.status.state == pb.TASK_STATE_CANCELED
        assert (await client.get_task(pb.GetTaskRequest(id=task.id))).status.state == pb.TASK_STATE_CANCELED
        with pytest.raises(TaskNotCancelableError, match="it has ended"):
            await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        with pytest.raises(UnsupportedOperationError, match="only a task that needs input takes a message"):
            await send(client, message("approve", task_id=task.id))
    run = portal.call(system.module.task_mgr.runs.get, task.id)
    assert run is not None and run.status == "cancelled"
    assert portal.call(system.module.task_mgr.runs.get, task.id) == run


async def test_the_gateway_restarted_mid_task_still_answers_it(system: System,
                                                               portal: anyio.from_thread.BlockingPortal) -> None:
    first = portal.call(system.start_gateway)
    async with a2a_client(f"{first.url}/agents/task-mgr") as client:
        task = await _delete_request(client, "t4", uuid.uuid4().hex)
    portal.call(first.stop)
    second = portal.call(system.start_gateway)  # a new gateway: nothing of the first one's memory
    try:
        async with a2a_client(f"{second.url}/agents/task-mgr") as client:
            assert (await client.get_task(pb.GetTaskRequest(id=task.id))).status.state == pb.TASK_STATE_INPUT_REQUIRED
            (ev,) = await send(client, message("approve", task_id=task.id))
    finally:
        portal.call(second.stop)
    assert ev.task.status.state == pb.TASK_STATE_COMPLETED
    assert reply_of(ev.task).startswith("Deleted: ")


@contextlib.contextmanager
def replica_of(system: System, portal: anyio.from_thread.BlockingPortal) -> Iterator[Gateway]:
    """A second gateway with its own runtime (registry view, client): it reaches the agents over the network."""

    async def start() -> tuple[micro.Runtime, Gateway]:
        rt = micro.Runtime(registry=system.runtime.registry, store="memory://", broker="memory://")
        await rt.acquire()
        return rt, await system.start_gateway(rt)

    rt, other = portal.call(start)
    try:
        yield other
    finally:
        portal.call(other.stop)
        portal.call(rt.release)


async def test_a_second_gateway_replica_serves_the_same_task(system: System, url: str,
                                                             portal: anyio.from_thread.BlockingPortal) -> None:
    with replica_of(system, portal) as other:
        async with a2a_client(f"{url}/agents/task-mgr") as a, a2a_client(f"{other.url}/agents/task-mgr") as b:
            task = await _delete_request(a, "t6", uuid.uuid4().hex)
            assert await b.get_task(pb.GetTaskRequest(id=task.id)) == await a.get_task(pb.GetTaskRequest(id=task.id))
            (ev,) = await send(b, message("approve", task_id=task.id))
            assert ev.task.status.state == pb.TASK_STATE_COMPLETED
            assert (await a.get_task(pb.GetTaskRequest(id=task.id))).status.state == pb.TASK_STATE_COMPLETED


# -- a task that is still working: resubscribe after the client drops, cancel -----------------------


async def _until_tool_started(client: Client, key: str, system: System,
                              portal: anyio.from_thread.BlockingPortal, request: pb.SendMessageRequest | None = None
                              ) -> str:
    """Stream `wait at KEY` until the run is inside the gate's Wait; the task id (the stream is dropped)."""
    task_id = ""
    with anyio.fail_after(GUARD):
        async for ev in client.send_message(request or message(f"wait at {key}")):
            if ev.HasField("task"):
                task_id = ev.task.id
            if ev.HasField("status_update") and status_text(ev.status_update.status).startswith("→ gate_Gate_Wait"):
                break  # the client drops the stream here
    portal.call(system.gate.entered_gate, key)
    return task_id


async def test_resubscribe_after_the_client_dropped_follows_the_task_to_its_end(
        url: str, system: System, portal: anyio.from_thread.BlockingPortal) -> None:
    async with a2a_client(f"{url}/agents/waiter", streaming=True) as client:
        task_id = await _until_tool_started(client, "g1", system, portal)
        assert (await client.get_task(pb.GetTaskRequest(id=task_id))).status.state == pb.TASK_STATE_WORKING
        events = []
        with anyio.fail_after(GUARD):
            async for ev in client.subscribe(pb.SubscribeToTaskRequest(id=task_id)):
                events.append(ev)
                if len(events) == 1:
                    assert ev.task.id == task_id and ev.task.status.state == pb.TASK_STATE_WORKING
                    portal.call(system.gate.open, "g1")  # only now does the run go on
        assert status_text(events[1].status_update.status).startswith("← gate_Gate_Wait")
        assert events[-1].status_update.status.state == pb.TASK_STATE_COMPLETED
        final = [e.artifact_update for e in events if e.HasField("artifact_update") and e.artifact_update.last_chunk]
        assert final[0].artifact.parts[0].text == "gate g1 opened"
        # an ended task has nothing more to stream
        with pytest.raises(UnsupportedOperationError, match="nothing more to stream"):
            async for _ in client.subscribe(pb.SubscribeToTaskRequest(id=task_id)):
                pass


async def test_cancel_stops_a_working_task(url: str, system: System,
                                           portal: anyio.from_thread.BlockingPortal) -> None:
    async with a2a_client(f"{url}/agents/waiter", streaming=True) as client:
        task_id = await _until_tool_started(client, "g2", system, portal)
        with anyio.fail_after(GUARD):
            cancelled = await client.cancel_task(pb.CancelTaskRequest(id=task_id))
        assert cancelled.status.state == pb.TASK_STATE_CANCELED
        assert (await client.get_task(pb.GetTaskRequest(id=task_id))).status.state == pb.TASK_STATE_CANCELED
    run = portal.call(system.module.task_mgr.runtime.client.call, "waiter", "AgentInfo.Run", {"id": task_id})
    assert run["run"]["status"] == "cancelled"


async def test_a_retried_message_returns_the_task_it_started_and_starts_no_second_run(
        url: str, system: System, portal: anyio.from_thread.BlockingPortal) -> None:
    """A client that sends a message again (its answer was lost) gets the first send's task, by
    ``messageId`` within the context: while it works (streamed from where it is), and once it ended."""
    context = uuid.uuid4().hex
    first = message("wait at g5", context_id=context)
    async with a2a_client(f"{url}/agents/waiter", streaming=True) as client:
        task_id = await _until_tool_started(client, "g5", system, portal, first)
        events = []
        with anyio.fail_after(GUARD):
            async for ev in client.send_message(first):  # the retry, while the first run works
                events.append(ev)
                if len(events) == 1:
                    assert ev.task.id == task_id and ev.task.status.state == pb.TASK_STATE_WORKING
                    portal.call(system.gate.open, "g5")
        assert events[-1].status_update.status.state == pb.TASK_STATE_COMPLETED
    async with a2a_client(f"{url}/agents/waiter") as client:
        (again,) = await send(client, first)  # once more, blocking, after the run ended
        assert again.task.id == task_id and reply_of(again.task) == "gate g5 opened"
        listed = await client.list_tasks(pb.ListTasksRequest(context_id=context))
        assert [t.id for t in listed.tasks] == [task_id]  # one run
        other = message("wait at g5", context_id=context)  # same text, a new messageId: a new run
        (ev,) = await send(client, other)  # (the gate is open now)
        assert ev.task.id != task_id
        assert len((await client.list_tasks(pb.ListTasksRequest(context_id=context))).tasks) == 2


class _Said(logging.Handler):
    """Sets a thread-safe event when a record says ``phrase`` (the gateway logs in the system's thread)."""

    def __init__(self, phrase: str) -> None:
        super().__init__(logging.INFO)
        self.phrase = phrase
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.phrase in record.getMessage():
            self.seen.set()


@contextlib.contextmanager
def said(phrase: str) -> Iterator[threading.Event]:
    logger = logging.getLogger("micro.gateway.a2a")
    handler, level = _Said(phrase), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_stopping_gateway_lets_the_runs_it_drives_finish_then_cancels_the_rest(
        system: System, portal: anyio.from_thread.BlockingPortal) -> None:
    def status(task_id: str) -> str:
        run = portal.call(system.runtime.client.call, "waiter", "AgentInfo.Run", {"id": task_id})
        return str(run["run"]["status"])

    draining = portal.call(functools.partial(system.start_gateway, drain_timeout=GUARD))
    async with a2a_client(f"{draining.url}/agents/waiter", streaming=True) as client:
        finishes = await _until_tool_started(client, "g6", system, portal)  # the client left: the gateway drives it
    with said("a2a: stopping: 1 runs it drives get up to 30 s to finish") as stopping:
        stopped = portal.start_task_soon(draining.stop)
        assert await anyio.to_thread.run_sync(stopping.wait, GUARD)
        assert status(finishes) == "running" and not stopped.done()  # the stop waits for the run
        portal.call(system.gate.open, "g6")
        stopped.result(GUARD)
    assert status(finishes) == "completed"

    impatient = portal.call(functools.partial(system.start_gateway, drain_timeout=0))
    async with a2a_client(f"{impatient.url}/agents/waiter", streaming=True) as client:
        cut = await _until_tool_started(client, "g7", system, portal)
    with said("a2a: 1 runs did not finish within 0 s of the gateway stopping: cancelled (waiter task") as warned:
        portal.call(impatient.stop)
        assert warned.is_set()
    portal.call(system.gate.open, "g7")
    with anyio.fail_after(GUARD):  # the agent writes `cancelled` as its run unwinds, just after the stream closed
        while (now := status(cut)) == "running":  # noqa: ASYNC110 - the system's thread writes the record
            await anyio.sleep(0.02)
    assert now == "cancelled"


# -- bad input: protocol errors, never a 500 -------------------------------------------------------


def rpc(method: str, params: Any, request_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


V1 = {"A2A-Version": "1.0"}


async def test_bad_input_gets_the_protocols_errors(url: str) -> None:
    endpoint = f"{url}/agents/task-mgr"
    text_message = {"message": {"role": "ROLE_USER", "messageId": "m1", "parts": [{"text": "hi"}]}}

    async def error_of(body: Any, **kwargs: Any) -> dict[str, Any]:
        rsp = await http.post(endpoint, headers=V1, **({"json": body} if "content" not in kwargs else {}), **kwargs)
        assert rsp.status_code in (200, 413), rsp.text
        error: dict[str, Any] = rsp.json()["error"]
        return error

    async with httpx.AsyncClient(timeout=GUARD) as http:
        assert (await error_of(None, content=b"{not json"))["code"] == -32700
        assert (await error_of({"id": 1, "method": "GetTask"}))["code"] == -32600  # no "jsonrpc": "2.0"
        assert (await error_of(rpc("tasks/explode", {})))["code"] == -32601
        unknown = await error_of(rpc("GetTask", {"id": "18ee0000000000000000000000000000"}))
        assert unknown["code"] == -32001 and "has no run '18ee0000000000000000000000000000'" in unknown["message"]
        assert (await error_of(rpc("GetTask", {"id": "../etc"})))["code"] == -32602
        file_part = {"message": {"role": "ROLE_USER", "messageId": "m2",
                                 "parts": [{"url": "https://example.com/x.png", "mediaType": "image/png"}]}}
        refused = await error_of(rpc("SendMessage", file_part))
        assert refused["code"] == -32005 and "part 0 is a file (image/png)" in refused["message"]
        empty = {"message": {"role": "ROLE_USER", "messageId": "m3", "parts": [{"text": "  "}]}}
        assert "has no text" in (await error_of(rpc("SendMessage", empty)))["message"]
        not_push = await error_of(rpc("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "http://127.0.0.1/"}))
        assert not_push["code"] == -32003
        huge = {"message": {"role": "ROLE_USER", "messageId": "m4", "parts": [{"text": "x" * (2 << 20)}]}}
        too_big = await http.post(endpoint, headers=V1, json=rpc("SendMessage", huge))
        assert too_big.status_code == 413
        assert "over this gateway's 1048576-byte limit" in too_big.json()["error"]["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts what comes
            for _ in range(3):
                yield b" " * (512 << 10)

        chunked = await http.post(f"{endpoint}/rest/message:send", headers=V1, content=chunks())
        assert chunked.status_code == 413
        assert chunked.json()["error"]["message"] == "the request body is over this gateway's 1048576-byte limit"
        # a JSON data part maps to text: the agent gets it as JSON
        data = {"message": {"role": "ROLE_USER", "messageId": "m5", "contextId": uuid.uuid4().hex,
                            "parts": [{"data": {"question": "What tasks are overdue for Alice?"}}]}}
        ok = (await http.post(endpoint, headers=V1, json=rpc("SendMessage", data))).json()
        assert ok["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        assert (await http.post(endpoint, headers=V1, json=rpc("SendMessage", text_message))).status_code == 200


async def test_a_protocol_v0_3_client_is_served_through_the_sdks_adapter(url: str) -> None:
    """No A2A-Version header, v0.3 method names and part kinds: older clients (ADK's, Go's) still work."""
    parts = [{"kind": "text", "text": "What tasks are overdue for Alice?"}]
    send_03 = rpc("message/send", {"message": {"role": "user", "messageId": "m03", "kind": "message", "parts": parts}})
    async with httpx.AsyncClient(timeout=GUARD) as http:
        task = (await http.post(f"{url}/agents/task-mgr", json=send_03)).json()["result"]
        assert task["kind"] == "task" and task["status"]["state"] == "completed"
        assert task["artifacts"][0]["parts"][0] == {"kind": "text", "text": "\n".join(OVERDUE)}
        got = (await http.post(f"{url}/agents/task-mgr", json=rpc("tasks/get", {"id": task["id"]}))).json()
        assert got["result"]["id"] == task["id"] and got["result"]["status"]["state"] == "completed"


# -- security: the card declares the token; browsers and rebinding are refused ------------------------


async def test_a_token_is_required_and_declared_in_the_cards(system: System,
                                                             portal: anyio.from_thread.BlockingPortal) -> None:
    gw = portal.call(lambda: system.start_gateway(token=TOKEN))
    try:
        async with httpx.AsyncClient(timeout=GUARD) as http:
            card = (await http.get(f"{gw.url}/agents/task-mgr/.well-known/agent-card.json")).json()  # public
            assert card["securitySchemes"] == {"bearer": {"httpAuthSecurityScheme": {
                "scheme": "Bearer", "description": "the gateway's token (micro a2a --token-env)"}}}
            assert card["securityRequirements"] == [{"schemes": {"bearer": {}}}]
            refused = await http.post(f"{gw.url}/agents/task-mgr", headers=V1, json=rpc("GetTask", {"id": "x"}))
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            wrong = await http.post(f"{gw.url}/agents/task-mgr", json=rpc("GetTask", {"id": "x"}),
                                    headers={**V1, "Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            foreign = await http.get(f"{gw.url}/agents", headers={"Origin": "https://evil.example"})
            assert foreign.status_code == 403 and "cross-origin request" in foreign.json()["error"]["message"]
        async with a2a_client(f"{gw.url}/agents/task-mgr", token=TOKEN) as client:
            (ev,) = await send(client, message("What tasks are overdue for Alice?"))
            assert reply_of(ev.task).splitlines() == OVERDUE
    finally:
        portal.call(gw.stop)


# -- micro's own client and CLI --------------------------------------------------------------------


async def test_micro_a2a_client_sends_streams_gets_and_translates_errors(url: str) -> None:
    async with micro.a2a.Client(f"{url}/agents/task-mgr") as agent:
        assert agent.card.name == "task-mgr"
        task = await agent.send("What tasks are overdue for Alice?")
        assert isinstance(task, pb.Task) and micro.a2a.Client.text(task).splitlines() == OVERDUE
        assert (await agent.get(task.id)).status.state == pb.TASK_STATE_COMPLETED
        assert task.id in [t.id for t in await agent.list(context_id=task.context_id)]
        events = [ev async for ev in agent.stream("What tasks are overdue for Bob?")]
        assert events[-1].status_update.status.state == pb.TASK_STATE_COMPLETED
        with pytest.raises(micro.errors.NotFound, match="has no run"):
            await agent.get("18ee0000000000000000000000000000")
        with pytest.raises(micro.errors.Conflict, match="it has ended"):
            await agent.cancel(task.id)
    with pytest.raises(micro.errors.BadRequest, match="no A2A agent card"):
        await micro.a2a.Client(f"{url}/agents/nobody").open()
    with pytest.raises(micro.errors.BadRequest, match="is not an A2A agent's URL"):
        micro.a2a.Client("ftp://example.com")


def _readme_a2a() -> list[tuple[str, list[str]]]:
    """The `micro a2a card|send` commands of README's A2A transcript, each with the lines printed under it."""
    section = README.split("## A2A\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```console\n(.*?)```", section, re.S)
    assert block is not None
    out: list[tuple[str, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return [(c, lines) for c, lines in out if c.startswith(("micro a2a card", "micro a2a send"))]


def test_the_readme_a2a_transcript_is_what_the_commands_print(url: str) -> None:
    commands = _readme_a2a()
    assert [c.split()[2] for c, _ in commands] == ["card", "send", "send", "send"]
    last_task = ""
    for command, expected in commands:
        args = [a.replace("http://127.0.0.1:4000", url) for a in shlex.split(command)]
        if last_task:  # the task id the command before printed
            args = [_TASK_ID.sub(last_task, a) for a in args]
        res = subprocess.run([sys.executable, "-m", "micro.cli", *args[1:]], capture_output=True, text=True,
                             timeout=GUARD, env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        printed = res.stdout + res.stderr
        expected = [line.replace("http://127.0.0.1:4000", url) for line in expected]
        assert readme_matches(expected, printed), f"$ {command}\n{printed}"
        last_task = next(iter(_TASK_ID.findall(res.stderr)), last_task)


def test_micro_a2a_refuses_a_bad_url_in_one_line() -> None:
    bad = subprocess.run([sys.executable, "-m", "micro.cli", "a2a", "send", "not-a-url", "hi"], capture_output=True,
                         text=True, timeout=GUARD)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("error: BadRequest: 'not-a-url' is not an A2A agent's URL: expected "
                                  "http(s)://host[:port]/path")


async def test_micro_a2a_serves_the_agents_of_the_machine_registry_as_a_program() -> None:
    """`micro a2a` as a user runs it: it finds an agent of another process through the machine-local
    registry (this test's MICRO_HOME) and drives its runs over the network."""
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        helper = micro.Agent("helper", prompt="You say hello.", runtime=rt,
                             provider=scripted.function(lambda messages, tools: f"hello, {messages[-1].text}"))
        async with helper:
            program = Program("a2a", "--address", "127.0.0.1:0")
            try:
                banner = await anyio.to_thread.run_sync(program.wait_for, "micro a2a on")
                base = banner.split(" on ", 1)[1].split(":", 2)
                url = f"{base[0]}:{base[1]}:{base[2].split(':')[0]}"
                async with httpx.AsyncClient(timeout=GUARD) as http:
                    cards = (await http.get(f"{url}/agents")).json()
                assert [c["name"] for c in cards] == ["helper"]
                assert cards[0]["description"] == "You say hello."
                async with micro.a2a.Client(f"{url}/agents/helper") as agent:
                    task = await agent.send("Ada")
                assert micro.a2a.Client.text(task) == "hello, Ada"
                run = await helper.runs.get(task.id)  # the task is the agent's run, in the agent's store
                assert run is not None and run.status == "completed"
            finally:
                rest = await anyio.to_thread.run_sync(program.stop)
    assert rest.rstrip().endswith("stopped")


async def test_micro_a2a_drain_timeout_bounds_how_long_a_stop_waits_for_the_runs_it_drives() -> None:
    """`micro a2a --drain-timeout 0`: a stop cancels the run the gateway drives (the client left) at once,
    says so, and the agent records the run cancelled; without the flag the gateway would wait 10 s."""
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        gate = Gate()
        service = micro.Service("gate", runtime=rt)
        service.handle(gate)
        waiter = micro.Agent("waiter", services=["gate"], prompt="You wait at gates.", runtime=rt,
                             provider=scripted.function(_waiter_brain))
        async with service, waiter:
            program = Program("a2a", "--address", "127.0.0.1:0", "--drain-timeout", "0")
            try:
                banner = await anyio.to_thread.run_sync(program.wait_for, "micro a2a on")
                base = banner.split(" on ", 1)[1].split()[0].rstrip(":")
                task_id = ""
                async with micro.a2a.Client(f"{base}/agents/waiter") as agent:
                    with anyio.fail_after(GUARD):
                        async for ev in agent.stream("wait at d1"):
                            if ev.HasField("task"):
                                task_id = ev.task.id
                            if ev.HasField("status_update") and status_text(ev.status_update.status).startswith(
                                    "→ gate_Gate_Wait"):
                                break  # the client leaves: the gateway drives the run
                    await gate.entered_gate("d1")
            finally:
                printed = await anyio.to_thread.run_sync(program.stop)
            assert f"a2a: 1 runs did not finish within 0 s of the gateway stopping: cancelled (waiter task {task_id})" \
                in printed, printed
            assert printed.rstrip().endswith("stopped")
            with anyio.fail_after(GUARD):  # the agent writes `cancelled` as its run unwinds
                while (run := await waiter.runs.get(task_id)) is not None and run.status == "running":  # noqa: ASYNC110 - the run unwinds in its own task
                    await anyio.sleep(0.02)
            assert run is not None and run.status == "cancelled"


def test_micro_a2a_drain_timeout_default_is_the_gateways() -> None:
    from micro.cli import a2a as cli_a2a
    from micro.gateway import a2a as gateway_a2a

    assert cli_a2a.DEFAULT_DRAIN_TIMEOUT == gateway_a2a.DEFAULT_DRAIN_TIMEOUT
    bad = subprocess.run([sys.executable, "-m", "micro.cli", "a2a", "--drain-timeout", "-1"], capture_output=True,
                         text=True, timeout=GUARD)
    assert bad.returncode == 2 and "--drain-timeout" in bad.stderr, bad.stderr


async def test_the_gateway_mounts_in_another_asgi_app() -> None:
    """Mounted under /a2a of an app whose lifespan runs the gateway's: cards name the mounted URLs, and with a
    token the cards and probes stay public there too (the mount prefix is not part of the gateway's paths)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        helper = micro.Agent("helper", prompt="You say hello.", runtime=rt,
                             provider=scripted.function(lambda messages, tools: "hello"))
        gateway = app(rt, token=TOKEN)

        @contextlib.asynccontextmanager
        async def lifespan(parent: Starlette) -> AsyncIterator[None]:
            async with gateway.router.lifespan_context(gateway):  # Mount does not run a sub-app's lifespan
                yield

        parent = Starlette(routes=[Mount("/a2a", gateway)], lifespan=lifespan)
        async with helper, lifespan(parent), httpx.AsyncClient(transport=httpx.ASGITransport(parent),
                                                                base_url="http://testserver") as http:
            found = await http.get("/a2a/agents/helper/.well-known/agent-card.json")  # no token: public
            assert found.status_code == 200, found.text
            card = found.json()
            assert card["supportedInterfaces"][0]["url"] == "http://testserver/a2a/agents/helper"
            assert [c["name"] for c in (await http.get("/a2a/agents")).json()] == ["helper"]
            assert (await http.get("/a2a/health/live")).status_code == 200
            hello = rpc("SendMessage", {"message": {"role": "ROLE_USER", "messageId": "m0", "parts": [{"text": "hi"}]}})
            refused = await http.post("/a2a/agents/helper", headers=V1, json=hello)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert (await http.get("/a2a/agents/helper/rest/tasks")).status_code == 401
            sent = await http.post("/a2a/agents/helper", headers={**V1, "Authorization": f"Bearer {TOKEN}"},
                                   json=rpc("SendMessage", {
                "message": {"role": "ROLE_USER", "messageId": "m1", "parts": [{"text": "hi"}]}}))
            task = sent.json()["result"]["task"]
            assert task["status"]["state"] == "TASK_STATE_COMPLETED"
            assert task["artifacts"][0]["parts"][0]["text"] == "hello"


async def test_a_replica_follows_a_task_another_gateway_drives(url: str, system: System,
                                                               portal: anyio.from_thread.BlockingPortal) -> None:
    with replica_of(system, portal) as other:
        async with a2a_client(f"{url}/agents/waiter", streaming=True) as a, \
                a2a_client(f"{other.url}/agents/waiter", streaming=True) as b:
            task_id = await _until_tool_started(a, "g3", system, portal)
            with pytest.raises(TaskNotCancelableError, match="working in another gateway or process"):
                await b.cancel_task(pb.CancelTaskRequest(id=task_id))
            events = []
            with anyio.fail_after(GUARD):
                async for ev in b.subscribe(pb.SubscribeToTaskRequest(id=task_id)):  # B does not drive it
                    events.append(ev)
                    if len(events) == 1:
                        assert ev.task.status.state == pb.TASK_STATE_WORKING
                        portal.call(system.gate.open, "g3")
    assert events[-2].artifact_update.artifact.parts[0].text == "gate g3 opened"
    assert events[-1].status_update.status.state == pb.TASK_STATE_COMPLETED
