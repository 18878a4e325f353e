"""The ``anthropic`` provider: Claude through the official SDK's ``AsyncAnthropic``.

Translates the neutral message model to the Messages API and back. The system
prompt and the last tool definition carry ``cache_control: ephemeral``, so a
multi-step agent run pays for its prompt and tool list once. Retries are the
SDK's own (``max_retries``; it retries 408/409/429/5xx/529 and connection
errors, never a 400). SDK errors become ``micro.errors`` at this boundary, with
messages that say what to do; the API key never appears in a message or repr.

Configuration, argument first, then environment:

=============  ==========================================  =======================
option         environment                                 default
=============  ==========================================  =======================
``api_key``    ``ANTHROPIC_API_KEY`` (or                   required
               ``ANTHROPIC_AUTH_TOKEN``)
``base_url``   ``ANTHROPIC_BASE_URL``                      https://api.anthropic.com
``model``      ``MICRO_ANTHROPIC_MODEL``                   ``DEFAULT_MODEL``
=============  ==========================================  =======================
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

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
    import anthropic
    from anthropic.types import (
        MessageParam,
        TextBlockParam,
        ToolParam,
        ToolResultBlockParam,
        ToolUseBlockParam,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the anthropic provider needs the anthropic SDK: pip install 'micro[anthropic]'",
                      name=exc.name) from exc

# The SDK's HTTP client (httpx2 in current SDKs, httpx before): its errors escape
# while a stream is read, so they are translated here too.
try:
    import httpx2 as _http
except ImportError:  # pragma: no cover - older SDKs
    import httpx as _http  # type: ignore[no-redef]

__all__ = ["DEFAULT_MODEL", "AnthropicModel"]

DEFAULT_MODEL = "claude-sonnet-5-5"
KEY_ENV = "ANTHROPIC_API_KEY"
_EPHEMERAL: Any = {"type": "ephemeral"}


class AnthropicModel(Model):
    """Claude models through the Anthropic Messages API.

    Example::

        async with AnthropicModel(max_tokens=2048) as model:   # reads ANTHROPIC_API_KEY
            rsp = await model.generate([Message.user("Hi")], system="Be brief.")

    Args:
        model: model id; default ``MICRO_ANTHROPIC_MODEL`` or :data:`DEFAULT_MODEL`.
        api_key: default ``ANTHROPIC_API_KEY``; without any key this raises ConfigError.
        base_url: default ``ANTHROPIC_BASE_URL`` or the public API.
        max_tokens: the answer's token limit when a call does not give one.
        timeout: seconds for each HTTP attempt (the SDK's timeout); None keeps the SDK's.
        max_retries: how often the SDK retries a retryable error (429, 5xx, 529, …).
        cache: mark the system prompt and the tool list for prompt caching.
    """

    name = "anthropic"

    def __init__(
        self,
        model: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = 4096,
        timeout: float | None = None,
        max_retries: int = 2,
        cache: bool = True,
    ) -> None:
        self.model = model or os.environ.get("MICRO_ANTHROPIC_MODEL") or DEFAULT_MODEL
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.cache = cache
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
        auth_token = None
        if api_key is None:
            api_key = os.environ.get(KEY_ENV) or None
            auth_token = None if api_key else os.environ.get("ANTHROPIC_AUTH_TOKEN") or None
        if not api_key and not auth_token:
            raise ConfigError(
                f"the anthropic provider needs an API key: set {KEY_ENV} "
                f"(export {KEY_ENV}=sk-ant-…) or pass api_key=…; "
                "for a run without a key use the scripted provider"
            )
        check_offline(self.name, self.base_url)
        self._secret = api_key or auth_token or ""
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            auth_token=auth_token,
            base_url=self.base_url,
            max_retries=max_retries,
            timeout=timeout if timeout is not None else anthropic.NOT_GIVEN,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"AnthropicModel(model={self.model!r}, base_url={self.base_url!r})"

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
            msg = await self._client.messages.create(
                **self._request(messages, tools, system, max_tokens),
                timeout=timeout if timeout is not None else anthropic.NOT_GIVEN,
            )
        except ValueError as exc:  # raised by the SDK before sending, e.g. max_tokens too high
            raise ConfigError(f"anthropic: {exc} (or call stream() instead)") from None
        except anthropic.AnthropicError as exc:
            raise self._error(exc) from None
        content: list[Block] = []
        for block in msg.content:
            if block.type == "text":
                content.append(TextBlock(block.text))
            elif block.type == "tool_use":
                content.append(ToolUseBlock(block.id, block.name, _tool_input(block.input)))
        return Response(content, msg.stop_reason or "end_turn", _usage(msg.usage), msg.model)

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        # The SDK's raw event stream, not its MessageStream helper: the helper
        # raises on tool JSON that does not parse, and we want to keep it instead.
        check_offline(self.name, self.base_url)
        blocks: dict[int, _Partial] = {}
        model, stop_reason, usage = self.model, "end_turn", Usage()
        try:
            events = await self._client.messages.create(
                **self._request(messages, tools, system, max_tokens),
                stream=True,
                timeout=timeout if timeout is not None else anthropic.NOT_GIVEN,
            )
            async with events:
                async for event in events:
                    if event.type == "message_start":
                        model, usage = event.message.model, _usage(event.message.usage)
                    elif event.type == "content_block_start":
                        cb = event.content_block
                        if cb.type == "text":
                            blocks[event.index] = _Partial(text=[cb.text])
                            if cb.text:
                                yield TextDelta(cb.text)
                        elif cb.type == "tool_use":
                            blocks[event.index] = _Partial(tool=(cb.id, cb.name), start=cb.input)
                            yield ToolUseStart(cb.id, cb.name)
                    elif event.type == "content_block_delta":
                        part, delta = blocks.get(event.index), event.delta
                        if part is None:
                            continue
                        if delta.type == "text_delta":
                            part.text.append(delta.text)
                            yield TextDelta(delta.text)
                        elif delta.type == "input_json_delta" and part.tool:
                            part.json.append(delta.partial_json)
                            yield ToolUseDelta(part.tool[0], delta.partial_json)
                    elif event.type == "message_delta":
                        stop_reason = event.delta.stop_reason or stop_reason
                        # Totals so far; fields the delta leaves out keep their message_start value.
                        u = event.usage
                        usage = Usage(
                            getattr(u, "input_tokens", None) or usage.input_tokens,
                            u.output_tokens or usage.output_tokens,
                            getattr(u, "cache_read_input_tokens", None) or usage.cache_read_tokens,
                            getattr(u, "cache_creation_input_tokens", None) or usage.cache_write_tokens,
                        )
        except anthropic.AnthropicError as exc:
            raise self._error(exc) from None
        except _http.TimeoutException:  # the SDK does not wrap errors while reading a stream
            raise Timeout(
                f"anthropic: the stream from {self.base_url} stalled past the timeout "
                "(not retried mid-stream). Retry, or raise timeout."
            ) from None
        except _http.TransportError as exc:
            raise Unavailable(
                f"anthropic: the stream from {self.base_url} broke: {exc!r} (not retried mid-stream). Retry later."
            ) from None
        content = [blocks[i].block() for i in sorted(blocks)]
        yield Done(Response(content, stop_reason, usage, model))

    # --- translation ---------------------------------------------------------

    def _request(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        system: str | None,
        max_tokens: int | None,
    ) -> dict[str, Any]:
        req: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens or self.max_tokens,
            "messages": [_message(m) for m in messages],
        }
        if system:
            sys_block: TextBlockParam = {"type": "text", "text": system}
            if self.cache:
                sys_block["cache_control"] = _EPHEMERAL
            req["system"] = [sys_block]
        if tools:
            specs: list[ToolParam] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in tools
            ]
            if self.cache:
                specs[-1]["cache_control"] = _EPHEMERAL
            req["tools"] = specs
        return req

    def _error(self, exc: anthropic.AnthropicError) -> Error:
        err: Error
        if isinstance(exc, anthropic.APITimeoutError):
            err = Timeout(
                f"anthropic: no answer from {self.base_url} in time "
                f"(the SDK retried up to {self.max_retries} times). Retry later or raise timeout."
            )
        elif isinstance(exc, anthropic.APIConnectionError):
            err = Unavailable(
                f"anthropic: cannot reach {self.base_url}: {exc} "
                f"(the SDK retried up to {self.max_retries} times). "
                "Check the network and ANTHROPIC_BASE_URL."
            )
        elif isinstance(exc, anthropic.APIStatusError):
            kind, detail = _error_body(exc)
            if request_id := getattr(exc, "request_id", None):
                detail = f"{detail} [request-id {request_id}]"
            err = api_error(
                "anthropic",
                status=exc.status_code,
                kind=kind,
                detail=detail,
                key_env=KEY_ENV,
                model=self.model,
                retries=self.max_retries,
            )
        else:
            err = Unknown(f"anthropic: {type(exc).__name__}: {exc}")
        if self._secret and self._secret in err.message:  # belt and braces: never echo the key
            err = type(err)(err.message.replace(self._secret, "***"))
        return err


class _Partial:
    """A content block being assembled from stream deltas."""

    def __init__(
        self,
        *,
        text: list[str] | None = None,
        tool: tuple[str, str] | None = None,
        start: object = None,
    ) -> None:
        self.text = text if text is not None else []
        self.tool = tool
        self.start = start
        self.json: list[str] = []

    def block(self) -> Block:
        if self.tool is None:
            return TextBlock("".join(self.text))
        raw = "".join(self.json)
        value = parse_tool_input(raw) if raw else _tool_input(self.start)
        return ToolUseBlock(self.tool[0], self.tool[1], value)


def _message(m: Message) -> MessageParam:
    content: list[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam] = []
    for b in m.content:
        if isinstance(b, TextBlock):
            if b.text:  # the API rejects empty text blocks
                content.append({"type": "text", "text": b.text})
        elif isinstance(b, ToolUseBlock):
            content.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
        else:
            result: ToolResultBlockParam = {
                "type": "tool_result",
                "tool_use_id": b.tool_use_id,
                "content": b.content,
            }
            if b.is_error:
                result["is_error"] = True
            content.append(result)
    if m.role == "user":
        return {"role": "user", "content": content}
    return {"role": "assistant", "content": content}


def _error_body(exc: anthropic.APIStatusError) -> tuple[str | None, str]:
    """The error type and message from an API error body (``{"error": {"type", "message"}}``)."""
    body = exc.body
    inner = body.get("error") if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        return None, exc.message
    kind, message = inner.get("type"), inner.get("message")
    return (kind if isinstance(kind, str) else None), (message if isinstance(message, str) else exc.message)


def _tool_input(value: object) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return parse_tool_input(json.dumps(value)) if value is not None else {}


def _usage(u: Any) -> Usage:
    return Usage(
        u.input_tokens or 0,
        u.output_tokens or 0,
        u.cache_read_input_tokens or 0,
        u.cache_creation_input_tokens or 0,
    )
