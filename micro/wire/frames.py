"""The frames of micro's native wire, and the parser that cuts a byte stream into them.

Every frame is a 12-byte header and a body (``docs/wire.md`` is the specification)::

    length u32 | request id u32 | kind u8 | flags u8 | aux u16 | body (length bytes)

``aux`` is the length of a REQUEST's head (the path, timeout and metadata, msgpack)
at the start of its body, and the number of items a CREDIT grants; 0 otherwise.
The parser holds no more than one frame's bytes: a frame whose payload is over the
limit is reported from its header (and a request's head) and its payload skipped
as it arrives, never buffered. Anything it cannot read is a :class:`ProtocolError`,
after which the connection is closed.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

VERSION: Final = 1
"""The wire version this code speaks (the handshake names it)."""

MAGIC: Final = b"MICROW"
PREFACE: Final = struct.Struct(">6sH")  # magic, version: sent first by each side
PREFACE_SIZE: Final = PREFACE.size

HEADER: Final = struct.Struct(">IIBBH")
HEADER_SIZE: Final = HEADER.size

# kinds
REQUEST: Final = 1   # client -> server: aux = head length; body = head + payload
RESPONSE: Final = 2  # server -> client: the unary reply's payload
ITEM: Final = 3      # server -> client: one stream item's payload
END: Final = 4       # server -> client: the stream ended well (empty body)
ERROR: Final = 5     # server -> client: the call failed; body = msgpack [status, message]; id 0: the connection
CANCEL: Final = 6    # client -> server: stop the call (empty body)
CREDIT: Final = 7    # client -> server: aux = more stream items the client will take
PING: Final = 8      # either way: answer with PONG, same body (at most 8 bytes)
PONG: Final = 9
GOAWAY: Final = 10   # server -> client: draining, start no new calls on this connection
KINDS: Final = frozenset(range(REQUEST, GOAWAY + 1))
NAMES: Final = {REQUEST: "REQUEST", RESPONSE: "RESPONSE", ITEM: "ITEM", END: "END", ERROR: "ERROR",
                CANCEL: "CANCEL", CREDIT: "CREDIT", PING: "PING", PONG: "PONG", GOAWAY: "GOAWAY"}

# flags of a REQUEST
PROTO: Final = 0x01   # the payloads are protobuf (else msgspec JSON)
STREAM: Final = 0x02  # a server-streaming call
# flag the parser sets on a frame whose payload was over the limit (never sent)
OVERSIZE: Final = 0x80

MAX_HEAD: Final = 0xFFFF
STREAM_WINDOW: Final = 16  # items a stream may have unread before the server waits for CREDIT

Frame = tuple[int, int, int, int, bytes, int]
"""``(kind, request id, flags, aux, body, length)``: for an OVERSIZE frame ``body`` is the head only."""

_head_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(tuple[str, int | None, dict[str, str] | None])
_error_decoder = msgspec.msgpack.Decoder(tuple[int, str])


class ProtocolError(Exception):
    """The peer sent bytes that are not micro's wire: the connection is closed with this message."""


def preface(version: int = VERSION) -> bytes:
    return PREFACE.pack(MAGIC, version)


def read_preface(data: bytes) -> int:
    """The version named by a peer's first 8 bytes; ``ProtocolError`` when they are not micro's wire."""
    magic, version = PREFACE.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"not micro's native wire (it starts {data[:8]!r}, not {MAGIC!r}): "
                            "is this a gRPC or HTTP port?")
    return int(version)


def frame(kind: int, rid: int, body: bytes = b"", flags: int = 0, aux: int = 0) -> bytes:
    return HEADER.pack(len(body), rid, kind, flags, aux) + body


def request(rid: int, path: str, timeout_us: int | None, metadata: dict[str, str] | None,
            payload: bytes, flags: int) -> bytes:
    """A REQUEST frame; ``ValueError`` when its head (path and metadata) is over 64 KiB."""
    head = _head_encoder.encode((path, timeout_us, metadata or None))
    if len(head) > MAX_HEAD:
        raise ValueError(f"the call's path and metadata take {len(head)} bytes, over the wire's {MAX_HEAD}")
    return HEADER.pack(len(head) + len(payload), rid, REQUEST, flags, len(head)) + head + payload


def read_head(head: bytes) -> tuple[str, int | None, dict[str, str] | None]:
    """The path, timeout (µs) and metadata of a REQUEST; ``msgspec.DecodeError`` (``ValidationError``
    included) or ``UnicodeDecodeError`` when the head is not one."""
    return _head_decoder.decode(head)


def error(rid: int, status: int, message: str) -> bytes:
    return frame(ERROR, rid, _head_encoder.encode((status, message)))


def read_error(body: bytes) -> tuple[int, str]:
    """The status and message of an ERROR body (``(2, …)`` UNKNOWN when it does not decode)."""
    try:
        return _error_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 2, f"an error frame that does not decode ({len(body)} bytes)"


class FrameReader:
    """Cuts a byte stream into frames; ``limit`` bounds each payload (a REQUEST's head is bounded apart).

    ``feed(data)`` returns the frames that are complete. A frame whose payload is
    over ``limit`` comes back with the ``OVERSIZE`` flag and only its head (for a
    REQUEST) as the body; its payload is skipped without being kept.
    """

    __slots__ = ("_buf", "_skip", "frames", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skip = 0
        self.frames = 0
        """Frames cut so far (with the frames dropped): names the one whose bytes are held."""

    def pending(self) -> tuple[int, int, int, int] | None:
        """``(kind, request id, flags, size)`` of the incomplete frame whose bytes are held, once its
        header has arrived: ``size`` is what holding it whole takes (for a payload over the limit,
        only its head is kept)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        length, rid, kind, flags, aux = HEADER.unpack_from(buf, 0)
        head = aux if kind == REQUEST else 0
        return kind, rid, flags, HEADER_SIZE + (head if length - head > self.limit else length)

    def drop(self) -> None:
        """Skip the rest of the incomplete frame as it arrives, keeping none of it."""
        buf = self._buf
        if len(buf) >= HEADER_SIZE:
            self._skip = HEADER_SIZE + HEADER.unpack_from(buf, 0)[0] - len(buf)
            self.frames += 1
        buf.clear()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (a peer that stops mid-frame leaves some)."""
        return len(self._buf) + self._skip

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if not data:
            return out
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        pos = 0
        end = len(src)
        unpack = HEADER.unpack_from
        limit = self.limit
        while end - pos >= HEADER_SIZE:
            length, rid, kind, flags, aux = unpack(src, pos)
            if kind not in KINDS:
                raise ProtocolError(f"unknown frame kind {kind} (request id {rid}): this peer speaks wire "
                                    f"version {VERSION}, which has kinds 1-{GOAWAY}")
            if flags & OVERSIZE:
                raise ProtocolError(f"frame flag 0x80 is reserved (request id {rid})")
            head = aux if kind == REQUEST else 0
            if head > length:
                raise ProtocolError(f"a {NAMES[kind]} frame's head of {head} bytes is longer than its "
                                    f"body of {length} (request id {rid})")
            start = pos + HEADER_SIZE
            if length - head > limit:
                if end - start < head:
                    break
                out.append((kind, rid, flags | OVERSIZE, aux, bytes(src[start:start + head]), length))
                have = end - start - head
                skip = length - head
                if have >= skip:
                    pos = start + length
                    continue
                self._skip = skip - have
                pos = end
                break
            stop = start + length
            if stop > end:
                break
            out.append((kind, rid, flags, aux, bytes(src[start:stop]), length))
            pos = stop
        if src is buf:
            del buf[:pos]
        elif pos < end:
            buf += src[pos:]
        self.frames += len(out)
        return out
