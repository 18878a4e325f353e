"""The handler of ``bench_call`` in three type systems, and the server process of its gRPC half.

Every variant does the same work: filter five seed tasks down to one user's
overdue ones and build a three-record reply.

``python -m benchmarks._call_server micro`` serves it as the micro service
``benchcall`` (``Task.ListOverdue``: betterproto2 messages, proto-first, path
``/benchcall.Task/ListOverdue``; ``TaskJSON.ListOverdue``: msgspec Structs, JSON),
registered in the ``local`` registry under ``$MICRO_HOME``.
``python -m benchmarks._call_server raw`` serves ``/benchcall.Task/ListOverdue``
with plain grpclib and the upb messages of ``benchmarks/_rawpb``.
``python -m benchmarks._call_server bare`` serves the JSON handler as the bare framed
echo of ``benchmarks/_bare.py`` (micro's framing, none of its semantics).
``python -m benchmarks._call_server wire --prefix P`` serves the JSON handler as ``P-unix``
(with a Unix socket) and ``P-tcp`` (TCP only), for ``bench_wire``.
``--uvloop`` runs any of them on uvloop.

Either prints ``ready HOST:PORT`` once it can be called, and exits when its stdin
closes (so it never outlives the benchmark that started it).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import msgspec

from benchmarks._proto import benchcall as bp
from benchmarks._rawpb import benchcall_pb2 as pb
from benchmarks._rawpb.benchcall_grpc import TaskBase

SERVICE = "benchcall"
AS_OF = "2026-07-01"
SEED: tuple[tuple[str, str, str, str], ...] = (
    ("t1", "Write quarterly report", "2026-06-01", "alice"),
    ("t2", "Review PR #42", "2026-06-02", "alice"),
    ("t3", "Update deployment docs", "2026-06-03", "alice"),
    ("t4", "Plan the offsite", "2099-06-04", "alice"),
    ("t5", "Fix the nightly build", "2026-06-05", "bob"),
)


# -- msgspec (code-first) --------------------------------------------------------------------


class TaskRecord(msgspec.Struct):
    id: str
    title: str
    due: str


class ListOverdueRequest(msgspec.Struct):
    user_id: str


class ListOverdueResponse(msgspec.Struct):
    records: list[TaskRecord]
    total: int


class Task:
    async def ListOverdue(self, req: ListOverdueRequest) -> ListOverdueResponse:
        """List the tasks of a user that are past their due date."""
        records = [TaskRecord(i, t, d) for i, t, d, who in SEED if who == req.user_id and d < AS_OF]
        return ListOverdueResponse(records, len(records))


# -- betterproto2 (proto-first) --------------------------------------------------------------


class ProtoTask:
    """Served as ``Task``: its path is ``/benchcall.Task/ListOverdue``, as in the raw server."""

    async def ListOverdue(self, req: bp.ListOverdueRequest) -> bp.ListOverdueResponse:
        """List the tasks of a user that are past their due date."""
        records = [bp.TaskRecord(id=i, title=t, due=d) for i, t, d, who in SEED if who == req.user_id and d < AS_OF]
        return bp.ListOverdueResponse(records=records, total=len(records))


# -- raw grpclib + upb -----------------------------------------------------------------------


class RawTask(TaskBase):
    async def ListOverdue(self, stream: Any) -> None:
        req = await stream.recv_message()
        records = [pb.TaskRecord(id=i, title=t, due=d) for i, t, d, who in SEED if who == req.user_id and d < AS_OF]
        await stream.send_message(pb.ListOverdueResponse(records=records, total=len(records)))


# -- the server process ----------------------------------------------------------------------


async def _stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


async def _serve_micro() -> None:
    import micro

    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        service = micro.New(SERVICE, runtime=rt)
        service.handle(ProtoTask(), name="Task")
        service.handle(Task(), name="TaskJSON")
        async with service:
            print(f"ready {service.address}", flush=True)
            await _stdin_closed()


async def _serve_wire() -> None:
    """``bench_wire``'s server: the JSON handler as two services of one process, ``{prefix}-unix`` (a Unix
    socket beside its TCP port: clients on this host use the socket) and ``{prefix}-tcp`` (TCP only)."""
    import micro

    prefix = sys.argv[sys.argv.index("--prefix") + 1]
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        unix = micro.New(f"{prefix}-unix", runtime=rt)
        unix.handle(Task(), name="TaskJSON")
        tcp = micro.New(f"{prefix}-tcp", runtime=rt, unix_socket=False)
        tcp.handle(Task(), name="TaskJSON")
        async with unix, tcp:
            assert "native_unix" in unix.record.nodes[0].metadata, "no Unix socket: see the warning above"
            print(f"ready {unix.address}", flush=True)
            await _stdin_closed()


async def _serve_raw() -> None:
    from grpclib.server import Server

    server = Server([RawTask()])
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    print(f"ready 127.0.0.1:{port}", flush=True)
    try:
        await _stdin_closed()
    finally:
        server.close()
        await server.wait_closed()


async def _serve_bare() -> None:
    from benchmarks._bare import BareServer, json_handler

    handle = json_handler(Task().ListOverdue, ListOverdueRequest)
    server = await asyncio.get_running_loop().create_server(lambda: BareServer(handle), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"ready 127.0.0.1:{port}", flush=True)
    try:
        await _stdin_closed()
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    serve = {"micro": _serve_micro, "raw": _serve_raw, "bare": _serve_bare, "wire": _serve_wire}.get(kind)
    if serve is None:
        sys.exit("usage: python -m benchmarks._call_server micro|raw|bare|wire [--prefix NAME] [--uvloop]")
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


if __name__ == "__main__":
    # run the importable copy, so that the types live in `benchmarks._call_server`, not
    # `__main__` (msgspec resolves annotations through the module of the class)
    from benchmarks._call_server import main as _main

    _main()
