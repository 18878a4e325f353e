"""Handler introspection: the public ``async def`` methods of a handler become endpoints.

``class Task: async def ListOverdue(self, req: Req) -> Rsp`` is the endpoint
``Task.ListOverdue`` at the gRPC path ``/{package}.Task/ListOverdue``, where the
package is the protobuf package of proto-first types and the service name for
msgspec types (gRPC clients built from the derived ``.proto`` call it under its
package name, where ``-`` and what else a package cannot hold become ``_``; the
server answers both). A method that returns ``AsyncIterator[Rsp]`` (an ``async def`` with ``yield``) is a
server-streaming endpoint. The docstring is its description: it
reaches models as the tool description.

:class:`Endpoint` also holds the one place where a request is handled, shared by
the in-process fast path and the gRPC server, so both have the same semantics.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from micro import context, metrics
from micro.codec import JSON, PROTO, ProtoCodec, TypeCodec, codec_for
from micro.errors import Error, Internal, UsageError
from micro.middleware import Next, Request, Wrapper, chain
from micro.registry import Endpoint as EndpointRecord
from micro.resource import aclose

log = logging.getLogger("micro.service")
_FOLD_AT = metrics.FOLD_AT  # a constant, copied to save a lookup per call (metrics._Rpc folds at the same count)

_STREAM_ORIGINS = {
    collections.abc.AsyncIterator,
    collections.abc.AsyncGenerator,
    collections.abc.AsyncIterable,
}


@dataclass(slots=True, eq=False)
class Endpoint:
    """One endpoint of a running service."""

    service: str
    name: str
    path: str
    func: Any
    request: TypeCodec
    response: TypeCodec
    streaming: bool
    description: str
    idempotent: bool = False
    invoke: Next = field(init=False)
    _direct: bool = field(init=False, default=True)  # no wrapper took part: handle() calls func itself

    _metrics: dict[str, Any] = field(init=False, default_factory=dict)  # transport -> its metrics child
    _metrics_of: object = field(init=False, default=None)  # the metric set they belong to

    def __post_init__(self) -> None:
        self.invoke = self._call

    def _child(self, transport: str) -> Any:
        if self._metrics_of is not metrics.SET:
            self._metrics, self._metrics_of = {}, metrics.SET
        child = self._metrics[transport] = metrics.rpc("server", self.service, self.name, transport)
        return child

    @property
    def where(self) -> str:
        return f"{self.service} {self.name}"

    @property
    def wires(self) -> tuple[str, ...]:
        if PROTO in self.request.wires and PROTO in self.response.wires:
            return (PROTO, JSON)
        return (JSON,)

    def wrap(self, wrappers: Sequence[Wrapper]) -> None:
        inner = self._call
        self.invoke = chain(wrappers, inner)
        self._direct = self.invoke is inner  # every wrapper passed (telemetry off, no limiter): none to run

    async def _call(self, req: Request) -> Any:
        return self.func(req.body) if self.streaming else await self.func(req.body)

    def record(self) -> EndpointRecord:
        return EndpointRecord(
            name=self.name,
            path=self.path,
            request=self.request.schema(),
            response=self.response.schema(),
            description=self.description,
            streaming=self.streaming,
            wires=list(self.wires),
            metadata={"idempotent": "true"} if self.idempotent else {},
        )

    async def handle(self, body: Any, metadata: Mapping[str, str], deadline: float | None,
                     transport: str = metrics.IN_PROCESS) -> Any:
        """Run the handler chain for a decoded request; the response as the declared type.

        micro errors pass through with their status; any other exception is logged
        here and becomes ``Internal`` (no traceback leaves the service). ``transport``
        (``in-process``, ``grpc`` or ``native``) labels the call's metrics.
        """
        child = None
        if metrics.ON:
            child = self._metrics.get(transport) if self._metrics_of is metrics.SET else None
            if child is None:
                child = self._child(transport)
            child.in_flight += 1
            start = perf_counter()
        code = "CANCELLED"  # unless it ends otherwise
        tokens = context.enter(deadline, metadata)
        try:
            if not self._direct:
                result = await self.invoke(Request(self.service, self.name, body, metadata, deadline, self.streaming))
            elif self.streaming:
                result = self.func(body)
            else:
                result = await self.func(body)  # no Request for nobody to see, no coroutine of ours between
            if self.streaming:
                code = "OK"
                return self._checked_stream(result, deadline, metadata)
            checked = self.check_response(result)
            code = "OK"
            return checked
        except Error as err:
            code = err.status.name
            raise
        except Exception as exc:
            code = "INTERNAL"
            log.exception("%s raised", self.where)
            raise Internal(f"{self.where} failed with an internal error (details in the service log)") from exc
        finally:
            context.leave(tokens)
            if child is not None:
                if code == "OK":  # the common case: child.done(code, seconds) inlined (one append)
                    child.in_flight -= 1
                    pending = child.pending
                    pending.append(perf_counter() - start)
                    if len(pending) >= _FOLD_AT:
                        child.fold()
                else:
                    child.done(code, perf_counter() - start)

    def check_response(self, result: Any) -> Any:
        if type(result) is self.response.type:
            return result
        try:
            return self.response.convert(result, f"{self.where} response")
        except Error as exc:
            raise Internal(
                f"{self.where} returned {type(result).__name__}, not {self.response.type.__name__}"
            ) from exc

    async def _checked_stream(
        self, it: AsyncIterator[Any], deadline: float | None, metadata: Mapping[str, str]
    ) -> AsyncIterator[Any]:
        # the generator body runs as the consumer iterates: it gets the call's context for each step,
        # and the consumer has its own back between items (entered across a yield, the call's deadline
        # stayed in the consumer's task after an early stop, and its later calls timed out at once)
        try:
            while True:
                tokens = context.enter(deadline, metadata)
                try:
                    item = await anext(it)
                except StopAsyncIteration:
                    return
                except Error:
                    raise
                except Exception as exc:
                    log.exception("%s raised while streaming", self.where)
                    raise Internal(f"{self.where} failed with an internal error (details in the service log)") from exc
                finally:
                    context.leave(tokens)
                yield self.check_response(item)
        finally:  # a consumer that stops early ends the handler's generator now, in the call's context
            tokens = context.enter(deadline, metadata)
            try:
                await aclose(it)
            finally:
                context.leave(tokens)


def endpoints_of(handler: object, service: str, *, name: str | None = None) -> list[Endpoint]:
    """The endpoints of a handler object; ``UsageError`` naming the method when one is malformed."""
    if isinstance(handler, type):
        raise UsageError(
            f"handle() takes a handler instance, not the class {handler.__name__}: "
            f"handle({handler.__name__}())"
        )
    hname = name or type(handler).__name__
    found: list[Endpoint] = []
    for attr in sorted(dir(type(handler))):
        if attr.startswith("_"):
            continue
        func = getattr(type(handler), attr)
        streaming = inspect.isasyncgenfunction(func)
        if not (streaming or inspect.iscoroutinefunction(func)):
            continue
        found.append(_endpoint(handler, hname, attr, func, streaming, service))
    if not found:
        raise UsageError(
            f"{hname} has no endpoints: give it public `async def Method(self, req: Req) -> Rsp` methods"
        )
    packages = {ep.path.split("/")[1].rsplit(".", 1)[0] for ep in found}
    if len(packages) > 1:
        raise UsageError(f"{hname} mixes protobuf packages {sorted(packages)}: one handler, one package")
    return found


def _endpoint(handler: object, hname: str, attr: str, func: Any, streaming: bool, service: str) -> Endpoint:
    where = f"{hname}.{attr}"
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise UsageError(f"{where}: cannot resolve its annotations ({exc})") from None
    params = [p for p in inspect.signature(func).parameters.values()][1:]
    if len(params) != 1 or params[0].name not in hints:
        raise UsageError(f"{where} must take exactly one annotated request argument: (self, req: Req)")
    req_t = hints[params[0].name]
    rsp_t = hints.get("return")
    if rsp_t is None:
        raise UsageError(f"{where} needs a return annotation (-> Rsp, or -> AsyncIterator[Rsp] to stream)")
    origin = typing.get_origin(rsp_t)
    if origin in _STREAM_ORIGINS:
        if not streaming:
            raise UsageError(f"{where} is annotated as streaming: make it an async generator (use yield)")
        rsp_t = typing.get_args(rsp_t)[0]
    elif streaming:
        raise UsageError(f"{where} yields: annotate it -> AsyncIterator[{getattr(rsp_t, '__name__', rsp_t)}]")
    req_c, rsp_c = codec_for(req_t), codec_for(rsp_t)
    package = req_c.package if isinstance(req_c, ProtoCodec) else service
    doc = inspect.getdoc(func) or ""
    return Endpoint(
        service=service,
        name=f"{hname}.{attr}",
        path=f"/{package}.{hname}/{attr}",
        func=getattr(handler, attr),
        request=req_c,
        response=rsp_c,
        streaming=streaming,
        description=doc,
        idempotent=bool(getattr(func, IDEMPOTENT, False)),
    )


IDEMPOTENT = "__micro_idempotent__"


def idempotent(method: Any) -> Any:
    """Mark an endpoint safe to call again: clients retry it on UNAVAILABLE, with backoff.

    Example::

        class Task:
            @micro.idempotent
            async def Get(self, req: GetRequest) -> TaskResponse: ...
    """
    setattr(method, IDEMPOTENT, True)
    return method
