"""The HTTP gateway: every status mapping, SSE streams, auth, limits, OpenAPI, and `micro api` as a program.

In-process tests drive the ASGI app with ``httpx.ASGITransport``. Most run on both
call paths: the gateway's runtime hosts the services (in-process fast path), or
another runtime sharing the same MemoryRegistry does (over loopback, on micro's native
wire or on gRPC: the gateway's upstream is the runtime's client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from openapi_spec_validator import validate

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.auth import TokenAuth
from micro.errors import (
    BadRequest,
    Internal,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Timeout,
    Unauthenticated,
    Unavailable,
)
from micro.gateway.http import LOOPBACK_HOSTS, app
from micro.registry.memory import MemoryRegistry

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]
PATHS = ["in-process", "native", "grpc"]
TOKEN = "t0ken-for-the-gateway-tests"


class Req(msgspec.Struct):
    name: str


class Rsp(msgspec.Struct):
    greeting: str
    length: int


class CountReq(msgspec.Struct):
    n: int
    fail_after: int = -1


class Item(msgspec.Struct):
    index: int


class FailReq(msgspec.Struct):
    code: str


ERRORS: dict[str, type[Exception]] = {
    "INVALID_ARGUMENT": BadRequest,
    "NOT_FOUND": NotFound,
    "DEADLINE_EXCEEDED": Timeout,
    "UNAVAILABLE": Unavailable,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "INTERNAL": Internal,
}


class Box:
    """A service for the gateway tests."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def Get(self, req: Req) -> Rsp:
        """Greet someone by name."""
        return Rsp(f"hello {req.name}", len(req.name))

    async def Count(self, req: CountReq) -> AsyncIterator[Item]:
        """Count from zero to n - 1, one item at a time."""
        for i in range(req.n):
            if i == req.fail_after:
                raise Unavailable(f"count stopped at {i}")
            yield Item(i)

    async def Fail(self, req: FailReq) -> Rsp:
        """Fail with the error of that gRPC status name (CRASH: an unexpected exception)."""
        if req.code == "CRASH":
            raise RuntimeError("boom")
        raise ERRORS[req.code](f"failing with {req.code}")

    async def Hang(self, req: Req) -> Rsp:
        """Never answer."""
        await self.never.wait()
        return Rsp("", 0)


def _brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return f"The box said: {json.loads(results[0].content)['greeting']}"
    return scripted.turn("Asking the box. ", scripted.call("box_Box_Get", name=messages[-1].text))


class System:
    def __init__(self, home: micro.Runtime, away: micro.Runtime, away_grpc: micro.Runtime) -> None:
        self.home, self.away, self.away_grpc = home, away, away_grpc

    def runtime(self, path: str) -> micro.Runtime:
        return {"in-process": self.home, "native": self.away, "grpc": self.away_grpc}[path]


def memory_runtime(registry: MemoryRegistry, transport: str | None = None) -> micro.Runtime:
    return micro.Runtime(registry=registry, store="memory://", broker="memory://", transport=transport)


@pytest.fixture
async def system() -> AsyncIterator[System]:
    registry = MemoryRegistry()
    async with memory_runtime(registry) as home, memory_runtime(registry, "native") as away, \
            memory_runtime(registry, "grpc") as away_grpc:
        box = micro.Service("box", runtime=home)
        box.handle(Box())
        helper = micro.Agent("helper", services=["box"], prompt="You greet people through the box.",
                             provider=scripted.function(_brain), runtime=home)
        async with box, helper:
            yield System(home, away, away_grpc)


def client(gateway: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(gateway), base_url="http://gateway", headers=headers)


def sse(text: str) -> list[tuple[str, Any]]:
    """``(event, data)`` for each Server-Sent Event in a body."""
    events: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        kind, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
        events.append((kind, json.loads("\n".join(data))))
    return events


def error_of(rsp: httpx.Response) -> tuple[str, str]:
    assert rsp.headers["content-type"] == "application/json"
    body = rsp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"], body["error"]["message"]


# -- calls and status mapping -----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_post_calls_the_endpoint_and_returns_its_json(system: System, path: str) -> None:
    async with client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/box/Box.Get", json={"name": "ann"})
        assert rsp.status_code == 200
        assert rsp.headers["content-type"] == "application/json"
        assert rsp.json() == {"greeting": "hello ann", "length": 3}
        rsp = await http.post("/api/helper/Agent.Chat", json={"message": "bob"})
        assert rsp.status_code == 200
        assert rsp.json()["reply"] == "The box said: hello bob"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("INVALID_ARGUMENT", 400),
        ("NOT_FOUND", 404),
        ("DEADLINE_EXCEEDED", 504),
        ("UNAVAILABLE", 503),
        ("UNAUTHENTICATED", 401),
        ("PERMISSION_DENIED", 403),
        ("RESOURCE_EXHAUSTED", 429),
        ("INTERNAL", 500),
    ],
)
async def test_a_handler_error_maps_to_its_http_status(system: System, path: str, code: str, status: int) -> None:
    async with client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/box/Box.Fail", json={"code": code})
    assert rsp.status_code == status
    assert error_of(rsp) == (code, f"failing with {code}")


@pytest.mark.parametrize("path", PATHS)
async def test_routing_and_request_errors(system: System, path: str) -> None:
    async with client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/box/Box.Fail", json={"code": "CRASH"})
        assert rsp.status_code == 500
        code, message = error_of(rsp)
        assert code == "INTERNAL" and "boom" not in message  # no details leave the service

        rsp = await http.post("/api/nobody/Box.Get", json={"name": "x"})
        assert rsp.status_code == 404
        assert error_of(rsp)[0] == "NOT_FOUND"

        rsp = await http.post("/api/box/Box.Nope", json={})
        assert rsp.status_code == 404
        code, message = error_of(rsp)
        assert code == "UNIMPLEMENTED" and "Box.Get" in message  # it names the endpoints there are

        rsp = await http.post("/api/box/Box.Get", json={"name": 7})
        assert rsp.status_code == 400
        code, message = error_of(rsp)
        assert code == "INVALID_ARGUMENT" and "$.name" in message

        rsp = await http.post("/api/box/Box.Get", content=b'{"name": "ann"')
        assert rsp.status_code == 400
        code, message = error_of(rsp)
        assert code == "INVALID_ARGUMENT" and "not valid JSON" in message

        rsp = await http.post("/api/box/Box.Get", content=b'["ann"]')
        assert rsp.status_code == 400
        assert "must be a JSON object, not list" in error_of(rsp)[1]

        rsp = await http.post("/api/box/Box.Get")  # no body is {}: the missing field is named
        assert rsp.status_code == 400
        assert "name" in error_of(rsp)[1]


async def test_unknown_routes_and_methods_answer_json(system: System) -> None:
    async with client(app(system.home)) as http:
        rsp = await http.get("/nowhere")
        assert rsp.status_code == 404
        assert error_of(rsp)[0] == "NOT_FOUND"
        rsp = await http.get("/api/box/Box.Get")
        assert rsp.status_code == 405
        assert "POST" in error_of(rsp)[1]


@pytest.mark.parametrize("path", PATHS)
async def test_a_call_that_outlives_the_timeout_is_504(system: System, path: str) -> None:
    async with client(app(system.runtime(path), timeout=0.2)) as http:
        rsp = await http.post("/api/box/Box.Hang", json={"name": "x"})
    assert rsp.status_code == 504
    code, message = error_of(rsp)
    assert code == "DEADLINE_EXCEEDED" and "deadline" in message


async def test_an_oversize_body_is_413_before_the_call(system: System) -> None:
    async with client(app(system.home, max_body=64)) as http:
        rsp = await http.post("/api/box/Box.Get", json={"name": "x" * 100})  # Content-Length says so
        assert rsp.status_code == 413
        code, message = error_of(rsp)
        assert code == "RESOURCE_EXHAUSTED" and "64-byte limit" in message

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"name": "'
            for _ in range(10):
                yield b"x" * 10
            yield b'"}'

        rsp = await http.post("/api/box/Box.Get", content=chunks())
        assert rsp.status_code == 413
        rsp = await http.post("/api/box/Box.Get", json={"name": "small"})
        assert rsp.status_code == 200


# -- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_streaming_endpoint_is_server_sent_events(system: System, path: str) -> None:
    async with client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/box/Box.Count", json={"n": 3})
        assert rsp.status_code == 200
        assert rsp.headers["content-type"].startswith("text/event-stream")
        assert sse(rsp.text) == [("message", {"index": 0}), ("message", {"index": 1}), ("message", {"index": 2})]

        rsp = await http.post("/api/box/Box.Count", json={"n": 0})
        assert rsp.status_code == 200 and rsp.text == ""

        rsp = await http.post("/api/box/Box.Count", json={"n": 5, "fail_after": 2})  # fails mid-stream
        assert rsp.status_code == 200
        assert sse(rsp.text) == [
            ("message", {"index": 0}), ("message", {"index": 1}),
            ("error", {"error": {"code": "UNAVAILABLE", "message": "count stopped at 2"}}),
        ]

        rsp = await http.post("/api/box/Box.Count", json={"n": 5, "fail_after": 0})  # fails before any item
        assert rsp.status_code == 503
        assert error_of(rsp) == ("UNAVAILABLE", "count stopped at 0")

        rsp = await http.post("/api/box/Box.Count", json={"n": "three"})
        assert rsp.status_code == 400
        assert error_of(rsp)[0] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("path", PATHS)
async def test_agent_stream_chat_is_server_sent_events(system: System, path: str) -> None:
    async with client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/helper/Agent.StreamChat", json={"message": "cy"})
    assert rsp.status_code == 200
    events = [data for kind, data in sse(rsp.text) if kind == "message"]
    kinds = [e["type"] for e in events]
    assert "text" in kinds and kinds[-1] == "done"
    assert kinds.index("tool_start") < kinds.index("tool_end")
    start = events[kinds.index("tool_start")]["tool_call"]
    assert start["name"] == "box_Box_Get" and json.loads(start["input"]) == {"name": "cy"}
    assert "".join(e["text"] for e in events if e["type"] == "text").endswith("The box said: hello cy")
    assert events[-1]["response"]["reply"] == "The box said: hello cy"


# -- services, OpenAPI, auth ------------------------------------------------------------------


async def test_services_are_listed_from_the_registry(system: System) -> None:
    async with client(app(system.away)) as http:
        rsp = await http.get("/api/services")
        assert rsp.status_code == 200
        records = rsp.json()
        assert [r["name"] for r in records] == ["box", "helper"]
        assert records[1]["metadata"]["type"] == "agent"
        rsp = await http.get("/api/services/box")
        assert rsp.status_code == 200
        (box,) = rsp.json()
        assert {e["name"] for e in box["endpoints"]} == {"Box.Get", "Box.Count", "Box.Fail", "Box.Hang"}
        rsp = await http.get("/api/services/nobody")
        assert rsp.status_code == 404
        assert error_of(rsp)[0] == "NOT_FOUND"


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def test_the_openapi_document_validates(system: System) -> None:
    async with client(app(system.home)) as http:
        rsp = await http.get("/openapi.json")
    assert rsp.status_code == 200
    doc = rsp.json()
    validate(doc)  # OpenAPI 3.1, schemas included
    assert doc["openapi"] == "3.1.0"
    assert all(ref.startswith("#/components/") for ref in _refs(doc))
    for ref in _refs(doc):
        _resolve(doc, ref)  # every reference points somewhere

    op = doc["paths"]["/api/box/Box.Get"]["post"]
    assert op["description"] == "Greet someone by name."
    assert op["tags"] == ["box"]
    req = _resolve(doc, op["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert req["properties"] == {"name": {"type": "string"}} and req["required"] == ["name"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(_resolve(doc, ok["$ref"])["properties"]) == {"greeting", "length"}

    stream = doc["paths"]["/api/helper/Agent.StreamChat"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    event = _resolve(doc, stream["x-micro-item-schema"]["$ref"])
    assert event["properties"]["response"] == {"$ref": "#/components/schemas/helper.ChatResponse"}
    assert "security" not in doc


@pytest.mark.parametrize("path", PATHS)
async def test_a_mounted_gateway_answers_calls_as_the_gateway_at_the_root(system: System, path: str) -> None:
    # at the root, calls take the short way in (the app's middleware straight to the call handler);
    # mounted under a path, Starlette's routing: both must give the same answers, checks included
    from starlette.applications import Starlette
    from starlette.routing import Mount

    root = app(system.runtime(path), token=TOKEN, max_body=64, allowed_hosts=["gateway"])
    mounted = Starlette(routes=[Mount("/gw", app(system.runtime(path), token=TOKEN, max_body=64,
                                                  allowed_hosts=["gateway"]))])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    requests: list[tuple[str, bytes, dict[str, str]]] = [
        ("/api/box/Box.Get", b'{"name": "ann"}', auth),
        ("/api/box/Box.Get", b"", auth),  # an empty body is {}
        ("/api/box/Box.Get", b'{"name": "ann"}', {}),  # no token
        ("/api/box/Box.Get", b'{"name": "ann"}', {**auth, "Origin": "https://evil.example"}),
        ("/api/box/Box.Get", b'{"name": "ann"}', {**auth, "Host": "evil.example"}),
        ("/api/box/Box.Get", b"[1, 2]", auth),
        ("/api/box/Box.Get", b'{"name": ', auth),
        ("/api/box/Box.Get", b'{"name": "' + b"x" * 64 + b'"}', auth),  # over max_body
        ("/api/box/Box.Fail", b'{"code": "NOT_FOUND"}', auth),
        ("/api/box/Box.Nope", b"{}", auth),
        ("/api/nobody/Box.Get", b"{}", auth),
        ("/api/box/Box.Count", b'{"n": 2}', auth),  # a stream: Server-Sent Events
        ("/api/box/Box.Get/more", b"{}", auth),  # not the call route: 404 on both
    ]
    async with client(root) as at_root, client(mounted) as under:
        for route, body, headers in requests:
            a = await at_root.post(route, content=body, headers=headers)
            b = await under.post(f"/gw{route}", content=body, headers=headers)
            assert (a.status_code, a.headers.get("content-type"), a.content) == \
                (b.status_code, b.headers.get("content-type"), b.content.replace(b"/gw/", b"/")), route
        ok = await at_root.post("/api/box/Box.Get", json={"name": "ann"}, headers=auth)
        assert ok.json() == {"greeting": "hello ann", "length": 3}


async def test_bearer_token_auth(system: System, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = app(system.home, token=TOKEN)
    async with client(gateway) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            rsp = await http.post("/api/box/Box.Get", json={"name": "x"}, headers=headers)
            assert rsp.status_code == 401, headers
            assert rsp.headers["www-authenticate"] == "Bearer"
            assert error_of(rsp)[0] == "UNAUTHENTICATED"
        assert (await http.get("/openapi.json")).status_code == 401
        assert (await http.get("/api/services")).status_code == 401
    async with client(gateway, Authorization=f"Bearer {TOKEN}") as http:
        rsp = await http.post("/api/box/Box.Get", json={"name": "x"})
        assert rsp.status_code == 200
        doc = (await http.get("/openapi.json")).json()
        validate(doc)
        assert doc["security"] == [{"bearer": []}]
    assert TOKEN not in caplog.text


async def test_a_mounted_gateway_with_a_token_keeps_its_probes_public(system: System) -> None:
    """Under Mount("/gw", …) the token check sees the gateway's own paths, not the prefix."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    parent = Starlette(routes=[Mount("/gw", app(system.home, token=TOKEN))])
    async with client(parent) as http:
        live = await http.get("/gw/health/live")
        assert (live.status_code, live.text) == (200, "live\n")
        assert (await http.get("/gw/health/ready")).status_code == 200
        assert (await http.post("/gw/api/box/Box.Get", json={"name": "x"})).status_code == 401
        assert (await http.get("/gw/openapi.json")).status_code == 401
        # a path that only *ends* like a probe under the prefix is not one
        assert (await http.get("/gw/api/health/live")).status_code == 401
    async with client(parent, Authorization=f"Bearer {TOKEN}") as http:
        assert (await http.post("/gw/api/box/Box.Get", json={"name": "x"})).status_code == 200


@pytest.mark.parametrize("path", PATHS)
async def test_without_a_gateway_token_the_callers_token_reaches_the_service(system: System, path: str) -> None:
    vault = micro.Service("vault", runtime=system.home,
                          handler_wrappers=[TokenAuth({"reader": ["Box.Get"], "admin": ["*"]})])
    vault.handle(Box())
    async with vault, client(app(system.runtime(path))) as http:
        rsp = await http.post("/api/vault/Box.Get", json={"name": "x"})
        assert rsp.status_code == 401
        assert error_of(rsp)[0] == "UNAUTHENTICATED"
        rsp = await http.post("/api/vault/Box.Get", json={"name": "x"}, headers={"Authorization": "Bearer nobody"})
        assert rsp.status_code == 401
        rsp = await http.post("/api/vault/Box.Count", json={"n": 1}, headers={"Authorization": "Bearer reader"})
        assert rsp.status_code == 403
        assert error_of(rsp)[0] == "PERMISSION_DENIED"
        rsp = await http.post("/api/vault/Box.Get", json={"name": "x"}, headers={"Authorization": "Bearer reader"})
        assert rsp.status_code == 200
        rsp = await http.post("/api/vault/Box.Count", json={"n": 1}, headers={"Authorization": "Bearer admin"})
        assert sse(rsp.text) == [("message", {"index": 0})]
    # with a token of its own, the gateway keeps the header: it is the gateway's credential
    safe = micro.Service("safe", runtime=system.home, handler_wrappers=[TokenAuth({TOKEN: ["*"]})])
    safe.handle(Box())
    async with safe, client(app(system.runtime(path), token=TOKEN), Authorization=f"Bearer {TOKEN}") as http:
        rsp = await http.post("/api/safe/Box.Get", json={"name": "x"})
        assert rsp.status_code == 401
        assert "needs a bearer token" in error_of(rsp)[1]  # the service's refusal, not the gateway's


# -- `micro api` as a program -----------------------------------------------------------------


class Program:
    """A `micro` subprocess whose output is read line by line until a marker."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*MICRO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or os.environ.copy(), cwd=ROOT)
        self.lines: list[str] = []

    def wait_for(self, marker: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # blocks until a line comes; ends if the program dies
            self.lines.append(line)
            if marker in line:
                return line
        self.proc.wait(10)
        pytest.fail(f"{self.proc.args} exited before printing {marker!r}:\n" + "".join(self.lines))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rest, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        return "".join(self.lines) + rest


@pytest.fixture
def tasks_app() -> Iterator[Program]:
    program = Program("run", "examples/tasks")
    program.wait_for("Ctrl-C to stop")
    yield program
    program.stop()


def test_micro_api_serves_the_registry_over_http(tasks_app: Program) -> None:
    api = Program("api", "--address", "127.0.0.1:0", "--token-env", "MICRO_TEST_TOKEN",
                  env={**os.environ, "MICRO_TEST_TOKEN": TOKEN})
    try:
        banner = api.wait_for("micro api on")
        url = banner.split()[3].rstrip(":")
        assert url.startswith("http://127.0.0.1:") and "bearer token required" in banner
        with httpx.Client(base_url=url, timeout=30) as http:
            rsp = http.post("/api/task/Task.ListOverdue", json={"user_id": "alice"})
            assert rsp.status_code == 401
            http.headers["Authorization"] = f"Bearer {TOKEN}"
            rsp = http.post("/api/task/Task.ListOverdue", json={"user_id": "alice"})
            assert rsp.status_code == 200, rsp.text
            assert rsp.json()["total"] == 3
            rsp = http.post("/api/task/Task.ListOverdue", content=b"{oops")
            assert rsp.status_code == 400
            with http.stream("POST", "/api/task-mgr/Agent.StreamChat",
                             json={"message": "What tasks are overdue for Alice?"}) as stream:
                assert stream.status_code == 200
                events = [json.loads(line.removeprefix("data: ")) for line in stream.iter_lines()
                          if line.startswith("data: ")]
            assert events[-1]["type"] == "done"
            assert "Alice has 3 overdue tasks" in events[-1]["response"]["reply"]
            validate(http.get("/openapi.json").json())
    finally:
        output = api.stop()
    assert api.proc.returncode == 0, output
    assert output.rstrip().endswith("stopped")
    assert TOKEN not in output


def test_micro_api_refuses_a_missing_token_variable() -> None:
    res = subprocess.run([*MICRO, "api", "--token-env", "MICRO_NO_SUCH_VAR"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "MICRO_NO_SUCH_VAR"})
    assert res.returncode == 2
    assert "MICRO_NO_SUCH_VAR" in res.stderr and len(res.stderr.strip().splitlines()) == 1


class Waiter:
    """Handlers that wait until their caller goes away, and say when they were stopped."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()

    async def Hold(self, req: Req) -> Rsp:
        """Wait for ever."""
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopped.set()
        return Rsp("", 0)

    async def HoldStream(self, req: Req) -> AsyncIterator[Item]:
        """Wait for ever before the first item."""
        self.started.set()
        try:
            await asyncio.Event().wait()
            yield Item(0)
        finally:
            self.stopped.set()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("endpoint", ["Waiter.Hold", "Waiter.HoldStream"])
async def test_a_client_that_leaves_stops_its_call(system: System, path: str, endpoint: str) -> None:
    # before: the call ran on until the gateway's timeout (60 s by default) with nobody to answer
    waiter = Waiter()
    svc = micro.Service("waiter", runtime=system.home)
    svc.handle(waiter)
    gateway = app(system.runtime(path), timeout=3600)
    pending = [{"type": "http.request", "body": b'{"name": "x"}', "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/api/waiter/{endpoint}", "raw_path": f"/api/waiter/{endpoint}".encode(), "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    async with svc:
        async with asyncio.timeout(30):
            request = asyncio.create_task(gateway(scope, receive, send))
            await waiter.started.wait()
            gone.set()  # the client hangs up
            await waiter.stopped.wait()  # the handler is stopped, not left running
            await request
    assert not any(m.get("status") == 200 for m in sent)  # and nothing claims an answer


# -- pages on other sites (CSRF, DNS rebinding) -------------------------------------------------


async def test_a_page_on_another_site_cannot_call_the_gateway(system: System) -> None:
    gateway = app(system.home, allowed_hosts=LOOPBACK_HOSTS)
    async with client(gateway) as http:
        # what fetch(..., {mode: "no-cors", body: '{"name": "x"}'}) sends: text/plain, no preflight
        rsp = await http.post("http://127.0.0.1:8080/api/box/Box.Get", content=b'{"name": "x"}',
                              headers={"content-type": "text/plain", "origin": "https://evil.example"})
        assert rsp.status_code == 403 and rsp.json()["error"]["code"] == "PERMISSION_DENIED"
        assert "https://evil.example" in rsp.json()["error"]["message"]
        # a hostile name re-pointed at 127.0.0.1 (DNS rebinding): same-origin for the page, wrong Host
        rsp = await http.get("http://evil.example:8080/api/services")
        assert rsp.status_code == 403 and "--allow-host" in rsp.json()["error"]["message"]
        # curl and SDKs: no Origin, a loopback Host
        for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "LOCALHOST"):
            rsp = await http.post(f"http://{host}/api/box/Box.Get", json={"name": "x"})
            assert rsp.status_code == 200, (host, rsp.text)


async def test_allowed_origins_get_cors_and_still_need_the_token(system: System) -> None:
    gateway = app(system.home, token="s3cret", allowed_origins=["https://app.example.com"])
    async with client(gateway) as http:
        preflight = await http.options("/api/box/Box.Get", headers={
            "origin": "https://app.example.com", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200  # answered before the token check: browsers send none here
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        rsp = await http.post("/api/box/Box.Get", json={"name": "x"}, headers={"origin": "https://app.example.com"})
        assert rsp.status_code == 401
        rsp = await http.post("/api/box/Box.Get", json={"name": "x"},
                              headers={"origin": "https://app.example.com", "authorization": "Bearer s3cret"})
        assert rsp.status_code == 200 and rsp.headers["access-control-allow-origin"] == "https://app.example.com"
        rsp = await http.post("/api/box/Box.Get", json={"name": "x"},
                              headers={"origin": "https://other.example", "authorization": "Bearer s3cret"})
        assert rsp.status_code == 403


async def test_a_call_wrapper_that_answers_itself_is_the_gateways_answer(system: System) -> None:
    """The gateway asks for the wire's JSON as it came (msgspec.Raw); a client call wrapper (a cache, a
    fallback) that answers with a value of its own is encoded, not a bare 500."""
    def cached(next_: Any) -> Any:
        async def call(req: Any) -> Any:
            if req.endpoint == "Box.Get":
                return {"greeting": "from the cache", "length": 0}
            return await next_(req)

        return call

    async with micro.Runtime(registry=system.home.registry, store="memory://", broker="memory://",
                             call_wrappers=[cached]) as rt, client(app(rt)) as http:
        rsp = await http.post("/api/box/Box.Get", json={"name": "x"})
    assert (rsp.status_code, rsp.json()) == (200, {"greeting": "from the cache", "length": 0})
