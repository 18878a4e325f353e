"""``micro api`` and ``micro mcp``: the registry's services over HTTP, and as MCP tools.

``micro api`` serves :mod:`micro.gateway.http` with uvicorn; ``micro mcp`` serves
:mod:`micro.gateway.mcp` over stdio (for an MCP host that starts it) or streamable
HTTP. Both find services through the same registry as every other command and
listen on loopback unless ``--address`` says otherwise. Port 0 picks a free port;
the address actually bound is printed once the server accepts connections
(``micro mcp`` over stdio prints nothing on stdout: it is the protocol's).
SIGINT or SIGTERM stops the server gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import click
from rich.markup import escape

from micro import metrics
from micro.cli.main import cli_runtime, err, fail, main, out, run_async


def parse_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``[::1]:8080`` or ``:8080`` (loopback) -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        fail(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:8080; port 0 picks a free one)", 2)
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port)


def loopback(host: str) -> bool:
    """Whether HOST names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dashboard_address(address: str, allow_hosts: tuple[str, ...], option: str) -> None:
    """Fail (exit 2, one line naming ``--allow-host``) for a dashboard off loopback with no ``--allow-host``.

    Such a dashboard would serve its pages for any ``Host`` but refuse every form they post (a name
    re-pointed at it could not be told from its own: DNS rebinding), so it would look up and do nothing.
    """
    host, _ = parse_address(address)
    if loopback(host) or allow_hosts:
        return
    example = host if host not in ("0.0.0.0", "::", "") else "dashboard.example.com"
    fail(f"{option} {address} is not a loopback address: the dashboard needs the names browsers reach it by "
         f"(--allow-host {example}, repeatable), or listen on 127.0.0.1; without them its forms would be refused",
         2)


def bind(address: str) -> socket.socket:
    """A listening socket on HOST:PORT (connections queue from now on, before a server runs); ``OSError``
    when it cannot listen there."""
    host, port = parse_address(address)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: a response's head and body go out at once, instead of the
        # body waiting ~40 ms for the client's delayed ACK of the head (Nagle), as it did with httpx
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(where)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _bind(address: str) -> socket.socket:
    try:
        return bind(address)
    except OSError as exc:
        fail(f"cannot listen on {address}: {exc.strerror or exc}")


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def token_from(var: str | None, address: str) -> str | None:
    """The token in environment variable VAR (``--token-env``); without one, a warning off loopback."""
    if var is None:
        host, _ = parse_address(address)
        if not loopback(host):
            err.print(f"[yellow]warning:[/yellow] listening on {host} without --token-env: anyone who can reach "
                      "it can call every service", markup=True)
        return None
    token = os.environ.get(var)
    if not token:
        fail(f"--token-env {var}: the environment variable {var} is not set or is empty", 2)
    return token


def _limits(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options bounding slow and numerous clients (see :mod:`micro.gateway.server`)."""
    from micro.gateway.server import DEFAULT_BODY_TIMEOUT, DEFAULT_HEAD_TIMEOUT

    fn = click.option("--max-connections", type=click.IntRange(min=1), default=None,
                      help="Connections open at once; past it a new one gets 503 "
                           "[default: the descriptor limit less an eighth].")(fn)
    fn = click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BODY_TIMEOUT,
                      show_default=True, help="Seconds a client has to send a request's body.")(fn)
    fn = click.option("--head-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_HEAD_TIMEOUT,
                      show_default=True, help="Seconds a client has to send a request's head; then 408.")(fn)
    return fn


async def _serve(app: Any, sock: socket.socket, ready: Callable[[], None], limits: dict[str, Any],
                 on_stop: Callable[[], None] | None = None) -> None:
    """Run an ASGI app with uvicorn on ``sock``, bounded by ``limits`` (head_timeout, body_timeout,
    max_connections); SIGINT or SIGTERM stops it gracefully (twice: at once)."""
    import uvicorn

    from micro.connections import quiet_accept_errors
    from micro.gateway.server import config

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the task below handles the signals: the command then ends normally

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                ready()

    server = Server(config(app, **limits, log_level="warning", access_log=False, lifespan="on",
                           timeout_graceful_shutdown=10))
    quiet_accept_errors()

    async def stop_on_signals(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                if server.should_exit:
                    server.force_exit = True
                server.should_exit = True
                if on_stop is not None:
                    on_stop()

    async with anyio.create_task_group() as tg:
        await tg.start(stop_on_signals)
        try:
            await server.serve(sockets=[sock])
        finally:
            tg.cancel_scope.cancel()
            sock.close()
    if server.lifespan.should_exit and not server.started:  # the app could not start: uvicorn logged why
        fail("the server did not start")


#: The modules the dashboard needs (``micro[gateway]``): the ASGI framework, its server, the
#: templates and the forms' parser (python-multipart, imported by either of its names).
DASHBOARD_MODULES = (("starlette",), ("uvicorn",), ("jinja2",), ("python_multipart", "multipart"))


def missing_dashboard_modules() -> list[str]:
    """The modules of :data:`DASHBOARD_MODULES` not installed (found without importing them)."""
    import importlib.util

    return [names[0] for names in DASHBOARD_MODULES if not any(importlib.util.find_spec(n) for n in names)]


class HttpServer:
    """The dashboard and JSON API of ``micro run``: uvicorn on a socket bound before, in a task it owns.

    Nothing of the HTTP stack is imported before the services are up: :meth:`start` starts a task
    that imports starlette, uvicorn and the dashboard in a worker thread, then serves; connections
    that arrive meanwhile wait in the socket's backlog. If the task fails (an import, the app, the
    server), it says so at once on stderr, with the reason, and closes the socket: connections are
    refused rather than left waiting; the services go on. :meth:`aclose` ends the dashboard's live
    streams, stops the server gracefully and awaits the task.
    """

    def __init__(self, sock: socket.socket, runtime: Any, *, token: str | None, loopback_only: bool,
                 allow_hosts: tuple[str, ...] = (), dashboard: bool = True) -> None:
        self.sock = sock
        self.url = url_of(sock)
        self.dashboard = dashboard  # False: the JSON API only (off loopback with no --allow-host)
        self._runtime = runtime
        self._token = token
        self._loopback_only = loopback_only  # then only this machine's names are served (DNS rebinding)
        self._allow_hosts = allow_hosts
        self._server: Any = None
        self._app: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def what(self) -> str:
        """What it serves, in a word: ``dashboard`` (with the JSON API) or ``api`` (the JSON API only)."""
        return "dashboard" if self.dashboard else "api"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="micro http")

    async def _serve(self) -> None:
        try:
            await self._run()
        except Exception as exc:
            self.sock.close()  # first: once this is read, connections are refused
            err.print("[yellow]warning:[/yellow] " + escape(f"the {self.what} on {self.url} failed: "
                                                             f"{type(exc).__name__}: {exc}; the services go on "
                                                             "without it"), markup=True, highlight=False)
        else:
            if not self._stopping and self._server is not None and not self._server.started:
                self.sock.close()
                err.print(f"[yellow]warning:[/yellow] the {self.what} on {self.url} did not start (the log above says "
                          "why); the services go on without it", markup=True, highlight=False)
        finally:
            self.sock.close()

    async def _run(self) -> None:
        import importlib

        def load() -> None:  # off the loop: the services answer calls meanwhile
            for name in ("uvicorn", "starlette.applications", "micro.gateway.http", "micro.gateway.server",
                         "micro.dashboard.pages"):
                importlib.import_module(name)

        await anyio.to_thread.run_sync(load)
        import uvicorn

        from micro.gateway.http import LOOPBACK_HOSTS, app

        extra = list(self._allow_hosts)
        hosts = [*LOOPBACK_HOSTS, *extra] if self._loopback_only else (extra or None)
        self._app = app(self._runtime, token=self._token, allowed_hosts=hosts, dashboard=self.dashboard)

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # micro run handles the signals

        from micro.connections import quiet_accept_errors
        from micro.gateway.server import config

        # the gateway's bounds on slow and numerous clients, at their defaults
        self._server = Server(config(self._app, log_level="warning", access_log=False, lifespan="on",
                                     timeout_graceful_shutdown=5))
        quiet_accept_errors()
        if self._stopping:
            return
        await self._server.serve(sockets=[self.sock])

    async def aclose(self) -> None:
        self._stopping = True
        if self._app is not None and self._app.state.dashboard is not None:
            self._app.state.dashboard.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task  # it reports its own failure
        self.sock.close()


def _say(line: str) -> Callable[[], None]:
    def ready() -> None:
        out.print(line, markup=False)
        sys.stdout.flush()

    return ready


@main.command()
@click.option("--address", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT to listen on (port 0 picks a free one).")
@click.option("--token-env", metavar="VAR", help="Require `Authorization: Bearer $VAR` on every request.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds one call (or one whole stream) may take; then 504.")
@click.option("--max-body", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="The largest request body accepted, in bytes; larger gets 413.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also serve requests for this Host name (on loopback only 127.0.0.1, localhost and ::1 are "
                   "served, against DNS rebinding). Repeatable.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="Let browser pages from this origin (https://app.example.com, or *) call the gateway, with CORS; "
                   "requests from other origins get 403. Repeatable.")
@_limits
@run_async
async def api(address: str, token_env: str | None, timeout: float, max_body: int, allow_hosts: tuple[str, ...],
              allow_origins: tuple[str, ...], head_timeout: float, body_timeout: float,
              max_connections: int | None) -> None:
    """Serve the services in the registry over HTTP (JSON in, JSON out).

    \b
    POST /api/SERVICE/Handler.Method   call an endpoint (streaming ones answer with Server-Sent Events)
    GET  /api/services                 the registry's records
    GET  /openapi.json                 an OpenAPI 3.1 document of every endpoint

    \b
    Example:
      micro api &
      curl -s localhost:8080/api/task/Task.ListOverdue -d '{"user_id": "alice"}'
    """
    from micro.gateway.http import LOOPBACK_HOSTS, app

    metrics.enable_if_installed()  # before the runtime: its client counts the calls made through the gateway
    token = token_from(token_env, address)
    host, _ = parse_address(address)
    # on loopback only this machine's names are served; elsewhere the name is the operator's to choose
    hosts = [*LOOPBACK_HOSTS, *allow_hosts] if loopback(host) else (list(allow_hosts) or None)
    gateway = app(cli_runtime(), token=token, max_body=max_body, timeout=timeout, allowed_hosts=hosts,
                  allowed_origins=allow_origins)
    sock = _bind(address)
    url = url_of(sock)
    auth = " (bearer token required)" if token else ""
    limits = {"head_timeout": head_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    await _serve(gateway, sock, _say(f"micro api on {url}{auth}: POST {url}/api/{{service}}/{{Handler.Method}}, "
                                     f"GET {url}/api/services, GET {url}/openapi.json"), limits)
    out.print("stopped")


@main.command()
@click.option("--address", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT to listen on (port 0 picks a free one).")
@click.option("--token-env", metavar="VAR",
              help="Require the token in $VAR: pages ask for it once (a login form), API calls send "
                   "`Authorization: Bearer $VAR`.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds one call (or one streamed chat) may take.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also serve requests for this Host name (on loopback only 127.0.0.1, localhost and ::1). "
                   "Repeatable.")
@_limits
@run_async
async def dashboard(address: str, token_env: str | None, timeout: float, allow_hosts: tuple[str, ...],
                    head_timeout: float, body_timeout: float, max_connections: int | None) -> None:
    """Serve the dashboard (and the JSON API) for the services, agents and flows in the registry.

    \b
    /              services, agents and flows, live
    /api/...       the JSON API of `micro api`

    \b
    Example:
      micro dashboard --address 127.0.0.1:8090
    """
    from micro.gateway.http import LOOPBACK_HOSTS, app

    metrics.enable_if_installed()
    check_dashboard_address(address, allow_hosts, "--address")
    token = token_from(token_env, address)
    host, _ = parse_address(address)
    hosts = [*LOOPBACK_HOSTS, *allow_hosts] if loopback(host) else list(allow_hosts)
    served = app(cli_runtime(), token=token, timeout=timeout, allowed_hosts=hosts, dashboard=True)
    sock = _bind(address)
    url = url_of(sock)
    auth = " (log in with the token)" if token else ""
    limits = {"head_timeout": head_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    await _serve(served, sock, _say(f"dashboard: {url}{auth}"), limits, on_stop=served.state.dashboard.close)
    out.print("stopped")


@main.command()
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              help="stdio for an MCP host that starts this command; http for streamable HTTP at /mcp.")
@click.option("--services", metavar="A,B", help="Offer only these services and agents (comma-separated).")
@click.option("--address", default="127.0.0.1:8081", show_default=True,
              help="HOST:PORT to listen on with --transport http (port 0 picks a free one).")
@click.option("--token-env", metavar="VAR",
              help="With --transport http: require `Authorization: Bearer $VAR` on every request.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds one tool call may take.")
@_limits
@run_async
async def mcp(transport: str, services: str | None, address: str, token_env: str | None, timeout: float,
              head_timeout: float, body_timeout: float, max_connections: int | None) -> None:
    """Serve the services and agents in the registry as MCP tools.

    Each endpoint is a tool named SERVICE_Handler_Method; each agent is a tool
    ask_AGENT. The list follows the registry: clients are told when it changes.

    \b
    An MCP host's config (Claude Desktop, Claude Code, …):
      {"mcpServers": {"micro": {"command": "micro", "args": ["mcp"]}}}
    """
    from micro.gateway.mcp import MCPGateway

    names = [s.strip() for s in services.split(",") if s.strip()] if services else None
    if transport == "http":
        metrics.enable_if_installed()  # served at /metrics beside /mcp
    gateway = MCPGateway(cli_runtime(), services=names, timeout=timeout)
    if transport == "stdio":
        if token_env is not None:
            fail("--token-env applies to --transport http (stdio is as private as the process that starts it)", 2)
        await gateway.run_stdio()
        return
    token = token_from(token_env, address)
    host, _ = parse_address(address)
    sock = _bind(address)
    url = url_of(sock)
    auth = " (bearer token required)" if token else ""
    limits = {"head_timeout": head_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    await _serve(gateway.http_app(host=host, token=token), sock,
                 _say(f"micro mcp on {url}/mcp (streamable HTTP){auth}"), limits)
    out.print("stopped")
