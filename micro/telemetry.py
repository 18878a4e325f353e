"""OpenTelemetry tracing (optional: ``pip install 'micro[otel]'``).

Off unless enabled, so the call path pays nothing by default::

    from opentelemetry.sdk.trace import TracerProvider
    micro.telemetry.enable(TracerProvider(...))      # before creating runtimes and services

Then every RPC gets a CLIENT span and a SERVER span (on both paths), broker
publishes and deliveries get PRODUCER / CONSUMER spans, agent runs, model calls
and tool calls get spans named after the GenAI semantic conventions
(``invoke_agent``, ``chat``, ``execute_tool``), and flow runs get a span per
event. Trace context travels in gRPC metadata and broker headers as W3C
``traceparent``, so one trace follows a chat through a tool into the services it
calls. Prompts and replies are recorded only with ``record_content=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from micro.middleware import Next, Request

_tracer: Any = None
_record_content = False


def enable(tracer_provider: Any = None, *, record_content: bool = False) -> None:
    """Turn tracing on, with this provider (default: the global one)."""
    global _tracer, _record_content
    try:
        from opentelemetry import trace
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("tracing needs OpenTelemetry: pip install 'micro[otel]'") from exc
    provider = tracer_provider or trace.get_tracer_provider()
    _tracer = provider.get_tracer("micro")
    _record_content = record_content


def disable() -> None:
    """Turn tracing off (spans already open finish normally)."""
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def record_content() -> bool:
    """Whether prompts, replies and tool arguments may go into spans."""
    return _record_content


@contextlib.contextmanager
def span(name: str, kind: str = "internal", attributes: Mapping[str, Any] | None = None,
         parent: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A span when tracing is on (``parent``: carrier to continue a remote trace), else nothing."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    ctx = propagate.extract(dict(parent)) if parent else None
    span_kind = getattr(trace.SpanKind, kind.upper())
    with _tracer.start_as_current_span(name, context=ctx, kind=span_kind,
                                       attributes=dict(attributes or {})) as s:
        yield s


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into a carrier (metadata, headers)."""
    if _tracer is None:
        return
    from opentelemetry import propagate

    propagate.inject(carrier)


def call_wrapper(next: Next) -> Next:
    """Client middleware: a CLIENT span per call; its context goes out in the metadata."""
    if _tracer is None:
        return next

    async def traced(req: Request) -> Any:
        service, _, method = req.endpoint.rpartition(".")
        attrs = {"rpc.system": "grpc", "rpc.service": f"{req.service}.{service}", "rpc.method": method}
        with span(f"{req.service}/{req.endpoint}", "client", attrs):
            carrier = dict(req.metadata)
            inject(carrier)
            req.metadata = carrier
            return await next(req)

    return traced


def handler_wrapper(next: Next) -> Next:
    """Server middleware: a SERVER span per call, continuing the caller's trace."""
    if _tracer is None:
        return next

    async def traced(req: Request) -> Any:
        service, _, method = req.endpoint.rpartition(".")
        attrs = {"rpc.system": "grpc", "rpc.service": f"{req.service}.{service}", "rpc.method": method}
        with span(f"{req.service}/{req.endpoint}", "server", attrs, parent=req.metadata):
            return await next(req)

    return traced
