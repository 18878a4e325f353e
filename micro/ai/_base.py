"""The ``Model`` interface and the table that turns a provider name into one.

A provider is a :class:`Model` subclass with two coroutines: ``generate`` (one
turn) and ``stream`` (the same turn as events, ending with ``Done``). The base
class gives ``stream`` a default built on ``generate`` and makes every model an
async context manager with an idempotent ``aclose``. Constructing a model does
no I/O.

:func:`from_provider` looks a name up in ``PROVIDERS`` and then in the
``micro.ai`` entry-point group, so a package can add a provider::

    [project.entry-points."micro.ai"]
    mistral = "micro_mistral:MistralModel"

Setting ``MICRO_AI_OFFLINE=1`` makes every network provider refuse a base URL
that is not loopback (tests set it, so no test can reach a real API).
"""

from __future__ import annotations

import abc
import inspect
import ipaddress
import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from micro import backends
from micro.errors import (
    BadRequest,
    ConfigError,
    Error,
    PermissionDenied,
    ResourceExhausted,
    Timeout,
    Unauthenticated,
    Unavailable,
    Unknown,
)

from .messages import Done, Message, Response, StreamEvent, TextDelta, ToolSpec, ToolUseStart

__all__ = [
    "OFFLINE_ENV",
    "PROVIDERS",
    "Model",
    "api_error",
    "check_offline",
    "from_provider",
    "known_providers",
]

OFFLINE_ENV = "MICRO_AI_OFFLINE"

PROVIDERS: dict[str, str] = {
    "anthropic": "micro.ai.anthropic:AnthropicModel",
    "openai": "micro.ai.openai:OpenAIModel",
    "scripted": "micro.ai.scripted:ScriptedModel",
}


class Model(abc.ABC):
    """A chat model behind one provider.

    Example::

        async with from_provider("anthropic") as model:
            rsp = await model.generate([Message.user("Hi")], system="Be brief.")
            print(rsp.text, rsp.usage)
    """

    name: str
    """The provider, e.g. ``"anthropic"``."""
    model: str
    """The model id, e.g. ``"claude-sonnet-5-5"``."""

    @abc.abstractmethod
    async def generate(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Run one model turn.

        ``timeout`` bounds each HTTP attempt (the SDK's timeout); for a deadline
        over the whole call, retries included, wrap it in ``asyncio.timeout``.
        Raises a ``micro.errors.Error`` (``Unauthenticated``, ``BadRequest``,
        ``ResourceExhausted``, ``Unavailable``, ``Timeout``, …) whose message
        says what to do.
        """

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Run one model turn, yielding events as they arrive; the last one is ``Done``.

        Break out early through ``contextlib.aclosing(model.stream(...))`` so
        the connection is released at once. This default is for providers that
        cannot stream: it yields the whole answer after ``generate`` returns.
        """
        rsp = await self.generate(messages, tools=tools, system=system, max_tokens=max_tokens, timeout=timeout)
        if rsp.text:
            yield TextDelta(rsp.text)
        for call in rsp.tool_uses:
            yield ToolUseStart(call.id, call.name)
        yield Done(rsp)

    async def aclose(self) -> None:  # noqa: B027 - a model without resources has nothing to close
        """Release the provider's connections. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.name!r}, model={self.model!r})"


def from_provider(
    provider: str | Model,
    *,
    model: str | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    **options: Any,
) -> Model:
    """The model for a provider name, e.g. ``"anthropic"``, ``"openai:llama3.2"``, ``"scripted"``.

    ``"name:model"`` is short for ``model=``. A :class:`Model` is returned as is.
    ``options`` go to the provider's constructor (e.g. ``max_tokens``, ``timeout``).

    Example::

        model = from_provider("openai", model="llama3.2", base_url="http://localhost:11434/v1")

    Raises:
        ConfigError: unknown provider (the message lists the known ones), an
            option the provider does not take, or a missing API key.
    """
    if isinstance(provider, Model):
        if model or api_key or base_url or options:
            raise ConfigError(f"{provider!r} is already built: pass options to its constructor")
        return provider
    name, _, suffix = provider.partition(":")
    model = model or suffix or None
    factory = _lookup(name)
    given = {"model": model, "api_key": api_key, "base_url": base_url}
    kwargs = {k: v for k, v in given.items() if v is not None} | options
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"provider {name!r} does not take these options: {exc}") from None
    built = factory(**kwargs)
    if not isinstance(built, Model):
        raise ConfigError(f"provider {name!r} built {built!r}, which is not a micro.ai.Model")
    return built


def known_providers() -> list[str]:
    """Every provider name: the built-in table and the ``micro.ai`` entry points."""
    return backends.known("ai", PROVIDERS)


def _lookup(name: str) -> Any:
    found = backends.load("ai", PROVIDERS, name, where=f"provider {name!r}")
    if found is not None:
        return found
    raise ConfigError(
        f"unknown model provider {name!r}: known providers are {', '.join(known_providers())} "
        "(a package can add one through the 'micro.ai' entry-point group)"
    )


def check_offline(provider: str, base_url: str) -> None:
    """Refuse a non-loopback ``base_url`` while ``MICRO_AI_OFFLINE`` is set (the test guard)."""
    if os.environ.get(OFFLINE_ENV, "").lower() not in ("1", "true", "yes"):
        return
    host = urlsplit(base_url).hostname or ""
    if host == "localhost" or _is_loopback_ip(host):
        return
    raise ConfigError(
        f"{OFFLINE_ENV} is set: the {provider} provider refuses to call {base_url} (not loopback). "
        "Use the scripted provider or a local fake server, or unset "
        f"{OFFLINE_ENV} to allow real model requests."
    )


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Error types both providers put in error bodies, for errors that arrive inside a
# 200 stream (an SSE ``error`` event) and so carry no useful HTTP status.
_KIND_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def api_error(
    provider: str,
    *,
    status: int | None,
    kind: str | None,
    detail: str,
    key_env: str,
    model: str,
    retries: int,
) -> Error:
    """The micro error for a provider's HTTP error, with a message that says what to do.

    ``status`` is the HTTP status (None or 200 for an error inside a stream, then
    ``kind``, the body's error type, decides); ``retries`` is the SDK's
    ``max_retries``, named in messages about errors the SDK retries.
    """
    retried = f"(the SDK retried up to {retries} times)"
    if status in (None, 200):
        status = _KIND_STATUS.get(kind or "", 500)
        retried = "(it failed mid-stream, so the SDK did not retry)"
    what = f"{provider} answered {status}" + (f" {kind}" if kind else "") + f": {detail}"
    if status == 401:
        return Unauthenticated(f"{what}. The API key was rejected: set a valid {key_env}.")
    if status in (402, 403):
        return PermissionDenied(f"{what}. Check the key's permissions, plan and billing.")
    if status == 404:
        return BadRequest(f"{what}. Check the model id ({model!r}) and the base URL.")
    if status in (408, 504):
        return Timeout(f"{what} {retried}. Retry later, or raise the timeout.")
    if status == 413:
        return ResourceExhausted(f"{what}. The request is too large: send less history or output.")
    if status == 429:
        return ResourceExhausted(
            f"{what} {retried}. Rate limited: lower concurrency, retry later or raise max_retries."
        )
    if 400 <= status < 500:
        return BadRequest(f"{what}. Not retried: the request itself is wrong; fix it.")
    if status >= 500:
        return Unavailable(
            f"{what} {retried}. The provider is overloaded or failing: retry later or raise max_retries."
        )
    return Unknown(what)
