"""Agent.Chat and Agent.StreamChat from a plain grpcio client (issue 4, point 5).

The stubs are generated from proto/agent.proto by grpc_tools.protoc at test time,
into a temporary directory: nothing micro generated or wrote is used on the
client side, so this is what a Go or grpcurl client would see. grpcio's blocking
client runs in a worker thread while the agent serves on the test's loop.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import grpc
import msgspec
import pytest

import micro
from micro import context
from micro.ai import ToolResultBlock, scripted

ROOT = Path(__file__).resolve().parent.parent
GUARD = 10.0  # seconds: a deadlock guard, never a timing assertion


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """agent_pb2 and agent_pb2_grpc, generated now from proto/agent.proto."""
    out = tmp_path_factory.mktemp("grpcio_stubs")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(ROOT / "proto" / "agent.proto")],
        check=True, capture_output=True,
    )
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("agent_pb2"), importlib.import_module("agent_pb2_grpc")
    finally:
        sys.path.remove(str(out))
        for name in ("agent_pb2", "agent_pb2_grpc"):
            sys.modules.pop(name, None)


class Lookup(msgspec.Struct):
    user_id: str


class Overdue(msgspec.Struct):
    user_id: str
    titles: list[str]


class Tasks:
    def __init__(self) -> None:
        self.cancelled = anyio.Event()
        self.deadlines: list[float | None] = []

    async def ListOverdue(self, req: Lookup) -> Overdue:
        """List a user's overdue tasks."""
        if req.user_id == "slow":
            self.deadlines.append(context.time_remaining())
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.cancelled.set()
                raise
        return Overdue(req.user_id, ["Write quarterly report", "Review PR #42"])


def script(messages: list[Any], tools: list[Any]) -> scripted.Turn | str:
    last = messages[-1]
    results = [b for b in last.content if isinstance(b, ToolResultBlock)]
    if results:
        titles = json.loads(results[0].content)["titles"]
        return f"{len(titles)} overdue: {', '.join(titles)}."
    user = last.text.split()[-1].rstrip("?")
    return scripted.turn("Looking.", scripted.call("task_Tasks_ListOverdue", user_id=user))


@pytest.fixture
async def agent() -> AsyncIterator[tuple[micro.Agent, Tasks]]:
    tasks = Tasks()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        service = micro.Service("task", runtime=rt)
        service.handle(tasks)
        async with service, micro.Agent("task-mgr", services=["task"], provider=scripted.function(script),
                                        runtime=rt) as agent:
            yield agent, tasks


async def in_thread(fn: Any) -> Any:
    with anyio.fail_after(GUARD):
        return await anyio.to_thread.run_sync(fn)


async def test_chat_from_grpcio(pb: tuple[ModuleType, ModuleType], agent: tuple[micro.Agent, Tasks]) -> None:
    agent_pb2, agent_pb2_grpc = pb
    address = agent[0].address

    def chat() -> Any:
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            return stub.Chat(agent_pb2.ChatRequest(message="What is overdue for alice?", parent_id="p-1"), timeout=5)

    rsp = await in_thread(chat)
    assert rsp.reply == "2 overdue: Write quarterly report, Review PR #42."
    assert rsp.agent == "task-mgr" and rsp.parent_id == "p-1" and len(rsp.run_id) == 32
    (call,) = rsp.tool_calls
    assert call.name == "task_Tasks_ListOverdue" and not call.is_error
    assert json.loads(call.input) == {"user_id": "alice"}
    assert json.loads(call.result)["user_id"] == "alice"


async def test_stream_chat_from_grpcio(pb: tuple[ModuleType, ModuleType], agent: tuple[micro.Agent, Tasks]) -> None:
    agent_pb2, agent_pb2_grpc = pb
    address = agent[0].address

    def stream() -> list[Any]:
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            return list(stub.StreamChat(agent_pb2.ChatRequest(message="Overdue for bob?", session="b"), timeout=5))

    events = await in_thread(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "text" and kinds[-1] == "done"
    assert kinds.index("tool_start") < kinds.index("tool_end")
    assert events[kinds.index("tool_end")].tool_call.name == "task_Tasks_ListOverdue"
    assert events[-1].response.reply.startswith("2 overdue")


async def test_grpcio_errors_and_deadlines(pb: tuple[ModuleType, ModuleType],
                                           agent: tuple[micro.Agent, Tasks]) -> None:
    agent_pb2, agent_pb2_grpc = pb
    address, tasks = agent[0].address, agent[1]

    def call(message: str, timeout: float) -> grpc.StatusCode:
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Chat(agent_pb2.ChatRequest(message=message), timeout=timeout)
            code: grpc.StatusCode = failed.value.code()
            return code

    assert await in_thread(lambda: call("", 5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await in_thread(lambda: call("What is overdue for slow?", 0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    with anyio.fail_after(GUARD):
        await tasks.cancelled.wait()  # the client's deadline reached the tool call inside the agent
    (remaining,) = tasks.deadlines
    # the wire rounds grpc-timeout to a unit; anything near 0.5 s (not the 60 s tool default) is the client's
    assert remaining is not None and remaining <= 0.6
