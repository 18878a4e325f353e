"""Fuzzing the HTTP gateway: random methods, paths, bodies, content types and credentials.

The gateway (micro/gateway/http.py) runs as an ASGI app driven by ``httpx.ASGITransport``,
three ways over one set of services: on the runtime that hosts them (the in-process path),
on another runtime (gRPC over loopback), and with a bearer token. Hypothesis sends random
bytes, malformed and deeply nested JSON, JSON of the wrong types, invalid UTF-8, bodies over
the 8 KiB limit, unknown services and endpoints, random paths, methods and headers (each
case read off a few draws and a seed: see test_fuzz_kit.Seed).

The property: every request ends with 200 and JSON (or Server-Sent Events from a streaming
endpoint), or with a 4xx and the documented ``{"error": {"code", "message"}}`` body; a valid
request gets the right answer; nothing is logged at ERROR; and afterwards a valid call
through each gateway still succeeds.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest
from hypothesis import strategies as st
from test_fuzz_kit import CASES, ErrorLog, Host, Seed, deep, error_log, fuzz, json_from

import micro
from micro.gateway.http import app
from micro.registry.memory import MemoryRegistry

pytestmark = pytest.mark.fuzz

LIMIT = 8 * 1024  # the gateways' max_body
TOKEN = "fuzz-t0ken"


class Owner(msgspec.Struct):
    name: str
    age: int = 0


class EchoReq(msgspec.Struct):
    name: str
    count: int = 0
    ratio: float = 0.0
    tags: list[str] = []
    owner: Owner | None = None
    kind: Literal["x", "y"] = "x"
    extra: dict[str, Any] = {}
    repeat: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


class EchoRsp(msgspec.Struct):
    name: str
    count: int
    tags: int
    blob: str


class Echo:
    async def Echo(self, req: EchoReq) -> EchoRsp:
        """Echo a summary of the request."""
        return EchoRsp(req.name[:40], req.count, len(req.tags), "x" * req.repeat)

    async def Stream(self, req: EchoReq) -> AsyncIterator[EchoRsp]:
        """Up to three summaries, as Server-Sent Events."""
        for i in range(min(req.count, 3)):
            yield EchoRsp(req.name[:40], i, len(req.tags), "")


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """A proto-first endpoint, called with JSON."""
        return HelloReply(message=req.name[:40], index=req.times)


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    gateway: str  # "home" (in-process), "away" (over gRPC), "token"
    method: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    expect: Any = None  # a valid call: the JSON it must answer
    expect_status: int | None = None


@dataclass
class Outcome:
    status: int
    content_type: str
    body: bytes
    location: str = ""
    errors: list[str] = field(default_factory=list)


ENDPOINTS = ["/api/fuzz/Echo.Echo", "/api/fuzz/Echo.Stream", "/api/fuzz/Greeter.SayHello"]
FIELDS = ["name", "count", "ratio", "tags", "owner", "kind", "extra", "repeat", "times", "tone", "sender"]
GATEWAYS = ["home", "away", "token"]
METHODS = ["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
SEGMENTS = ["fuzz", "Echo.Echo", "Echo.Stream", "Greeter.SayHello", "x.y", ".", "..", "", "%", "services", "é"]
FIXED_PATHS = ["/api/services", "/openapi.json", "/api", "/api/", "/", "/api/fuzz", "/api/fuzz/",
               "/api/fuzz/Echo.Echo/", "/api/fuzz/Echo.Echo/x", "/API/fuzz/Echo.Echo", "/api/fuzz/Echo.Echo?x=1#y"]
HEADER_NAMES = ["content-type", "authorization", "accept", "x-fuzz", "content-encoding"]
HEADER_VALUES = ["application/json", "text/plain", f"Bearer {TOKEN}", "Bearer", f"bearer  {TOKEN} ", "gzip",
                 "multipart/form-data; boundary=x", "", "Basic Zm9vOmJhcg=="]
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
KINDS = 3 * len(METHODS) * 6 * 8 * 4  # gateway, method, path, body, headers


def _segment(seed: Seed) -> str:
    return seed.pick(SEGMENTS) if seed.byte() % 2 else seed.text()


def random_request(kind: int, data: bytes, size: int) -> Case:
    """A request of any method, path, body and headers, read off ``kind`` and the seed ``data``."""
    seed = Seed(data)
    gateway, kind = GATEWAYS[kind % 3], kind // 3
    method, kind = METHODS[kind % len(METHODS)], kind // len(METHODS)
    path_kind, kind = kind % 6, kind // 6
    body_kind, headers_kind = kind % 8, kind // 8
    quote = urllib.parse.quote
    if path_kind < 3:
        path = ENDPOINTS[path_kind]
    elif path_kind == 3:
        path = f"/api/{quote(_segment(seed), safe='')}/{quote(_segment(seed), safe='')}"
    elif path_kind == 4:
        path = f"/api/services/{quote(_segment(seed), safe='')}"
    else:
        path = seed.pick(FIXED_PATHS) if seed.byte() % 2 else "/" + quote(seed.text(24), safe="/%.-_~")
    if body_kind == 0:
        body = b""
    elif body_kind == 1:
        body = seed.rest()  # random bytes
    elif body_kind == 2:
        body = msgspec.json.encode(json_from(seed))
    elif body_kind == 3:
        body = msgspec.json.encode(json_from(seed, FIELDS, obj=True))  # an object of the wrong types
    elif body_kind == 4:
        nested = deep(size % 3000 + 1, seed.pick(["array", "object", "unclosed"]))
        body = b'{"extra":' + nested + b"}" if seed.byte() % 2 else nested
    elif body_kind == 5:
        body = b'{"name":"' + seed.take(6) + b'"' + seed.pick([b"}", b"", b",}", b"}}"])  # bad UTF-8, broken objects
    elif body_kind == 6:
        body = b'{"name":"' + b"a" * size + b'"}'  # up to 3 x the limit
    else:
        body = seed.text(40).encode("utf-8", "surrogatepass")
    headers = []
    for _ in range(headers_kind):
        value = seed.pick(HEADER_VALUES) if seed.byte() % 2 else "".join(seed.pick(PRINTABLE) for _ in range(8))
        headers.append((seed.pick(HEADER_NAMES), value))
    return Case(gateway, method, path, body, tuple(headers))


def _echo(which: int, data: bytes, count: int, repeat: int) -> Case:
    """A valid Echo.Echo or Echo.Stream request and what it must answer."""
    seed = Seed(data)
    owner = Owner(seed.text(6), seed.byte() - 128) if seed.byte() % 2 else None
    req = EchoReq(seed.text(10), count, seed.byte() / 7, [seed.text(6) for _ in range(seed.byte() % 3)], owner,
                  seed.pick(["x", "y"]), json_from(seed, obj=True), repeat)
    gateway, path = ("home", "away")[which % 2], ENDPOINTS[which // 2]
    body = msgspec.json.encode(req)
    if len(body) > LIMIT:
        return Case(gateway, "POST", path, body, expect_status=413)
    if path.endswith("Echo.Echo"):
        expect = {"name": req.name[:40], "count": req.count, "tags": len(req.tags), "blob": "x" * req.repeat}
        return Case(gateway, "POST", path, body, expect=expect)
    events = [{"name": req.name[:40], "count": i, "tags": len(req.tags), "blob": ""} for i in range(min(req.count, 3))]
    return Case(gateway, "POST", path, body, expect=events)


def _oversize(gateway: str, size: int, pad: str) -> Case:
    body = msgspec.json.encode({"name": pad * size})
    expect = {"name": (pad * size)[:40], "count": 0, "tags": 0, "blob": ""}
    if len(body) > LIMIT:
        return Case(gateway, "POST", ENDPOINTS[0], body, expect_status=413)
    return Case(gateway, "POST", ENDPOINTS[0], body, expect=expect)


cases = st.one_of(
    st.builds(random_request, st.integers(0, KINDS - 1), st.binary(max_size=64), st.integers(0, 3 * LIMIT)),
    st.builds(_echo, st.integers(0, 3), st.binary(max_size=40), st.integers(-(2**40), 2**40), st.integers(0, 10_000)),
    st.builds(_oversize, st.sampled_from(["home", "away"]),
              st.integers(LIMIT - 40, LIMIT + 40) | st.integers(0, 4 * LIMIT), st.sampled_from(["a", "é", "\\"])),
)


# -- driving it --------------------------------------------------------------------------------


class Target:
    def __init__(self, clients: dict[str, httpx.AsyncClient], log: ErrorLog) -> None:
        self.clients, self.log = clients, log

    async def send(self, case: Case) -> Outcome:
        seen = len(self.log.records)
        rsp = await self.clients[case.gateway].request(case.method, case.path, content=case.body,
                                                       headers=list(case.headers))
        return Outcome(rsp.status_code, rsp.headers.get("content-type", ""), rsp.content,
                       rsp.headers.get("location", ""), self.log.records[seen:])

    async def valid_calls(self) -> list[Any]:
        out = []
        for name in ("home", "away", "token"):
            rsp = await self.clients[name].post(ENDPOINTS[0], json={"name": "still"},
                                                headers={"authorization": f"Bearer {TOKEN}"})
            out.append((rsp.status_code, rsp.json()))
        return out


@asynccontextmanager
async def serving(log: ErrorLog) -> AsyncIterator[Target]:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as away:
        service = micro.Service("fuzz", runtime=home)
        service.handle(Echo())
        service.handle(Greeter())
        async with service:
            gateways = {"home": app(home, max_body=LIMIT), "away": app(away, max_body=LIMIT),
                        "token": app(home, max_body=LIMIT, token=TOKEN)}
            clients = {name: httpx.AsyncClient(transport=httpx.ASGITransport(gw), base_url="http://gateway")
                       for name, gw in gateways.items()}
            try:
                yield Target(clients, log)
            finally:
                for c in clients.values():
                    await c.aclose()


def sse(text: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        kind, data = "message", []
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
        events.append((kind, json.loads("\n".join(data))))
    return events


ALLOWED = {200, 400, 401, 404, 405, 413}


def check(case: Case, got: Outcome) -> None:
    assert not got.errors, f"the gateway logged errors: {got.errors}"
    if case.expect is not None:
        assert got.status == 200, got.body
        if isinstance(case.expect, list):
            assert got.content_type.startswith("text/event-stream")
            assert sse(got.body.decode()) == [("message", e) for e in case.expect]
        else:
            assert got.content_type == "application/json"
            assert json.loads(got.body) == case.expect
        return
    if case.expect_status is not None:
        assert got.status == case.expect_status, got.body
    if got.status == 307:  # Starlette's redirect of a path with a trailing slash to the one without
        assert got.location and urllib.parse.unquote(case.path).endswith("/"), (case.path, got.location)
        return
    assert got.status in ALLOWED, (got.status, got.body[:300])
    if case.method == "HEAD":
        return
    if got.status == 200:
        if got.content_type.startswith("text/event-stream"):
            for kind, data in sse(got.body.decode()):
                assert kind == "message" or (kind == "error" and data["error"]["message"]), (kind, data)
        else:
            assert got.content_type == "application/json", got.content_type
            json.loads(got.body)
        return
    assert got.content_type == "application/json", (got.status, got.content_type, got.body[:300])
    body = json.loads(got.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"].isupper(), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def test_fuzz_http_gateway() -> None:
    """Methods, paths, bodies, headers and sizes against the gateway on both call paths and with a token."""
    with error_log() as log, Host(serving(log)) as host:
        ran = fuzz(cases, lambda case: check(case, host.run(host.system.send(case))))
        still = {"name": "still", "count": 0, "tags": 0, "blob": ""}
        assert host.run(host.system.valid_calls()) == [(200, still)] * 3
    assert not log.records
    assert ran >= CASES
