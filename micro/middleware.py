"""Middleware: plain async wrappers around handlers (server side) and calls (client side).

A wrapper takes the next function and returns a new one, like go-micro's
``HandlerWrapper`` and ``CallWrapper``::

    def log_calls(next: Next) -> Next:
        async def wrapped(req: Request) -> Any:
            log.info("-> %s %s", req.service, req.endpoint)
            return await next(req)
        return wrapped

    micro.New("task", handler_wrappers=[log_calls])

The same chain runs on the in-process fast path and on the network path. For a
streaming endpoint, ``next(req)`` returns the async iterator of responses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Request:
    """One call as middleware sees it.

    On the server side ``body`` is the decoded request; on the client side it is
    what the caller passed (an instance, a dict or JSON).
    """

    service: str
    endpoint: str
    body: Any
    metadata: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    streaming: bool = False
    response_type: Any = None
    wire: str = ""
    """Client side: what carried the call, set by the client as it sends (``in-process``, ``grpc`` or
    ``native``; empty if it was refused before that). A wrapper reads it after ``await next(req)``."""


Next = Callable[[Request], Awaitable[Any]]
Wrapper = Callable[[Next], Next]


def chain(wrappers: Sequence[Wrapper], inner: Next) -> Next:
    """``wrappers[0]`` outermost, ``inner`` last."""
    fn = inner
    for w in reversed(wrappers):
        fn = w(fn)
    return fn
