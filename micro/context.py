"""The context of the call being handled: its deadline and metadata.

A handler runs with the deadline and metadata of the request that reached it;
``client.call`` made from inside the handler inherits the remaining time, so a
tool call inside an agent run inside an RPC never outlives its caller.
Deadlines are absolute event-loop times (``loop.time()``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping
from types import MappingProxyType

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("micro_deadline", default=None)
_metadata: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "micro_metadata", default=MappingProxyType({})
)


def deadline() -> float | None:
    """The absolute deadline (``loop.time()``) of the call being handled, if any."""
    return _deadline.get()


def time_remaining() -> float | None:
    """Seconds left before the current call's deadline, if it has one."""
    d = _deadline.get()
    return None if d is None else d - asyncio.get_running_loop().time()


def metadata() -> Mapping[str, str]:
    """The metadata of the call being handled (empty outside a handler)."""
    return _metadata.get()


def effective_deadline(timeout: float | None) -> float | None:
    """The earlier of ``now + timeout`` and the inherited deadline."""
    inherited = _deadline.get()
    if timeout is None:
        return inherited
    own = asyncio.get_running_loop().time() + timeout
    return own if inherited is None else min(own, inherited)


def enter(deadline: float | None, metadata: Mapping[str, str]) -> tuple[
    contextvars.Token[float | None], contextvars.Token[Mapping[str, str]]
]:
    """Set the handler context; give the tokens back to :func:`leave`."""
    return _deadline.set(deadline), _metadata.set(metadata)


def leave(tokens: tuple[contextvars.Token[float | None], contextvars.Token[Mapping[str, str]]]) -> None:
    _deadline.reset(tokens[0])
    _metadata.reset(tokens[1])
