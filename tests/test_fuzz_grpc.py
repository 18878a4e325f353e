"""Fuzzing the gRPC wire: raw request bodies over a real grpclib channel to a running service.

One service serves a proto-first handler (tests/proto/greeter.proto: protobuf and JSON on
one port), a code-first msgspec handler (protobuf from its derived .proto, and JSON) and
a JSON-only one, with a 16 KiB message limit. Hypothesis sends
random bytes, hand-built protobuf fields (bad wire types, overlong varints, lengths that lie,
field number 0, nested garbage), truncated and bit-flipped valid messages, malformed JSON,
JSON of the wrong types, deeply nested JSON, oversize messages (requests and responses),
raw HTTP/2 DATA that is not a well-formed gRPC frame, unknown paths and the wrong wire; and
any Python value (lone surrogates, huge integers) through micro's own client, which encodes it.
Each case is read off three draws (kind, seed, a number): see test_fuzz_kit.Seed.

The property: every call ends, with a reply or with INVALID_ARGUMENT, RESOURCE_EXHAUSTED or
UNIMPLEMENTED and a message that says what was wrong; nothing is logged at ERROR (no handler
crashed); valid requests under the limit succeed with the right answer; and afterwards the
service still answers a valid call from micro's own client.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest, Person, Tone
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from hypothesis import strategies as st
from test_fuzz_kit import CASES, ErrorLog, Host, Seed, deep, error_log, fuzz, json_from, mutate

import micro
from micro.codec import PROTO, codec_for
from micro.errors import Error
from micro.registry.memory import MemoryRegistry
from micro.server.grpc import RawCodec

pytestmark = pytest.mark.fuzz

LIMIT = 16 * 1024  # the service's max_message_size

HELLO = "/greeter.Greeter/SayHello"
MANY = "/greeter.Greeter/SayMany"
ECHO = "/fuzz.Echo/Echo"
ECHO_STREAM = "/fuzz.Echo/Stream"
LOOSE = "/fuzz.Loose/Take"  # a request type with no protobuf form: JSON only
PATHS = [HELLO, MANY, ECHO, ECHO_STREAM]
STREAMING = {MANY, ECHO_STREAM}


# -- the service under test --------------------------------------------------------------------


class Mode(enum.Enum):
    A = "a"
    B = "b"


class Owner(msgspec.Struct):
    name: str
    age: int = 0


class EchoReq(msgspec.Struct):
    name: str
    count: int = 0
    ratio: float = 0.0
    tags: list[str] = []
    owner: Owner | None = None
    mode: Mode = Mode.A
    kind: Literal["x", "y"] = "x"
    extra: dict[str, Any] = {}
    repeat: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    when: dt.datetime | None = None


class EchoRsp(msgspec.Struct):
    name: str
    count: int
    tags: int
    blob: str


def echo_reply(req: EchoReq) -> EchoRsp:
    return EchoRsp(req.name[:40], req.count, len(req.tags), "x" * req.repeat)


class Echo:
    async def Echo(self, req: EchoReq) -> EchoRsp:
        """Echo a summary of the request (`repeat` makes the reply as large as asked)."""
        return echo_reply(req)

    async def Stream(self, req: EchoReq) -> AsyncIterator[EchoRsp]:
        """Up to three summaries."""
        for i in range(min(req.count, 3)):
            yield EchoRsp(req.name[:40], i, len(req.tags), "")


class Loose:
    async def Take(self, req: dict[str, int]) -> EchoRsp:
        """Count the keys."""
        return EchoRsp("loose", len(req), 0, "")


def hello_reply(req: HelloRequest) -> HelloReply:
    sender = f"{req.sender.name[:10]}/{req.sender.age}" if req.sender else "-"
    return HelloReply(message=f"{req.name[:40]} {sender} {len(req.tags)} {len(req.counts)}", index=req.times)


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """Answer with a summary of the request."""
        return hello_reply(req)

    async def SayMany(self, req: HelloRequest) -> AsyncIterator[HelloReply]:
        """Up to three replies."""
        for i in range(min(req.times, 3)):
            yield HelloReply(message=req.name[:40], index=i)


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    wire: str  # "proto" | "json"
    path: str
    body: bytes
    framed: bool = True  # False: `body` is sent as the raw DATA of the stream, no gRPC framing
    expect: Any = None  # for a valid request: the reply (or replies) it must get
    expect_status: Status | None = None  # for a request with a known outcome: that status
    value: Any = None  # with `client`: the Python value micro's own client sends (it encodes it)
    client: bool = False


@dataclass
class Outcome:
    replies: list[bytes]
    status: Status = Status.OK
    message: str = ""
    errors: list[str] = field(default_factory=list)  # log records at ERROR while it ran


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def proto_from(seed: bytes) -> bytes:
    """Protobuf-looking bytes, read off a seed: fields of any number (mostly HelloRequest's) and
    any wire type, overlong varints, lengths that lie, payloads cut short, nested garbage."""
    out = bytearray()
    i = 0

    def take(n: int) -> bytes:
        nonlocal i
        chunk = seed[i : i + n]
        i += n
        return chunk

    def byte() -> int:
        return (take(1) or b"\x00")[0]

    while i < len(seed):
        b = byte()
        number = b % 8 if b < 240 else int.from_bytes(take(4), "little") % 2**29
        wire = byte() % 8
        out += varint(number << 3 | wire)
        if wire == 0:
            n = byte()
            out += b"\xff" * 11 if n == 255 else varint(int.from_bytes(take(n % 11), "little"))
        elif wire == 1:
            out += take(8)
        elif wire == 5:
            out += take(4)
        elif wire == 2:
            n = byte()
            payload = take(n % 24)
            if n & 0x80:
                payload = proto_from(payload)  # a nested message (Person, a map entry) of garbage
            declared = len(payload) if n & 0x40 == 0 else int.from_bytes(take(4), "little")
            out += varint(declared) + payload
        else:
            out += take(byte() % 4)
    return bytes(out)


HELLO_FIELDS = ["name", "times", "tone", "sender", "tags", "counts"]
ECHO_FIELDS = ["name", "count", "ratio", "tags", "owner", "mode", "kind", "extra", "repeat", "when"]
MUTATIONS = ["truncate", "flip", "insert", "append"]
BAD_PATHS = ["/greeter.Greeter/SayGoodbye", "/fuzz.Echo/Nope", "/", "/x/y/z", "/greeter.Greeter/", "/fuzz.Echo"]
PATH_CHARS = "abcdefghijklmnopqrstuvwxyzABC0123456789._/-"


def signed(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True) if data else 0


def hello_from(seed: Seed, times: int) -> HelloRequest:
    sender = Person(seed.text(6), signed(seed.take(4))) if seed.byte() % 2 else None
    return HelloRequest(
        name=seed.text(10), times=times, tone=seed.pick(list(Tone)), sender=sender,
        tags=[seed.text(6) for _ in range(seed.byte() % 3)],
        counts={seed.text(4): signed(seed.take(8)) for _ in range(seed.byte() % 3)},
    )


def hello_json(req: HelloRequest, tone_as: str, counts_as: str) -> dict[str, Any]:
    tone = {"name": Tone.betterproto_value_to_renamed_proto_names()[req.tone], "int": int(req.tone)}[tone_as]
    body: dict[str, Any] = {"name": req.name, "times": req.times, "tone": tone, "tags": req.tags,
                            "counts": {k: (str(v) if counts_as == "str" else v) for k, v in req.counts.items()}}
    if req.sender is not None:
        body["sender"] = {"name": req.sender.name, "age": req.sender.age}
    return body


def _echo(seed: Seed, count: int, path: str) -> Case:
    owner = Owner(seed.text(6), signed(seed.take(4))) if seed.byte() % 2 else None
    req = EchoReq(seed.text(10), count, signed(seed.take(2)) / 7, [seed.text(6) for _ in range(seed.byte() % 3)],
                  owner, seed.pick(list(Mode)), seed.pick(["x", "y"]),
                  repeat=int.from_bytes(seed.take(2), "little") % (2 * LIMIT), extra=json_from(seed, obj=True))
    body = msgspec.json.encode(req)
    if len(body) > LIMIT:
        return Case("json", path, body, expect_status=Status.RESOURCE_EXHAUSTED)
    if path == ECHO:
        rsp = echo_reply(req)
        if len(msgspec.json.encode(rsp)) > LIMIT:  # the reply is over the limit
            return Case("json", path, body, expect_status=Status.RESOURCE_EXHAUSTED)
        return Case("json", path, body, expect=[rsp])
    replies = [EchoRsp(req.name[:40], i, len(req.tags), "") for i in range(min(req.count, 3))]
    return Case("json", path, body, expect=replies)


def _oversize(wire: str, size: int) -> Case:
    req = HelloRequest(name="n" * size, times=1)
    body = bytes(req) if wire == "proto" else msgspec.json.encode({"name": req.name, "times": 1})
    if len(body) > LIMIT:
        return Case(wire, HELLO, body, expect_status=Status.RESOURCE_EXHAUSTED)
    return Case(wire, HELLO, body, expect=_hello_expect(req, HELLO))


def _raw_frame(wire: str, path: str, seed: Seed, number: int, how: int) -> Case:
    """DATA that is not (quite) a gRPC frame: a compressed flag, a length that lies, cut short."""
    flag = (0, 0, 1, 2, 255)[how % 5]
    payload = seed.take(seed.byte() % 41)
    declared = (len(payload), number & 0xFFFFFFFF, max(0, len(payload) + number % 9 - 4))[how // 5 % 3]
    prefix = struct.pack(">BI", flag, declared)
    cut = seed.byte()
    data = (prefix + payload, (prefix + payload)[:cut], prefix[: cut % 5])[how // 15 % 3]
    return Case(wire, path, data, framed=False)


KINDS = ["valid_proto", "valid_json", "echo", "oversize", "random_bytes", "proto_fields", "mutated_proto",
         "json_value", "json_object", "json_text", "json_mutated", "json_deep", "raw_frame", "bad_path", "client"]


def make_case(selector: int, data: bytes, number: int) -> Case:
    """One case, read off three draws: which kind (and variant), a seed, and a number (an int32 field,
    a size, a nesting depth, a length a frame claims)."""
    kind, sub = KINDS[selector % len(KINDS)], selector // len(KINDS)
    seed = Seed(data)
    path, hello_path, wire = PATHS[sub % 4], (HELLO, MANY)[sub % 2], ("proto", "json")[sub // 4 % 2]
    if kind == "valid_proto":
        req = hello_from(seed, number)
        return Case("proto", hello_path, bytes(req), expect=_hello_expect(req, hello_path))
    if kind == "valid_json":
        req = hello_from(seed, number)
        body = hello_json(req, ("name", "int")[sub // 2 % 2], ("int", "str")[sub // 4 % 2])
        return Case("json", hello_path, msgspec.json.encode(body), expect=_hello_expect(req, hello_path))
    if kind == "echo":
        return _echo(seed, number, (ECHO, ECHO_STREAM)[sub % 2])
    if kind == "oversize":
        return _oversize(wire, LIMIT - 64 + number % 128 if sub % 2 else abs(number) % (4 * LIMIT))
    if kind == "random_bytes":
        return Case(wire, path, data)
    if kind == "proto_fields":
        return Case("proto", hello_path, proto_from(data))
    if kind in ("mutated_proto", "json_mutated"):
        req = hello_from(seed, number)
        valid = bytes(req) if kind == "mutated_proto" else msgspec.json.encode(hello_json(req, "name", "str"))
        at, value = int.from_bytes(seed.take(2), "little"), seed.byte()
        return Case("proto" if kind == "mutated_proto" else "json", hello_path,
                    mutate(valid, MUTATIONS[sub // 2 % 4], at, value))
    if kind == "json_value":
        return Case("json", path, msgspec.json.encode(json_from(seed)))
    if kind == "json_object":
        return Case("json", path, msgspec.json.encode(json_from(seed, HELLO_FIELDS + ECHO_FIELDS, obj=True)))
    if kind == "json_text":
        return Case("json", path, seed.text(60).encode("utf-8", "surrogatepass"))
    if kind == "json_deep":
        nested = deep(abs(number) % 5000 + 1, ("array", "object", "unclosed")[sub // 4 % 3])
        key = seed.pick(["name", "extra", "tags", "sender", "counts", "zz"]).encode()
        return Case("json", path, (nested, b'{"%s":' % key + nested + b"}")[sub // 12 % 2])
    if kind == "raw_frame":
        return _raw_frame(wire, path, seed, number, sub)
    if kind == "client":  # any Python value through micro's own client (lone surrogates too): it encodes it
        value = json_from(seed, HELLO_FIELDS + ECHO_FIELDS, surrogates=True, obj=sub % 2 == 1)
        return Case("json", (HELLO, ECHO)[sub // 2 % 2], b"", value=value, client=True)
    bad = "/" + "".join(seed.pick(PATH_CHARS) for _ in range(seed.byte() % 30))
    if sub // 8 % 2:
        bad = seed.pick(BAD_PATHS)
    if bad in PATHS:
        bad += "x"
    if wire == "proto" and sub // 16 % 2:
        bad = LOOSE  # a JSON-only endpoint asked for protobuf
    return Case(wire, bad, seed.rest(), expect_status=Status.UNIMPLEMENTED)


cases = st.builds(make_case, st.integers(0, len(KINDS) * 32 - 1), st.binary(max_size=64),
                  st.integers(-(2**31), 2**31 - 1))


def _hello_expect(req: HelloRequest, path: str) -> list[HelloReply]:
    if path == HELLO:
        return [hello_reply(req)]
    return [HelloReply(message=req.name[:40], index=i) for i in range(min(req.times, 3))]


# -- driving it --------------------------------------------------------------------------------


class Target:
    def __init__(self, service: micro.Service, away: micro.Runtime, log: ErrorLog) -> None:
        self.service, self.away, self.log = service, away, log
        host, _, port = service.address.rpartition(":")
        self.channels = {wire: Channel(host, int(port), codec=RawCodec(wire)) for wire in ("proto", "json")}

    async def send(self, case: Case) -> Outcome:
        seen = len(self.log.records)
        replies: list[bytes] = []
        if case.client:
            endpoint = "Greeter.SayHello" if case.path == HELLO else "Echo.Echo"
            try:
                rsp = await self.away.client.call("fuzz", endpoint, case.value)
            except Error as exc:
                return Outcome(replies, exc.status, exc.message, self.log.records[seen:])
            return Outcome([msgspec.json.encode(rsp)], errors=self.log.records[seen:])
        try:
            async with self.channels[case.wire].request(case.path, Cardinality.UNARY_STREAM, bytes, bytes) as stream:
                if case.framed:
                    await stream.send_message(case.body, end=True)
                else:
                    await stream.send_request()
                    await stream._stream.send_data(case.body, end_stream=True)
                    stream._send_message_done = stream._end_done = True  # grpclib's bookkeeping
                while (reply := await stream.recv_message()) is not None:
                    replies.append(reply)  # type: ignore[arg-type]
        except GRPCError as exc:
            return Outcome(replies, exc.status, exc.message or "", self.log.records[seen:])
        return Outcome(replies, errors=self.log.records[seen:])

    async def valid_call(self) -> Any:
        return await self.away.client.call("fuzz", "Greeter.SayHello", {"name": "still", "times": 2})

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@asynccontextmanager
async def serving(log: ErrorLog) -> AsyncIterator[Target]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        service = micro.Service("fuzz", runtime=home, max_message_size=LIMIT)
        service.handle(Greeter())
        service.handle(Echo())
        service.handle(Loose())
        async with service:
            target = Target(service, away, log)
            try:
                yield target
            finally:
                target.close()


ALLOWED = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED, Status.UNIMPLEMENTED}


def decode_replies(case: Case, replies: list[bytes]) -> list[Any]:
    hello = case.path in (HELLO, MANY)
    if case.wire == "proto" and not hello:
        return [codec_for(EchoRsp).decode(r, PROTO, "reply") for r in replies]
    if case.wire == "proto":
        return [HelloReply.parse(r) for r in replies]
    if hello:
        return [HelloReply.from_dict(msgspec.json.decode(r)) for r in replies]
    return [msgspec.json.decode(r, type=EchoRsp) for r in replies]


def check(case: Case, got: Outcome) -> None:
    assert not got.errors, f"the service logged errors: {got.errors}"
    if case.expect is not None:
        assert got.status == Status.OK, f"a valid request failed: {got.status.name}: {got.message}"
        assert decode_replies(case, got.replies) == case.expect
        return
    if case.expect_status is not None:
        assert got.status == case.expect_status, f"{got.status.name}: {got.message}"
    if got.status == Status.OK:
        decoded = decode_replies(case, got.replies)  # whatever was accepted answers well-formed replies
        if case.path not in STREAMING:
            assert len(decoded) == 1
        return
    assert got.status in ALLOWED, f"{got.status.name}: {got.message!r}"
    assert got.message and got.message != "Internal Server Error", got.message
    if got.status == Status.INVALID_ARGUMENT:
        assert got.message.startswith("fuzz "), got.message  # names the service and endpoint


def test_fuzz_grpc_bodies() -> None:
    """Protobuf and JSON bodies, framing, paths and sizes against a running service."""
    with error_log() as log, Host(serving(log)) as host:
        ran = fuzz(cases, lambda case: check(case, host.run(host.system.send(case))))
        assert host.run(host.system.valid_call()) == {"message": "still - 0 0", "index": 2}
    assert not log.records
    assert ran >= CASES


# -- code-first endpoints over protobuf (the .proto derived from EchoReq) ---------------------------

STRUCT_KINDS = ["valid", "fields", "mutated", "random", "not_utf8", "wrong_wire"]


def _echo_proto(seed: Seed, count: int) -> EchoReq:
    owner = Owner(seed.text(6), signed(seed.take(4))) if seed.byte() % 2 else None
    when = dt.datetime.fromtimestamp(signed(seed.take(5)) % 253_402_300_799, dt.UTC) if seed.byte() % 2 else None
    req = EchoReq(seed.text(10), count, signed(seed.take(2)) / 7, [seed.text(6) for _ in range(seed.byte() % 3)],
                  owner, seed.pick(list(Mode)), seed.pick(["x", "y"]), extra=json_from(seed, obj=True),
                  repeat=int.from_bytes(seed.take(2), "little") % (2 * LIMIT), when=when)
    try:
        codec_for(EchoReq).encode(req, PROTO)
    except Error:  # an integer google.protobuf.Value cannot hold (10**400): leave `extra` out
        req.extra = {}
    return req


def make_struct_case(selector: int, data: bytes, number: int) -> Case:
    """One protobuf case for the code-first Echo endpoints, read off three draws like make_case."""
    kind, sub = STRUCT_KINDS[selector % len(STRUCT_KINDS)], selector // len(STRUCT_KINDS)
    seed = Seed(data)
    path = (ECHO, ECHO_STREAM)[sub % 2]
    req = _echo_proto(seed, number)
    body = codec_for(EchoReq).encode(req, PROTO)
    if kind == "valid":
        if len(body) > LIMIT:
            return Case("proto", path, body, expect_status=Status.RESOURCE_EXHAUSTED)
        if path == ECHO:
            rsp = echo_reply(req)
            if len(codec_for(EchoRsp).encode(rsp, PROTO)) > LIMIT:
                return Case("proto", path, body, expect_status=Status.RESOURCE_EXHAUSTED)
            return Case("proto", path, body, expect=[rsp])
        return Case("proto", path, body, expect=[EchoRsp(req.name[:40], i, len(req.tags), "")
                                                  for i in range(min(req.count, 3))])
    if kind == "fields":
        return Case("proto", path, proto_from(data))
    if kind == "mutated":
        at, value = int.from_bytes(seed.take(2), "little"), seed.byte()
        return Case("proto", path, mutate(body, MUTATIONS[sub // 2 % 4], at, value))
    if kind == "random":
        return Case("proto", path, data)
    if kind == "not_utf8":  # a name that is not UTF-8 (a lone surrogate's bytes, a cut sequence, 0xff)
        bad = (b"\xed\xa0\x80", b"\xc3", b"\xff", b"a\xe2\x82")[sub // 2 % 4]
        return Case("proto", path, b"\x0a" + varint(len(bad)) + bad + body,
                    expect_status=Status.INVALID_ARGUMENT)
    field_no = sub // 2 % 11  # 0..10: field number 0, each known field, an unknown one
    wire = (0, 1, 2, 5, 3)[sub // 22 % 5]
    return Case("proto", path, body + varint(field_no << 3 | wire) + seed.rest())


struct_cases = st.builds(make_struct_case, st.integers(0, len(STRUCT_KINDS) * 128 - 1), st.binary(max_size=64),
                         st.integers(-(2**31), 2**31 - 1))


def test_fuzz_grpc_code_first_protobuf_bodies() -> None:
    """Protobuf bodies for a code-first endpoint: valid, truncated, garbage fields, wrong wire
    types, unknown fields, invalid UTF-8 - each answered with a reply or a status that says why."""
    with error_log() as log, Host(serving(log)) as host:
        ran = fuzz(struct_cases, lambda case: check(case, host.run(host.system.send(case))))
        assert host.run(host.system.valid_call()) == {"message": "still - 0 0", "index": 2}
    assert not log.records
    assert ran >= CASES
