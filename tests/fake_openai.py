"""A local HTTP server speaking OpenAI chat completions, for tests.

The real ``openai`` SDK talks to it through ``base_url``, the way it would talk
to Ollama, vLLM or llama.cpp. Each test scripts the replies, one per request,
and reads back what the server received::

    async with FakeOpenAI() as api:
        api.reply(completion(content="Hi", tool_calls=[tool_call("call_1", "get", {"id": 1})]))
        model = OpenAIModel("gpt-fake", api_key="test-key", base_url=api.base_url)

A ``completion`` answers a plain request with JSON and a ``"stream": true``
request with ``data:`` chunks (content split into word deltas, each tool call's
arguments into several pieces, a usage chunk when ``stream_options`` asks for
it, then ``[DONE]``). ``hold=`` pauses a stream after its first delta until the
test sets the event. ``error`` answers with an OpenAI error body. With no reply
left the server answers 500 with ``x-should-retry: false``.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fake_anthropic import LoopbackServer, Received
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["Completion", "FakeOpenAI", "completion", "error", "tool_call"]


@dataclass
class Completion:
    """A scripted chat completion (JSON or a chunk stream, as the request asks)."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    usage: dict[str, Any]
    hold: anyio.Event | None = None


@dataclass
class Error:
    """A scripted API error."""

    status: int
    kind: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)


def tool_call(id: str, name: str, args: dict[str, Any] | None = None, *, raw: str | None = None) -> dict[str, Any]:
    """A function tool call; ``raw`` sends exactly this (maybe invalid) arguments text."""
    arguments = raw if raw is not None else json.dumps(args or {})
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def completion(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    hold: anyio.Event | None = None,
) -> Completion:
    """An assistant reply; ``finish_reason`` defaults to tool_calls when it calls tools."""
    calls = tool_calls or []
    finish = finish_reason or ("tool_calls" if calls else "stop")
    usage = usage or {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    return Completion(content, calls, finish, usage, hold)


def error(status: int, kind: str | None = None, text: str | None = None) -> Error:
    """An API error; retryable ones carry ``retry-after-ms: 1`` so SDK retries are instant."""
    kind = kind or {
        400: "invalid_request_error",
        401: "invalid_api_key",
        429: "rate_limit_exceeded",
    }.get(status, "server_error")
    return Error(status, kind, text or f"fake {kind}", {"retry-after-ms": "1"})


class FakeOpenAI:
    """OpenAI chat completions on loopback: ``POST /v1/chat/completions``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._replies: deque[Completion | Error] = deque()
        app = Starlette(routes=[Route("/v1/chat/completions", self._complete, methods=["POST"])])
        self._server = LoopbackServer(app)

    @property
    def base_url(self) -> str:
        """The URL to give the SDK, ``…/v1`` (valid once the server is entered)."""
        return f"{self._server.url}/v1"

    def reply(self, *replies: Completion | Error) -> None:
        """Queue replies; each request takes the next one."""
        self._replies.extend(replies)

    @property
    def pending(self) -> int:
        return len(self._replies)

    async def __aenter__(self) -> FakeOpenAI:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.aclose()

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(Received(request.method, request.url.path, dict(request.headers), body))
        if not self._replies:
            text = f"fake openai: no scripted reply for request {len(self.requests)}"
            return _error_response(Error(500, "server_error", text, {"x-should-retry": "false"}))
        reply = self._replies.popleft()
        if isinstance(reply, Error):
            return _error_response(reply)
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(self._chunks(reply, body, usage), media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "gpt-fake"),
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                "usage": reply.usage,
            }
        )

    async def _chunks(self, reply: Completion, body: dict[str, Any], usage: bool) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model", "gpt-fake"),
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        for word in _words(reply.content or ""):
            deltas.append({"content": word})
        for index, call in enumerate(reply.tool_calls):
            fn = call["function"]
            opening = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            deltas.append({"tool_calls": [opening]})
            for piece in _thirds(fn["arguments"]):
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        for n, delta in enumerate(deltas):
            yield chunk(delta)
            if n == 1 and reply.hold is not None:
                await reply.hold.wait()
        yield chunk({}, reply.finish_reason)
        if usage:
            yield chunk(None, usage=reply.usage)
        yield b"data: [DONE]\n\n"


def _error_response(err: Error) -> JSONResponse:
    payload = {"error": {"message": err.text, "type": err.kind, "param": None, "code": err.kind}}
    return JSONResponse(payload, status_code=err.status, headers=err.headers)


def _words(value: str) -> list[str]:
    return re.findall(r"\s*\S+\s*", value)


def _thirds(raw: str) -> list[str]:
    step = max(1, len(raw) // 3 + 1)
    return [raw[i : i + step] for i in range(0, len(raw), step)]
