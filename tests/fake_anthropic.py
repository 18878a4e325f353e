"""A local HTTP server speaking the Anthropic Messages API, for tests.

The real ``anthropic`` SDK talks to it through ``base_url``, so the ``anthropic``
provider runs end to end over loopback HTTP. Each test scripts the replies,
one per request, and reads back what the server received::

    async with FakeAnthropic() as api:
        api.reply(error(429), message(text("Hi")))
        model = AnthropicModel(api_key="test-key", base_url=api.base_url)
        ...
        assert api.requests[-1].body["system"][0]["cache_control"] == {"type": "ephemeral"}

A ``message`` reply answers a plain request with JSON and a ``"stream": true``
request with server-sent events (text split into word deltas, tool input into
several ``input_json_delta`` pieces). ``hold=`` pauses a stream after its first
delta until the test sets the event, which proves deltas reach the caller while
the model is still "speaking". ``error`` answers with an API error body
(429 / 500 / 529 overloaded / 400 …); ``stream_error`` starts a stream and then
sends an ``error`` event. With no reply left the server answers 500 with
``x-should-retry: false`` and says so.

:class:`LoopbackServer` (uvicorn in a task of the test's event loop, on a socket
bound before it starts, so no readiness polling) is shared with ``fake_openai``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

__all__ = [
    "FakeAnthropic",
    "LoopbackServer",
    "Received",
    "error",
    "message",
    "stream_error",
    "text",
    "tool_use",
]


# --- the server runner (shared with fake_openai) ----------------------------


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Leave SIGINT/SIGTERM to pytest: this server lives inside a test.
        yield


class LoopbackServer:
    """An ASGI app served by uvicorn on 127.0.0.1, inside the current event loop."""

    def __init__(self, app: ASGIApp) -> None:
        self.port = 0
        config = uvicorn.Config(app, log_level="warning", lifespan="off", http="h11", ws="none", access_log=False)
        config.timeout_graceful_shutdown = 1
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind a free port and serve; returns at once (no readiness polling needed)."""
        # Listening before uvicorn runs: a client that connects early waits in
        # the backlog until the server accepts it. uvicorn closes the socket.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        self._server.force_exit = True  # do not wait for idle keep-alive connections
        task, self._task = self._task, None
        await task


# --- scripted replies ---------------------------------------------------------


@dataclass
class Received:
    """One request the fake server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Message:
    """A scripted assistant message (JSON or SSE, whichever the request asks for)."""

    blocks: list[dict[str, Any]]
    stop_reason: str
    usage: dict[str, int]
    model: str | None = None
    hold: anyio.Event | None = None


@dataclass
class Error:
    """A scripted API error."""

    status: int
    kind: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamError:
    """A stream that starts and then fails with an SSE ``error`` event."""

    kind: str
    text: str


Reply = Message | Error | StreamError


def text(value: str) -> dict[str, Any]:
    """A text content block."""
    return {"type": "text", "text": value}


def tool_use(id: str, name: str, input: dict[str, Any] | None = None, *, raw: str | None = None) -> dict[str, Any]:
    """A tool_use block; ``raw`` streams exactly this (maybe invalid) JSON text instead."""
    block = {"type": "tool_use", "id": id, "name": name, "input": input or {}}
    if raw is not None:
        block["_raw"] = raw
    return block


def message(
    *blocks: dict[str, Any],
    stop_reason: str | None = None,
    usage: dict[str, int] | None = None,
    model: str | None = None,
    hold: anyio.Event | None = None,
) -> Message:
    """An assistant message; ``stop_reason`` defaults to tool_use when a block calls a tool."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return Message(list(blocks), stop_reason, usage or {"input_tokens": 10, "output_tokens": 5}, model, hold)


_DEFAULT_TEXT = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error(status: int, kind: str | None = None, text: str | None = None) -> Error:
    """An API error reply; retryable ones carry ``retry-after-ms: 1`` so SDK retries are instant."""
    kind = kind or _DEFAULT_TEXT.get(status, "api_error")
    return Error(status, kind, text or f"fake {kind}", {"retry-after-ms": "1"})


def stream_error(kind: str = "overloaded_error", text: str = "Overloaded") -> StreamError:
    """A stream that fails after ``message_start`` (answered as JSON error when not streaming)."""
    return StreamError(kind, text)


# --- the fake API ---------------------------------------------------------------


class FakeAnthropic:
    """The Anthropic Messages API on loopback: ``POST /v1/messages``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._replies: deque[Reply] = deque()
        app = Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"])])
        self._server = LoopbackServer(app)

    @property
    def base_url(self) -> str:
        """The URL to give the SDK (valid once the server is entered)."""
        return self._server.url

    def reply(self, *replies: Reply) -> None:
        """Queue replies; each request takes the next one."""
        self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """Replies not used yet."""
        return len(self._replies)

    async def __aenter__(self) -> FakeAnthropic:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.aclose()

    async def _messages(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(Received(request.method, request.url.path, dict(request.headers), body))
        if not self._replies:
            return _error_response(
                Error(
                    500,
                    "api_error",
                    f"fake anthropic: no scripted reply for request {len(self.requests)}",
                    {"x-should-retry": "false"},
                )
            )
        reply = self._replies.popleft()
        if isinstance(reply, Error):
            return _error_response(reply)
        streaming = bool(body.get("stream"))
        if isinstance(reply, StreamError):
            if not streaming:
                return _error_response(Error(500, reply.kind, reply.text, {"x-should-retry": "false"}))
            return _sse(self._failing_stream(reply, body))
        if streaming:
            return _sse(self._stream(reply, body))
        return JSONResponse(_message_json(reply, body))

    async def _stream(self, reply: Message, body: dict[str, Any]) -> AsyncIterator[bytes]:
        start = _message_json(reply, body) | {"content": [], "stop_reason": None}
        start["usage"] = {**reply.usage, "output_tokens": 1}
        yield _event("message_start", {"type": "message_start", "message": start})
        yield _event("ping", {"type": "ping"})
        held = False
        for index, block in enumerate(reply.blocks):
            if block["type"] == "text":
                opening = {"type": "text", "text": ""}
                pieces = [{"type": "text_delta", "text": p} for p in _words(block["text"])]
            else:
                opening = {
                    "type": "tool_use",
                    "id": block["id"],
                    "name": block["name"],
                    "input": {},
                }
                raw = block.get("_raw", json.dumps(block["input"]))
                pieces = [{"type": "input_json_delta", "partial_json": p} for p in _thirds(raw)]
            yield _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
            for piece in pieces:
                yield _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": piece},
                )
                if reply.hold is not None and not held:
                    held = True
                    await reply.hold.wait()
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        delta = {"stop_reason": reply.stop_reason, "stop_sequence": None}
        yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": reply.usage})
        yield _event("message_stop", {"type": "message_stop"})

    async def _failing_stream(self, reply: StreamError, body: dict[str, Any]) -> AsyncIterator[bytes]:
        start = _message_json(message(), body) | {"content": [], "stop_reason": None}
        yield _event("message_start", {"type": "message_start", "message": start})
        yield _event("error", {"type": "error", "error": {"type": reply.kind, "message": reply.text}})


def _message_json(reply: Message, body: dict[str, Any]) -> dict[str, Any]:
    blocks = [{k: v for k, v in b.items() if k != "_raw"} for b in reply.blocks]
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": reply.model or body.get("model", "claude-fake"),
        "content": blocks,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": reply.usage,
    }


def _error_response(err: Error) -> JSONResponse:
    payload = {"type": "error", "error": {"type": err.kind, "message": err.text}}
    return JSONResponse(payload, status_code=err.status, headers={"request-id": "req_fake", **err.headers})


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _words(value: str) -> list[str]:
    return re.findall(r"\s*\S+\s*", value) or [value]


def _thirds(raw: str) -> list[str]:
    step = max(1, len(raw) // 3 + 1)
    return [raw[i : i + step] for i in range(0, len(raw), step)] or [""]
