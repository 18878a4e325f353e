"""The HTTP baseline of ``bench_gateway``: uvicorn + httptools serving a trivial JSON endpoint.

``python -m benchmarks._http_baseline`` answers every POST with the same JSON body the
gateway returns for ``TaskJSON.ListOverdue`` (read the request body, write a fixed
reply: the HTTP server's own cost and nothing else), with the uvicorn settings and
event loop ``micro api`` uses. It prints ``ready HOST:PORT`` and exits when its
stdin closes or on SIGINT.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import msgspec

from benchmarks._call_server import ListOverdueRequest, Task
from micro import eventloop


def reply_body() -> bytes:
    coro = Task().ListOverdue(ListOverdueRequest("alice"))
    try:
        coro.send(None)
    except StopIteration as done:
        return msgspec.json.encode(done.value)
    raise RuntimeError("the handler awaited")


BODY = reply_body()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def main() -> None:
    import uvicorn

    started = asyncio.Event()

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            started.set()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await started.wait()
    print(f"ready 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    server.should_exit = True
    await serving


if __name__ == "__main__":
    eventloop.run(main())
