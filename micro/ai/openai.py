"""The ``openai`` provider: any OpenAI-compatible chat-completions server.

Uses the official SDK's ``AsyncOpenAI`` against OpenAI itself or a local server
(Ollama, vLLM, llama.cpp: set ``base_url``). The neutral model maps onto chat
completions like this:

- ``system`` is the first message, ``{"role": "system"}``;
- an assistant ``ToolUseBlock`` becomes an entry of the message's ``tool_calls``
  (arguments as JSON text);
- a ``ToolResultBlock`` becomes a ``{"role": "tool"}`` message; chat completions
  has no error flag, so an ``is_error`` result's content is prefixed ``"Error: "``;
- ``finish_reason`` ``stop``/``tool_calls``/``length``/``content_filter`` become
  ``end_turn``/``tool_use``/``max_tokens``/``refusal``.

Tool-call arguments that are not a JSON object never raise: the block keeps the
raw text (see ``ToolUseBlock.invalid_json``).

Configuration, argument first, then environment:

=============  ======================  ==============================================
option         environment             default
=============  ======================  ==============================================
``api_key``    ``OPENAI_API_KEY``      required for api.openai.com; others get a dummy
``base_url``   ``OPENAI_BASE_URL``     https://api.openai.com/v1
``model``      ``MICRO_OPENAI_MODEL``  ``DEFAULT_MODEL``
=============  ======================  ==============================================
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from micro.errors import ConfigError, Error, Timeout, Unavailable, Unknown

from ._base import Model, api_error, check_offline
from .messages import (
    Block,
    Done,
    Message,
    Response,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolSpec,
    ToolUseBlock,
    ToolUseDelta,
    ToolUseStart,
    Usage,
    parse_tool_input,
)

try:
    import openai
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the openai provider needs the openai SDK: pip install 'micro[openai]'",
                      name=exc.name) from exc

__all__ = ["DEFAULT_MODEL", "OpenAIModel"]

DEFAULT_MODEL = "gpt-5.5"
KEY_ENV = "OPENAI_API_KEY"
OPENAI_URL = "https://api.openai.com/v1"

_STOP = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


class OpenAIModel(Model):
    """Chat models behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Example::

        # Ollama on this machine: no key needed
        model = OpenAIModel("llama3.2", base_url="http://localhost:11434/v1")

    Args:
        model: model id; default ``MICRO_OPENAI_MODEL`` or :data:`DEFAULT_MODEL`.
        api_key: default ``OPENAI_API_KEY``; required only for api.openai.com.
        base_url: default ``OPENAI_BASE_URL`` or the OpenAI API.
        max_tokens: the answer's token limit when a call does not give one (None: the server's).
        timeout: seconds for each HTTP attempt (the SDK's timeout); None keeps the SDK's.
        max_retries: how often the SDK retries a retryable error (429, 5xx, …).
        max_tokens_field: ``"max_completion_tokens"`` (OpenAI's current name, the
            default for api.openai.com) or ``"max_tokens"`` (the default elsewhere).
        stream_usage: ask for token usage at the end of a stream (``stream_options``).
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_tokens_field: Literal["max_completion_tokens", "max_tokens"] | None = None,
        stream_usage: bool = True,
    ) -> None:
        self.model = model or os.environ.get("MICRO_OPENAI_MODEL") or DEFAULT_MODEL
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        official = self.base_url == OPENAI_URL
        api_key = api_key or os.environ.get(KEY_ENV) or None
        if api_key is None:
            if official:
                raise ConfigError(
                    f"the openai provider needs an API key for {OPENAI_URL}: set {KEY_ENV} "
                    f"(export {KEY_ENV}=sk-…) or pass api_key=…; for a local server "
                    "(Ollama, vLLM, llama.cpp) pass base_url= instead"
                )
            api_key = "unused"  # local servers ignore it; the SDK insists on one
        check_offline(self.name, self.base_url)
        self._secret = api_key
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.max_tokens_field = max_tokens_field or ("max_completion_tokens" if official else "max_tokens")
        self.stream_usage = stream_usage
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self.base_url,
            max_retries=max_retries,
            timeout=timeout if timeout is not None else openai.NOT_GIVEN,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"OpenAIModel(model={self.model!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Response:
        check_offline(self.name, self.base_url)
        try:
            completion = await self._client.chat.completions.create(
                **self._request(messages, tools, system, max_tokens),
                timeout=timeout if timeout is not None else openai.NOT_GIVEN,
            )
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        content: list[Block] = []
        finish: str | None = None
        if completion.choices:
            choice = completion.choices[0]
            finish, msg = choice.finish_reason, choice.message
            if msg.content or msg.refusal:
                content.append(TextBlock(msg.content or msg.refusal or ""))
            for call in msg.tool_calls or ():
                if call.type == "function":
                    fn = call.function
                    content.append(ToolUseBlock(call.id, fn.name, parse_tool_input(fn.arguments)))
            if msg.refusal and not msg.content:
                finish = "content_filter"
        # Compatible servers differ in what they fill in: read optional-in-practice fields defensively.
        answered = getattr(completion, "model", None) or self.model
        return Response(content, _stop_reason(finish, content), _usage(getattr(completion, "usage", None)), answered)

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        check_offline(self.name, self.base_url)
        text: list[str] = []
        calls: dict[object, _Call] = {}
        model, finish, usage = self.model, None, Usage()
        extra: dict[str, Any] = {}
        if self.stream_usage:
            extra["stream_options"] = {"include_usage": True}
        try:
            chunks = await self._client.chat.completions.create(
                **self._request(messages, tools, system, max_tokens),
                **extra,
                stream=True,
                timeout=timeout if timeout is not None else openai.NOT_GIVEN,
            )
            async with chunks:
                async for chunk in chunks:
                    model = getattr(chunk, "model", None) or model
                    if getattr(chunk, "usage", None) is not None:
                        usage = _usage(chunk.usage)
                    for choice in getattr(chunk, "choices", None) or ():
                        if getattr(choice, "index", 0) != 0:
                            continue
                        finish = choice.finish_reason or finish
                        delta = choice.delta
                        if delta.content:
                            text.append(delta.content)
                            yield TextDelta(delta.content)
                        for position, tc in enumerate(delta.tool_calls or ()):
                            # Some servers omit the index; fall back to the id, then the order.
                            key = getattr(tc, "index", None)
                            key = key if key is not None else tc.id or len(calls) + position
                            call = calls.setdefault(key, _Call(len(calls)))
                            call.id = call.id or tc.id or ""
                            fn = tc.function
                            if fn is not None and fn.name and not call.name:
                                call.name = fn.name
                            if not call.started and call.name:
                                call.started = True
                                call.id = call.id or f"call_{call.order}"
                                yield ToolUseStart(call.id, call.name)
                            if fn is not None and fn.arguments:
                                call.args.append(fn.arguments)
                                if call.started:
                                    yield ToolUseDelta(call.id, fn.arguments)
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        content: list[Block] = [TextBlock("".join(text))] if text else []
        for call in sorted(calls.values(), key=lambda c: c.order):
            call_id = call.id or f"call_{call.order}"
            content.append(ToolUseBlock(call_id, call.name, parse_tool_input("".join(call.args))))
        yield Done(Response(content, _stop_reason(finish, content), usage, model))

    # --- translation ---------------------------------------------------------

    def _request(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        system: str | None,
        max_tokens: int | None,
    ) -> dict[str, Any]:
        req: dict[str, Any] = {"model": self.model, "messages": _messages(messages, system)}
        limit = max_tokens or self.max_tokens
        if limit:
            req[self.max_tokens_field] = limit
        if tools:
            req["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    },
                }
                for t in tools
            ]
        return req

    def _error(self, exc: openai.OpenAIError) -> Error:
        err: Error
        if isinstance(exc, openai.APITimeoutError):
            err = Timeout(
                f"openai: no answer from {self.base_url} in time "
                f"(the SDK retried up to {self.max_retries} times). Retry later or raise timeout."
            )
        elif isinstance(exc, openai.APIConnectionError):
            err = Unavailable(
                f"openai: cannot reach {self.base_url}: {exc} "
                f"(the SDK retried up to {self.max_retries} times). "
                "Is the server running? Check base_url / OPENAI_BASE_URL."
            )
        elif isinstance(exc, openai.APIError):
            status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
            err = api_error(
                "openai",
                status=status,
                kind=exc.type if isinstance(exc.type, str) else None,
                detail=_detail(exc) + (f" [request-id {rid}]" if (rid := getattr(exc, "request_id", None)) else ""),
                key_env=KEY_ENV,
                model=self.model,
                retries=self.max_retries,
            )
        else:
            err = Unknown(f"openai: {type(exc).__name__}: {exc}")
        if self._secret and self._secret != "unused" and self._secret in err.message:
            err = type(err)(err.message.replace(self._secret, "***"))
        return err


class _Call:
    """A tool call being assembled from stream deltas."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.id = ""
        self.name = ""
        self.args: list[str] = []
        self.started = False


def _messages(messages: Sequence[Message], system: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": json.dumps(b.input)},
                }
                for b in m.content
                if isinstance(b, ToolUseBlock)
            ]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        # Tool messages must directly follow the assistant turn that asked for them.
        for b in m.content:
            if not isinstance(b, TextBlock | ToolUseBlock):
                body = f"Error: {b.content}" if b.is_error else b.content
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": body})
        if text:
            out.append({"role": "user", "content": text})
    return out


def _detail(exc: openai.APIError) -> str:
    # The SDK's message is "Error code: 400 - {...}"; the body's own message reads better.
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) and message else exc.message


def _stop_reason(finish: str | None, content: list[Block]) -> str:
    # Some servers (Ollama) say "stop" even when the turn calls tools.
    if any(isinstance(b, ToolUseBlock) for b in content):
        return "tool_use"
    return _STOP.get(finish or "stop", finish or "end_turn")


def _usage(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    return Usage((u.prompt_tokens or 0) - cached, u.completion_tokens or 0, cached, 0)
