"""The operator's HTTP port of a process: ``/metrics``, ``/health/live`` and ``/health/ready``.

``micro run --metrics-address HOST:PORT`` serves it beside the services (off by
default). A small asyncio HTTP/1.1 server with no dependency beyond the metrics
extra: Prometheus scrapes ``/metrics``; Kubernetes probes ask ``/health/live``
(the process answers) and ``/health/ready`` (200 when every service of the process
is registered and serving, not draining, and the registry, store and broker answer
within two seconds; 503 with the reasons otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from micro import metrics

__all__ = ["ProbeServer", "backends", "readiness", "start_probes"]

log = logging.getLogger("micro.probes")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_HEADERS = 100
_READ_TIMEOUT = 10.0
BACKEND_TIMEOUT = 2.0


async def readiness(services: Sequence[Any]) -> list[str]:
    """Why the process is not ready (empty: ready). ``services``: :class:`micro.Service` objects."""
    problems = [f"{s.name}: not serving (starting, draining or stopped)" for s in services if not s.serving]
    runtimes = {id(s.runtime): s.runtime for s in services if s.serving}
    for rt in runtimes.values():
        problems += await backends(rt)
    return problems


async def backends(rt: Any) -> list[str]:
    """Which of a runtime's registry, store and broker do not answer now (:meth:`micro.health.Backends.check`)."""
    problems: list[str] = await rt.backends.check()
    return problems


class ProbeServer:
    """``start(host, port)`` binds (port 0: a free one, see :attr:`port`); ``aclose()`` stops."""

    def __init__(self, ready: Callable[[], Awaitable[list[str]]]) -> None:
        self._ready = ready
        self._server: asyncio.Server | None = None
        self.host, self.port = "", 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        if metrics.exposed is None:  # what services started from now on advertise (the first server's)
            metrics.exposed = self.address

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the started server (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the started server."""
        return f"http://{self.address}"

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            if metrics.exposed == self.address:
                metrics.exposed = None
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> ProbeServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await self._answer(reader)
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or sent nothing usable in time
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        async with asyncio.timeout(_READ_TIMEOUT):
            line = await reader.readline()
            for _ in range(_MAX_HEADERS):
                if (await reader.readline()) in (b"\r\n", b"\n", b""):
                    break
            else:
                return 400, b"too many headers\n", "text/plain"
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"not an HTTP request\n", "text/plain"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, b"GET only\n", "text/plain"
        if target == "/metrics":
            if not metrics.enabled():
                return 404, b"metrics are not enabled\n", "text/plain"
            body, ctype = metrics.exposition()
            return 200, body, ctype
        if target == "/health/live":
            return 200, b"live\n", "text/plain"
        if target == "/health/ready":
            problems = await self._ready()
            if problems:
                return 503, ("not ready:\n" + "\n".join(problems) + "\n").encode(), "text/plain"
            return 200, b"ready\n", "text/plain"
        return 404, b"not found: try /metrics, /health/live or /health/ready\n", "text/plain"


async def start_probes(address: str, services: Sequence[Any]) -> ProbeServer:
    """A started :class:`ProbeServer` on ``address`` (``HOST:PORT``; port 0 picks a free one) for ``services``.

    Raises:
        UsageError: ``address`` is not ``HOST:PORT``.
        OSError: the address cannot be bound.
    """
    from micro.errors import UsageError

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics-address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9464; port 0 picks one)")
    server = ProbeServer(lambda: readiness(services))
    await server.start(host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port))
    return server
