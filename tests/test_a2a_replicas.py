"""Two A2A gateway replicas over one real NATS store serve the same task (issue 18).

Each replica is a whole process's worth of micro: its own registry, an agent `clerk` that
needs a person's approval to delete an entry (scripted model), and an A2A gateway. The only
thing the replicas share is the store, a NATS JetStream KV bucket on the session's real
nats-server. A task that replica A paused is read, answered and finished through replica B
after A is gone entirely: nothing of a task lives in a gateway's memory. A message sent again
to the other replica gets the task the first send started (the replicas share the record of it).
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import uvicorn
from a2a.client import ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.gateway.a2a import app
from micro.store.nats import NatsStore

GUARD = 30.0  # a deadlock guard, never a timing assertion


class EntryReq(msgspec.Struct):
    id: str


class EntryRsp(msgspec.Struct):
    deleted: str
    by: str


class Ledger:
    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.deleted: list[str] = []

    async def Delete(self, req: EntryReq) -> EntryRsp:
        """Delete a ledger entry."""
        self.deleted.append(req.id)
        return EntryRsp(req.id, self.replica)


def clerk(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    last = messages[-1]
    results = [b for b in last.content if isinstance(b, ToolResultBlock)]
    if results:
        return f"done: {results[0].content}"
    return scripted.turn("Deleting...", scripted.call("ledger_Ledger_Delete", id=last.text.split()[-1]))


class Replica:
    def __init__(self, url: str, ledger: Ledger) -> None:
        self.url = url
        self.ledger = ledger


@contextlib.asynccontextmanager
async def replica(name: str, nats_url: str, database: str) -> AsyncIterator[Replica]:
    ledger = Ledger(name)
    store = NatsStore(nats_url, database=database)  # each replica its own connection to the one bucket
    async with micro.Runtime(registry="memory://", store=store, broker="memory://") as rt:
        service = micro.Service("ledger", runtime=rt)
        service.handle(ledger)
        agent = micro.Agent("clerk", services=["ledger"], provider=scripted.function(clerk), runtime=rt,
                            needs_approval=["ledger_Ledger_Delete"])
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        started = anyio.Event()

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                started.set()

        server = Server(uvicorn.Config(app(rt), log_level="warning", lifespan="on"))
        with sock:
            async with service, agent, anyio.create_task_group() as tg:
                tg.start_soon(lambda: server.serve(sockets=[sock]))
                await started.wait()
                yield Replica(f"http://127.0.0.1:{sock.getsockname()[1]}/agents/clerk", ledger)
                server.should_exit = True


async def send(url: str, request: pb.SendMessageRequest) -> pb.Task:
    async with await ClientFactory(ClientConfig(streaming=False)).create_from_url(url) as client:
        with anyio.fail_after(GUARD):
            (ev,) = [ev async for ev in client.send_message(request)]
        task: pb.Task = ev.task
        return task


def message(text: str, *, task_id: str = "") -> pb.SendMessageRequest:
    return pb.SendMessageRequest(message=pb.Message(role=pb.ROLE_USER, message_id=uuid.uuid4().hex, task_id=task_id,
                                                    parts=[pb.Part(text=text)]))


async def test_a_task_paused_through_one_replica_is_finished_through_the_other(nats_url: str) -> None:
    database = f"a2a-{uuid.uuid4().hex[:10]}"
    async with replica("b", nats_url, database) as b:
        async with replica("a", nats_url, database) as a:
            first = message("delete entry e1")
            paused = await send(a.url, first)
            assert paused.status.state == pb.TASK_STATE_INPUT_REQUIRED
            assert a.ledger.deleted == [] and b.ledger.deleted == []
        # the same message sent again to the other replica (a client's retry): the same task, no new run
        assert (await send(b.url, first)).id == paused.id
        # replica A is gone (gateway, agent, runtime): B reads the task from the shared store...
        async with await ClientFactory(ClientConfig(streaming=False)).create_from_url(b.url) as client:
            seen = await client.get_task(pb.GetTaskRequest(id=paused.id))
        assert seen.status.state == pb.TASK_STATE_INPUT_REQUIRED and seen.context_id == paused.context_id
        assert seen.status.message.parts[0].text.startswith('Approve ledger_Ledger_Delete({"id": "e1"})?')
        # ...and answering it there resumes the run there
        approve = message("approve", task_id=paused.id)
        done = await send(b.url, approve)
        again = await send(b.url, approve)  # sent again: the same finished task, nothing deleted twice
    assert again == done
    assert done.id == paused.id and done.status.state == pb.TASK_STATE_COMPLETED
    assert done.artifacts[0].parts[0].text == 'done: {"deleted":"e1","by":"b"}'
    assert b.ledger.deleted == ["e1"] and a.ledger.deleted == []
