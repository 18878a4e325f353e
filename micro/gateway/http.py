"""The HTTP gateway: an ASGI app that turns JSON over HTTP into calls to micro services.

Routes:

- ``POST /api/{service}/{Handler.Method}``: the JSON body is the request, the JSON
  response the endpoint's response. A server-streaming endpoint (``Agent.StreamChat``
  among them) answers with Server-Sent Events: one ``data:`` line of JSON per item,
  and an ``event: error`` if the stream fails after it started.
- ``GET /api/services``: the registry's records (what ``micro services --json`` prints);
  ``GET /api/services/{service}``: one service's records.
- ``GET /openapi.json``: an OpenAPI 3.1 document built from the registry's schemas.

Errors are ``{"error": {"code": "INVALID_ARGUMENT", "message": "..."}}`` with the
HTTP status of the call's gRPC status (:data:`HTTP_STATUS`). A body over
``max_body`` bytes is refused with 413 before it is read in full; every call runs
under ``timeout`` seconds (504 when it passes). With ``token``, every request needs
``Authorization: Bearer <token>`` (compared in constant time, never logged);
without one, a request's ``Authorization`` header goes on as the call's
``authorization`` metadata, for services that check tokens themselves
(:class:`micro.auth.TokenAuth`).

The app's lifespan takes a reference on the runtime (``runtime.acquire()``), so
``uvicorn`` or any ASGI server that runs lifespans opens it; when mounting the app
somewhere that does not, open the runtime yourself (``async with runtime:``).

Example::

    import uvicorn
    import micro
    from micro.gateway.http import app

    uvicorn.run(app(micro.Runtime(), token="s3cret"), host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from micro import metrics
from micro.errors import Error, Status, UsageError
from micro.gateway import openapi

if TYPE_CHECKING:
    from micro.runtime import Runtime

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_TIMEOUT", "HTTP_STATUS", "LOGIN_COOKIE", "LOOPBACK_HOSTS", "BearerAuth",
           "BrowserGuard", "EventStream", "app", "error_body", "login_cookie", "login_value", "route_path", "stream"]

log = logging.getLogger("micro.gateway")

DEFAULT_MAX_BODY = 1 << 20  # bytes
DEFAULT_TIMEOUT = 60.0  # seconds

#: The HTTP status of each gRPC status (google.rpc's table, but UNIMPLEMENTED is a
#: 404: it means "no such endpoint", i.e. no such path).
HTTP_STATUS: dict[Status, int] = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 400,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 404,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
    Status.UNAUTHENTICATED: 401,
}

_HTTP_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_JSON = "application/json"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies: pass each event on at once
]


def error_body(code: str, message: str) -> bytes:
    """``{"error": {"code": ..., "message": ...}}`` as JSON bytes."""
    return _encode({"error": {"code": code, "message": message}})


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(code, message), status_code=status, media_type=_JSON, headers=headers)


def _from_error(exc: Error) -> Response:
    return _error(HTTP_STATUS.get(exc.status, 500), exc.code, exc.message)


class _TooLarge(Exception):
    pass


def route_path(scope: Scope) -> str:
    """The request's path within the app: ``scope["path"]`` without the ``root_path`` it is mounted at
    (``Mount("/a2a", gateway)`` or a server's ``--root-path``), as the app's routes see it."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return "/"
    return path[len(root):] if path[len(root)] == "/" else path


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``.

    The token is compared in constant time and never logged; a missing or wrong one
    gets 401 with ``WWW-Authenticate: Bearer`` and the JSON error body. The probes
    (:data:`PUBLIC`) and the paths ``public(path)`` accepts are served without it.

    With ``cookie`` (the dashboard's), a login cookie may stand in for the header: the
    cookie :func:`login_cookie` names for the request's port (``micro_token_8080``), holding
    :func:`login_value` of the token (set HttpOnly and SameSite=Strict by the dashboard's
    login form; the derived value is accepted only there, never as a bearer token), and a
    page request (``GET`` asking for HTML) without it is redirected to ``login`` rather than refused.
    """

    def __init__(self, app: ASGIApp, token: str, public: Callable[[str], bool] | None = None, *,
                 cookie: str | None = None, login: str | None = None) -> None:
        if not token:
            raise UsageError("the gateway token is empty: pass a non-empty token, or none to turn auth off")
        self.app = app
        self._token = token.encode()
        self._public = public
        self._cookie = cookie
        self._login_value = login_value(self._token)
        self._login = login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        path = route_path(scope)  # mounted (Mount("/x", gateway)): the path within the app
        if (scope["type"] != "http" or path in PUBLIC or (self._public is not None and self._public(path))
                or self._accepts(scope)):
            await self.app(scope, receive, send)
            return
        if self._login is not None and scope.get("method") == "GET" and self._wants_html(scope):
            rsp: Response = RedirectResponse(f"{root}{self._login}?next={quote(root + path)}", status_code=303)
        else:
            rsp = _error(401, "UNAUTHENTICATED", "this gateway needs an `Authorization: Bearer <token>` header "
                         "with its token", headers={"WWW-Authenticate": "Bearer"})
        await rsp(scope, receive, send)

    def _accepts(self, scope: Scope) -> bool:
        name = login_cookie(scope, self._cookie).encode() if self._cookie is not None else None
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                # compare_digest takes as long for any wrong token of a given length
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token):
                    return True
            elif key == b"cookie" and name is not None:
                kept = _cookie(bytes(value), name)
                if kept is not None and hmac.compare_digest(kept, self._login_value):
                    return True
        return False

    @staticmethod
    def _wants_html(scope: Scope) -> bool:
        return any(key == b"accept" and b"text/html" in value for key, value in scope["headers"])


LOGIN_COOKIE = "micro_token"
_LOGIN_LABEL = b"micro dashboard login cookie v1"


def login_cookie(scope: Scope, prefix: str = LOGIN_COOKIE) -> str:
    """The login cookie's name for this request's port (``micro_token_8080``): cookies ignore ports, so
    without it two servers on one host would overwrite each other's."""
    host = ""
    for key, value in scope.get("headers", ()):
        if key == b"host":
            host = bytes(value).decode("latin-1").strip()
            break
    _, sep, port = host.rpartition(":")
    if not sep or not port.isdigit() or host.endswith("]"):  # no port in Host: the scheme's
        port = "443" if scope.get("scheme") in ("https", "wss") else "80"
    return f"{prefix}_{port}"


def login_value(token: bytes) -> bytes:
    """What the login cookie holds: an HMAC-SHA256 of the token under a fixed label, in hex. Not the token:
    the cookie goes to every server on the host, and :class:`BearerAuth` takes this value only as the cookie."""
    return hmac.new(token, _LOGIN_LABEL, "sha256").hexdigest().encode()


def _dashboard_public(path: str) -> bool:
    """The dashboard's paths served without the token: its login form and its static files."""
    return path == "/login" or path.startswith("/static/")


def _cookie(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a ``Cookie`` header (URL-quoted as the dashboard sets it)."""
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return unquote_to_bytes(value)
    return None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PUBLIC = frozenset({"/health/live", "/health/ready"})
"""Paths served without the token: Kubernetes probes and load balancers carry none (``/metrics`` needs it)."""


def probe_routes(runtime: Runtime) -> list[Route]:
    """``GET /metrics`` (Prometheus text, when :mod:`micro.metrics` is enabled), ``/health/live`` and
    ``/health/ready`` (200 when the runtime's registry and store answer, 503 with the reasons if not)."""
    from micro.server.probes import backends

    async def scrape(request: Request) -> Response:
        if not metrics.enabled():
            return PlainTextResponse("metrics are not enabled: pip install 'micro[metrics]'\n", 404)
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    async def live(request: Request) -> Response:
        return PlainTextResponse("live\n")

    async def ready(request: Request) -> Response:
        problems = await backends(runtime)
        if problems:
            return PlainTextResponse("not ready:\n" + "\n".join(problems) + "\n", 503)
        return PlainTextResponse("ready\n")

    return [Route("/metrics", scrape, methods=["GET"]), Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"])]


class BrowserGuard:
    """ASGI middleware: refuses what a browser sends when a page on another site uses it.

    - A request with an ``Origin`` header that is not one of ``origins`` gets 403: a
      page elsewhere posting to the gateway (cross-site request forgery; a plain
      ``fetch`` with a ``text/plain`` body needs no CORS preflight, so browsers send it).
    - With ``hosts``, a request whose ``Host`` is not one of them gets 403: a hostile
      name re-pointed at this machine's address (DNS rebinding) would otherwise let
      that page read the answers too.

    curl, SDKs and other services send no ``Origin`` and the right ``Host``: they
    pass, and so do the server's own pages (the dashboard's: ``Origin`` is the
    request's own scheme and ``Host``) when ``hosts`` vouches for that ``Host`` (without
    ``hosts`` a re-pointed name would pass as "own"). ``"*"`` in ``origins`` allows every origin.
    With ``dashboard``, a refusal's advice names ``--allow-host`` (what ``micro run`` and
    ``micro dashboard`` have) rather than ``--allow-origin``.
    """

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str] | None = None, origins: Iterable[str] = (),
                 dashboard: bool = False) -> None:
        self.app = app
        # what a refused Origin can do about it: `micro run` and `micro dashboard` have no --allow-origin
        if dashboard:
            self.advice = ("server; its own pages pass when opened by a host name it serves: add one with "
                           "--allow-host (allowed_hosts= in code)")
        else:
            self.advice = "gateway; allow an origin with --allow-origin (allowed_origins= in code)"
        self.hosts = None if hosts is None else frozenset(h.lower().strip("[]") for h in hosts)
        self.origins = frozenset(o.lower().rstrip("/") for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await _error(403, "PERMISSION_DENIED", refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        host = origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = bytes(value).decode("latin-1")
            elif key == b"origin":
                origin = bytes(value).decode("latin-1")
        if self.hosts is not None:
            name = _host_name(host or "")
            if name not in self.hosts:
                return (f"this gateway does not serve the host {name!r} (it serves {', '.join(sorted(self.hosts))}); "
                        "add it with --allow-host (allowed_hosts= in code)")
        if (origin is not None and "*" not in self.origins and origin.lower().rstrip("/") not in self.origins
                and not (self.hosts is not None and self._same_origin(scope, origin, host))):
            return f"cross-origin request from {origin!r} refused: pages on other sites may not call this {self.advice}"
        return None

    @staticmethod
    def _same_origin(scope: Scope, origin: str, host: str | None) -> bool:
        """A page this server served (the dashboard's) posting back to it: its origin is this request's
        scheme and ``Host`` (which the host check has vouched for)."""
        return host is not None and origin.lower().rstrip("/") == f"{scope.get('scheme', 'http')}://{host.lower()}"


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8080`` -> ``::1``, ``Example.com:80`` -> ``example.com``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class EventStream(Response):
    """Server-Sent Events: each item of a call's stream as one ``data:`` event (made by :func:`stream`).

    The stream is consumed by the task that serves the request: a network stream's
    deadline and the call's context variables belong to the task that opened them.
    A child task only watches for the client leaving, and then cancels the pump.
    """

    def __init__(self, first: Any, items: AsyncGenerator[Any, None]) -> None:
        super().__init__(media_type="text/event-stream")
        self._first = first
        self._items = items

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.watch, receive, tg.cancel_scope)
                await self._pump(send)
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            with anyio.CancelScope(shield=True):
                await self._items.aclose()

    async def _pump(self, send: Send) -> None:
        try:
            if self._first is not _END:
                await send(_chunk(b"data: " + _encode(self._first) + b"\n\n"))
                async for item in self._items:
                    await send(_chunk(b"data: " + _encode(item) + b"\n\n"))
        except Error as exc:
            await send(_chunk(b"event: error\ndata: " + error_body(exc.code, exc.message) + b"\n\n"))
        except Exception:
            log.exception("gateway: a stream failed")
            await send(_chunk(b"event: error\ndata: " + error_body("INTERNAL", "the stream failed in the gateway "
                                                                           "(details in its log)") + b"\n\n"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def watch(receive: Receive, scope: anyio.CancelScope) -> None:
        """Until the client leaves (``http.disconnect``); then cancel ``scope``."""
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()


_END = object()
_NO_METADATA: Mapping[str, str] = {}
_GONE = Response(status_code=499)  # the client left before the answer: nobody reads this


_JSON_TYPE = (b"content-type", b"application/json")


async def _send(send: Send, status: int, body: bytes) -> None:
    """A JSON response in two ASGI messages, with nothing built per call but its length."""
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON_TYPE, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


WATCH_AFTER = 0.05
"""Seconds (up to twice that) a call runs before the gateway watches for its client leaving."""


class _Departures:
    """Cancels the calls whose client left, watching only the calls that last.

    Every call in flight is noted (a set insert); a timer ticks every :data:`WATCH_AFTER`
    seconds while there are some, and a call that has seen a whole tick pass gets a small
    task waiting for its ``http.disconnect``, which then cancels it. Most calls end before
    that and cost no task; one whose client leaves is stopped within two ticks of its start
    (or at once, if it runs longer).
    """

    def __init__(self) -> None:
        self._watches: set[_ClientWatch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Receive) -> _ClientWatch:
        task = asyncio.current_task()
        assert task is not None
        w = _ClientWatch(self, task, receive)
        self._watches.add(w)
        if self._timer is None:
            self._timer = task.get_loop().call_later(WATCH_AFTER, self._tick)
        return w

    def _tick(self) -> None:
        self._timer = None
        for w in self._watches:
            if w.aged:
                if w.watcher is None:
                    w.start()
            else:
                w.aged = True
        if self._watches:
            self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick)

    def discard(self, w: _ClientWatch) -> None:
        self._watches.discard(w)
        if not self._watches and self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _until_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ClientWatch:
    """One call watched for its client leaving (``left`` tells; the ``CancelledError`` that caused is
    absorbed at the exit)."""

    __slots__ = ("_closed", "_departures", "_receive", "_task", "aged", "left", "watcher")

    def __init__(self, departures: _Departures, task: asyncio.Task[Any], receive: Receive) -> None:
        self._departures = departures
        self._task = task
        self._receive = receive
        self._closed = False
        self.aged = False
        self.left = False
        self.watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.watcher = self._task.get_loop().create_task(_until_gone(self._receive))
        self.watcher.add_done_callback(self._gone)

    def _gone(self, watcher: asyncio.Task[None]) -> None:
        if watcher.cancelled() or self._closed:
            return
        if watcher.exception() is None:  # the client left (an exception: the server's, not ours to act on)
            self.left = True
            self._task.cancel()

    def __enter__(self) -> _ClientWatch:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> bool:
        self._closed = True
        self._departures.discard(self)
        if self.watcher is not None:
            self.watcher.cancel()
        # the cancel was ours when the client left (and nobody else cancelled this task): absorbed
        return self.left and t is asyncio.CancelledError and self._task.uncancel() == 0


def _chunk(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def stream(runtime: Runtime, service: str, endpoint: str, request: Any, *, timeout: float,
                 metadata: Mapping[str, str] = _NO_METADATA) -> EventStream:
    """Start a server-streaming call and answer with its items as Server-Sent Events.

    The first item is awaited here, so an error before it (a bad request, an unknown
    service) raises :class:`micro.errors.Error` for the caller to answer as a plain error.
    """
    items = runtime.client.stream(service, endpoint, request, timeout=timeout, metadata=metadata)
    assert isinstance(items, AsyncGenerator)
    try:
        first = await anext(items)
    except StopAsyncIteration:
        first = _END
    except BaseException:
        with anyio.CancelScope(shield=True):
            await items.aclose()
        raise
    return EventStream(first, items)


class _Gateway:
    def __init__(self, runtime: Runtime, *, max_body: int, timeout: float, auth: bool) -> None:
        if max_body <= 0:
            raise UsageError(f"max_body must be a positive number of bytes, not {max_body}")
        if timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout}")
        self.runtime = runtime
        self.max_body = max_body
        self.timeout = timeout
        self.auth = auth
        self.departures = _Departures()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.runtime.acquire()
        try:
            yield
        finally:
            await self.runtime.release()

    async def call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /api/{service}/{endpoint}``, as a raw ASGI app (Starlette routes to it: no Request or
        Response objects, no re-encoding of the reply on the way)."""
        params = scope["path_params"]
        service, endpoint = params["service"], params["endpoint"]
        declared = credentials = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"authorization" and credentials is None:
                credentials = value
        try:
            body = await self._body(receive, declared)
        except _TooLarge as exc:
            await _send(send, 413, error_body("RESOURCE_EXHAUSTED", str(exc)))
            return
        if body is None:
            return  # the client left while sending the body: nobody to answer
        if not body.strip():
            body = b"{}"
        try:
            decoded = _decode(body)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            # msgspec raises RecursionError for nesting deeper than the stack, UnicodeDecodeError for non-UTF-8
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            await _send(send, 400, error_body("INVALID_ARGUMENT", f"the request body is not valid JSON: {reason}"))
            return
        if not isinstance(decoded, dict):
            kind = type(decoded).__name__ if decoded is not None else "null"
            await _send(send, 400, error_body("INVALID_ARGUMENT", f"the request body must be a JSON object, "
                                              f"not {kind}"))
            return
        metadata = _NO_METADATA
        if not self.auth and credentials:  # the caller's credentials are the services' to check (TokenAuth)
            metadata = {"authorization": bytes(credentials).decode("latin-1")}
        # the call runs in this task (its deadline and context belong here); once it lasts, a small task
        # watches for the client leaving, and then cancels it: nobody waits for the answer
        with self.departures.watch(receive) as watch:
            answer = await self._answer(service, endpoint, body, metadata)
        if watch.left:
            await _GONE(scope, receive, send)
        elif isinstance(answer, Response):
            await answer(scope, receive, send)  # an event stream (or an error before its first item)
        else:
            await _send(send, *answer)

    async def _answer(self, service: str, endpoint: str, body: bytes,
                      metadata: Mapping[str, str]) -> tuple[int, bytes] | Response:
        """The status and JSON body of the call's answer; a response for a stream."""
        try:
            if await self._streaming(service, endpoint):
                return await self._stream(service, endpoint, body, metadata)
            # the validated bytes go on as they are, and the reply's JSON comes back as the wire carried it
            rsp = await self.runtime.client.call(service, endpoint, body, timeout=self.timeout, metadata=metadata,
                                                 response_type=msgspec.Raw)
            # a client call wrapper (a cache, a fallback) may answer with a value of its own, not the wire's JSON
            return 200, bytes(rsp) if isinstance(rsp, msgspec.Raw) else _encode(rsp)
        except Error as exc:
            return HTTP_STATUS.get(exc.status, 500), error_body(exc.code, exc.message)
        except Exception:
            log.exception("gateway: %s %s failed", service, endpoint)
            return 500, error_body("INTERNAL", "the gateway failed (details in its log)")

    async def _body(self, receive: Receive, declared: bytes | None) -> bytes | None:
        """The request body (``None`` when the client left before it was all sent); ``_TooLarge`` over the
        limit, before the body is read when ``Content-Length`` says so."""
        limit = self.max_body
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _TooLarge(f"the request body of {int(declared)} bytes is over this gateway's {limit}-byte limit")
        message = await receive()
        if message["type"] != "http.request":
            return None
        data: bytes = message.get("body", b"")
        if not message.get("more_body", False):  # the usual case: one message
            if len(data) > limit:
                raise _TooLarge(f"the request body is over this gateway's {limit}-byte limit")
            return data
        buf = bytearray(data)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            buf += message.get("body", b"")
            if len(buf) > limit:
                raise _TooLarge(f"the request body is over this gateway's {limit}-byte limit")
            if not message.get("more_body", False):
                return bytes(buf)

    async def _streaming(self, service: str, endpoint: str) -> bool:
        for record in await self.runtime.client.lookup(service):  # the watched cache: no I/O
            ep = record.endpoint(endpoint)
            if ep is not None:
                return ep.streaming
        return False  # the call names the endpoints the service does have

    async def _stream(self, service: str, endpoint: str, body: bytes, metadata: Mapping[str, str]) -> Response:
        return await stream(self.runtime, service, endpoint, body, timeout=self.timeout, metadata=metadata)

    async def services(self, request: Request) -> Response:
        records = await self.runtime.registry.list()
        return Response(_encode(records), media_type=_JSON)

    async def service(self, request: Request) -> Response:
        try:
            records = await self.runtime.registry.get(request.path_params["service"])
        except Error as exc:
            return _from_error(exc)
        return Response(_encode(records), media_type=_JSON)

    async def openapi(self, request: Request) -> Response:
        records = await self.runtime.registry.list()
        doc = openapi.document(records, bearer=self.auth)
        root = request.scope.get("root_path", "")
        if root:  # mounted under a path: the API's routes are under it too
            doc["servers"] = [{"url": root}]
        return Response(_encode(doc), media_type=_JSON)


class _Asgi:
    """A raw ASGI function as a Starlette route's endpoint (which takes a function for a request handler)."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODE.get(exc.status_code, "UNKNOWN")
    if exc.status_code == 404:
        detail = (f"no route {request.method} {request.url.path}: call POST /api/{{service}}/{{Handler.Method}}, "
                  "or GET /api/services or /openapi.json")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    else:
        detail = f"{exc.detail}: {request.method} {request.url.path}"
    return _error(exc.status_code, code, detail, headers=exc.headers)


def app(runtime: Runtime, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT, allowed_hosts: Iterable[str] | None = None,
        allowed_origins: Iterable[str] = (), dashboard: bool = False) -> Starlette:
    """The gateway as an ASGI app on ``runtime``.

    Args:
        runtime: the runtime whose registry and client the gateway uses.
        token: when given, every request needs ``Authorization: Bearer <token>``; when not,
            the ``Authorization`` header is passed on to the services as call metadata.
        max_body: the largest request body accepted, in bytes (larger: 413).
        timeout: seconds each call may take (then 504); a stream may take as long in all.
        allowed_hosts: the ``Host`` names served (others: 403, against DNS rebinding);
            ``None`` serves any (``micro api`` on loopback passes :data:`LOOPBACK_HOSTS`).
        allowed_origins: browser origins (``https://app.example.com``) allowed to call the
            gateway, with CORS headers for them; a request from any other ``Origin`` gets 403.
        dashboard: also serve the dashboard (:mod:`micro.dashboard`) at ``/``; with ``token``,
            its pages ask for the token once (a login form) and keep it in a cookie.

    Example::

        gateway = app(micro.Runtime(), token=os.environ["MICRO_API_TOKEN"])
    """
    gw = _Gateway(runtime, max_body=max_body, timeout=timeout, auth=token is not None)
    routes: list[BaseRoute] = [
        Route("/api/services", gw.services, methods=["GET"]),
        Route("/api/services/{service}", gw.service, methods=["GET"]),
        Route("/api/{service}/{endpoint}", _Asgi(gw.call), methods=["POST"]),
        Route("/openapi.json", gw.openapi, methods=["GET"]),
        *probe_routes(runtime),
    ]
    board = None
    if dashboard:
        from micro.dashboard.pages import Dashboard

        board = Dashboard(runtime, timeout=timeout, token=token, max_body=max_body)
        routes += board.routes()
    origins = list(allowed_origins)
    middleware = [Middleware(BrowserGuard, hosts=allowed_hosts, origins=origins, dashboard=dashboard)]
    if origins:  # outermost: a CORS preflight carries no token
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                        allow_headers=["authorization", "content-type"]))
    if token is not None and board is not None:
        middleware.append(Middleware(BearerAuth, token=token, public=_dashboard_public, cookie=LOGIN_COOKIE,
                                     login="/login"))
    elif token is not None:
        middleware.append(Middleware(BearerAuth, token=token))
    served = _Served(gw.call, routes=routes, middleware=middleware, lifespan=gw.lifespan,
                     exception_handlers={HTTPException: _http_error})
    served.state.dashboard = board  # `micro run` ends its live streams when it stops
    return served


class _Served(Starlette):
    """The gateway's Starlette app, with a short way in for calls.

    ``POST /api/{service}/{endpoint}`` (the app not mounted under a path) goes through the
    app's own middleware (origin and host checks, CORS, the token) straight to the call
    route's handler, without Starlette's error and exception layers or its routing; every
    other request, and every request to a mounted app, takes Starlette's way to the same routes.
    """

    def __init__(self, call: ASGIApp, **options: Any) -> None:
        super().__init__(**options)
        self._call = call
        self._short: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            if path.startswith("/api/"):
                service, _, endpoint = path[5:].partition("/")
                if service and endpoint and "/" not in endpoint:  # the route's [^/]+ twice
                    scope["app"] = self
                    scope["path_params"] = {"service": service, "endpoint": endpoint}
                    short = self._short
                    if short is None:
                        short = self._short = self._chain()
                    await short(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    def _chain(self) -> ASGIApp:
        app = self._call
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app
