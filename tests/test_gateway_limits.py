"""The HTTP gateway under slow and numerous clients (issue 22), served by uvicorn as ``micro api`` serves it.

Before, 3,000 clients sending a header line every 10 s were never disconnected and, at
1,024 descriptors, 1,100 of them made every normal request time out with 2 M lines of
errors. Through :func:`micro.gateway.server.config`: a head that does not arrive within
``head_timeout`` gets 408 and the connection is closed, a body that does not arrive
within ``body_timeout`` is closed, connections past ``max_connections`` get 503, and
each kind of message is logged once per 10 s however many clients cause it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import uvicorn

import micro
from micro.connections import ConnectionLimit
from micro.gateway.http import app
from micro.gateway.mcp import MCPGateway
from micro.gateway.server import LOGGERS, config
from micro.logs import RateLimit
from micro.registry.memory import MemoryRegistry

HEAD = b"POST /api/echo/Echo.Ping HTTP/1.1\r\nhost: 127.0.0.1\r\n"  # and the rest never comes


class Ping(msgspec.Struct):
    text: str = ""


class Echo:
    async def Ping(self, req: Ping) -> Ping:
        """Answer with the request."""
        return req


class Gateway:
    def __init__(self, url: str, port: int, limit: ConnectionLimit) -> None:
        self.url, self.port, self.limit = url, port, limit

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
def rate_limits() -> Iterator[None]:
    yield
    for name in LOGGERS:  # the filters outlive the server in this process: leave other tests their logs
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, RateLimit)]:
            logger.removeFilter(f)


@contextlib.asynccontextmanager
async def gateway(kind: str = "api", **limits: Any) -> AsyncIterator[Gateway]:
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("echo", runtime=rt)
        service.handle(Echo())
        async with service:
            served = app(rt) if kind == "api" else MCPGateway(rt).http_app(host="127.0.0.1")
            cfg = config(served, **limits, log_level="warning", access_log=False, lifespan="on")
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            started = anyio.Event()

            class Server(uvicorn.Server):
                async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                    await super().startup(sockets=sockets)
                    started.set()

            server = Server(cfg)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: server.serve(sockets=[sock]))
                with anyio.fail_after(10):
                    await started.wait()
                port = sock.getsockname()[1]
                try:
                    yield Gateway(f"http://127.0.0.1:{port}", port, cfg.connection_limit)
                finally:
                    server.should_exit = True
            sock.close()


async def answered(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    with anyio.fail_after(10):
        return await reader.read()


async def test_slowloris_is_disconnected_after_the_head_deadline_while_normal_requests_are_answered(
        rate_limits: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with gateway(head_timeout=1.0, max_connections=32) as gw:
        slow = [await gw.raw() for _ in range(30)]
        for _, writer in slow:
            writer.write(HEAD)
        with anyio.fail_after(10):
            while gw.limit.open < 30:
                await anyio.wait_all_tasks_blocked()
        async with httpx.AsyncClient(base_url=gw.url) as http:  # one more connection: 31 open
            for i in range(10):
                rsp = await http.post("/api/echo/Echo.Ping", json={"text": str(i)})
                assert (rsp.status_code, rsp.json()) == (200, {"text": str(i)})
            extra = [await gw.raw() for _ in range(3)]  # the 32nd is let in, the two after it are not
            replies = [await answered(reader) for reader, _ in extra[1:]]
            assert all(r.startswith(b"HTTP/1.1 503 ") for r in replies), replies
            assert b"gateway has 32 connections open, its limit (max_connections)" in replies[0]
            for reader, _ in slow + extra[:1]:
                assert (await answered(reader)).startswith(b"HTTP/1.1 408 Request Timeout")
            # the 31 slow clients are gone; the gateway still answers
            rsp = await http.post("/api/echo/Echo.Ping", json={"text": "after"})
            assert rsp.json() == {"text": "after"}
        for _, writer in slow + extra:
            writer.close()
    closed = [r for r in caplog.records if "did not arrive within 1 s" in r.getMessage()]
    assert len(closed) == 1  # 31 connections closed, one line (rate-limited)
    assert len([r for r in caplog.records if "refusing new connections" in r.getMessage()]) == 1


async def test_a_body_that_does_not_arrive_in_time_closes_its_connection(rate_limits: None) -> None:
    async with gateway(body_timeout=0.3) as gw:
        reader, writer = await gw.raw()
        writer.write(HEAD + b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"text\"")
        sent = await answered(reader)  # closed, the call told its client left
        writer.close()
        assert not sent.startswith(b"HTTP/1.1 200")
        with anyio.fail_after(10):
            while gw.limit.open:
                await anyio.wait_all_tasks_blocked()


async def test_the_mcp_http_transport_has_the_same_deadlines(rate_limits: None) -> None:
    async with gateway("mcp", head_timeout=0.5) as gw:
        slow = [await gw.raw() for _ in range(10)]
        for _, writer in slow:
            writer.write(b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/health/live")).status_code == 200
        for reader, writer in slow:
            assert (await answered(reader)).startswith(b"HTTP/1.1 408 Request Timeout")
            writer.close()


def test_rate_limit_lets_one_message_a_period_through_and_counts_the_rest() -> None:
    limit = RateLimit(period=3600)
    records = [logging.LogRecord("x", logging.WARNING, __file__, 1, "closed %s", (i,), None) for i in range(5)]
    assert [limit.filter(r) for r in records] == [True, False, False, False, False]
    other = logging.LogRecord("x", logging.WARNING, __file__, 1, "another kind", None, None)
    assert limit.filter(other)
    limit.period = 0  # the period is over: the next one says what was held back
    late = logging.LogRecord("x", logging.WARNING, __file__, 1, "closed %s", (9,), None)
    assert limit.filter(late)
    assert late.getMessage() == "closed 9 (4 more like it in the last 0 s were not logged)"


async def test_a_client_that_half_closes_after_its_request_gets_its_answer(rate_limits: None) -> None:
    """`nc -N`, health checkers, HTTP/1.0 clients: the request, then EOF. The answer the gateway holds to
    write in one go at the end of the loop iteration must go out before asyncio closes the connection."""
    async with gateway() as gw:
        body = b'{"text": "hi"}'
        for _ in range(5):
            reader, writer = await gw.raw()
            writer.write(b"POST /api/echo/Echo.Ping HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            writer.write_eof()
            data = await answered(reader)
            writer.close()
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"text":"hi"}'), data
