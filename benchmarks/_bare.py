"""The bare framed echo: micro's wire framing with none of its semantics (the Python limit).

The server cuts frames with :class:`micro.wire.frames.FrameReader`, decodes the
JSON request with msgspec, runs the same handler as every other side of
``bench_call`` and writes the reply as one frame, all from ``data_received``
(no task per call, no deadline, no metadata, no middleware, no drain). The client
matches replies to futures by request id. What the native wire adds on top of
this (a task per call, deadlines, cancellation, metadata, statuses, limits) is
what ``native vs bare`` measures.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

import msgspec

from micro.wire import frames as f


class BareServer(asyncio.Protocol):
    """Answers every REQUEST frame at once with ``handle(payload)`` (a synchronous function)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.reader = f.FrameReader(1 << 22)
        self.transport: asyncio.Transport | None = None
        self.greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.greeted:
            self.greeted = True
            data = data[f.PREFACE_SIZE:]
            self.transport.write(f.preface())
        out = []
        pack = f.HEADER.pack
        for _kind, rid, _flags, aux, body, _length in self.reader.feed(data):
            reply = self.handle(body[aux:])
            out.append(pack(len(reply), rid, f.RESPONSE, 0, 0) + reply)
        if out:
            self.transport.write(b"".join(out))


class BareClient(asyncio.Protocol):
    """Sends REQUEST frames, resolves a future per request id."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = f.FrameReader(1 << 22)
        self.calls: dict[int, asyncio.Future[bytes]] = {}
        self.ids = itertools.count(1)
        self.transport: asyncio.Transport | None = None
        self.greeted = False
        self._out: list[bytes] = []
        self._flushing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        transport.write(f.preface())

    def data_received(self, data: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            data = data[f.PREFACE_SIZE:]
        for _kind, rid, _flags, _aux, body, _length in self.reader.feed(data):
            self.calls.pop(rid).set_result(body)

    async def call(self, path: str, payload: bytes) -> bytes:
        rid = next(self.ids)
        fut = self.loop.create_future()
        self.calls[rid] = fut
        self._out.append(f.request(rid, path, None, None, payload, 0))
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        assert self.transport is not None
        self.transport.write(b"".join(out))


def json_handler(handler: Any, request_type: type[Any]) -> Any:
    """``payload -> reply`` around an ``async def`` handler that never awaits (run to its end at once)."""
    decode = msgspec.json.Decoder(request_type).decode
    encode = msgspec.json.Encoder().encode

    def handle(payload: bytes) -> bytes:
        coro = handler(decode(payload))
        try:
            coro.send(None)
        except StopIteration as done:
            return encode(done.value)
        coro.close()
        raise RuntimeError("the bare echo's handler awaited: it must answer at once")

    return handle
