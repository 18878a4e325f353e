"""Token auth on both paths: UNAUTHENTICATED / PERMISSION_DENIED, public endpoints, and no token in any
error or log."""

from __future__ import annotations

import logging

import msgspec
import pytest

import micro
from micro.auth import TokenAuth, bearer
from micro.errors import PermissionDenied, Unauthenticated
from micro.registry.memory import MemoryRegistry

OPS = "tok-ops-7f3a9c"
READER = "tok-reader-51d2e8"


class Q(msgspec.Struct):
    x: int = 0


class Task:
    async def List(self, req: Q) -> Q:
        """List."""
        return req

    async def Delete(self, req: Q) -> Q:
        """Delete."""
        return req

    async def Health(self, req: Q) -> Q:
        """Public."""
        return req


def auth() -> TokenAuth:
    return TokenAuth({OPS: ["*"], READER: ["Task.List*"]}, public=["Task.Health"])


@pytest.mark.parametrize("path", ["in-process", "grpc", "native"])
async def test_tokens_and_grants(path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    registry = MemoryRegistry()
    server = micro.Runtime(registry=registry, store="memory://", broker="memory://")
    plain = server if path == "in-process" else micro.Runtime(registry=registry, store="memory://",
                                                               broker="memory://", transport=path)
    async with server, plain:
        svc = micro.New("task", runtime=server, handler_wrappers=[auth()])
        svc.handle(Task())
        async with svc:
            c = plain.client
            assert await c.call("task", "Task.Health", {}) == {"x": 0}  # public
            with pytest.raises(Unauthenticated, match="needs a bearer token"):
                await c.call("task", "Task.List", {})
            with pytest.raises(Unauthenticated, match="not valid"):
                await c.call("task", "Task.List", {}, metadata={"authorization": "Bearer nope"})
            with pytest.raises(Unauthenticated):
                await c.call("task", "Task.List", {}, metadata={"authorization": f"Basic {OPS}"})
            assert await c.call("task", "Task.List", {"x": 1}, metadata={"authorization": f"Bearer {READER}"}) \
                == {"x": 1}
            with pytest.raises(PermissionDenied, match="may not call it") as denied:
                await c.call("task", "Task.Delete", {}, metadata={"authorization": f"Bearer {READER}"})
            assert READER not in str(denied.value)
            assert await c.call("task", "Task.Delete", {}, metadata={"authorization": f"bearer {OPS}"}) == {"x": 0}
    assert OPS not in caplog.text and READER not in caplog.text


@pytest.mark.parametrize("token", ["", "  ", " tok-ops", "tok-ops\n"])
def test_an_empty_or_padded_token_is_refused_at_setup(token: str) -> None:
    # TokenAuth({os.environ.get("OPS_TOKEN", ""): ["*"]}) with the variable unset: "Bearer " + a space
    # would have matched the empty token, with its grants
    with pytest.raises(micro.errors.UsageError, match="TokenAuth"):
        TokenAuth({token: ["*"], OPS: ["*"]})


@pytest.mark.parametrize("header", ["Bearer ", "Bearer  ", "Bearer \t", "bearer"])
def test_a_bearer_header_without_a_token_is_unauthenticated(header: str) -> None:
    with pytest.raises(Unauthenticated, match="needs a bearer token"):
        auth().check("Task.List", {"authorization": header})


@pytest.mark.parametrize("wire", ["grpc", "native"])
async def test_bearer_call_wrapper_sends_the_token(wire: str) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://",
                          call_wrappers=[bearer(READER)], transport=wire) as client:
        svc = micro.New("task", runtime=server, handler_wrappers=[auth()])
        svc.handle(Task())
        async with svc:
            assert await client.client.call("task", "Task.List", {"x": 2}) == {"x": 2}
            with pytest.raises(PermissionDenied):
                await client.client.call("task", "Task.Delete", {})
            # an explicit header wins over the wrapper's
            assert await client.client.call("task", "Task.Delete", {},
                                            metadata={"authorization": f"Bearer {OPS}"}) == {"x": 0}
