"""Structured logging: records made inside an agent run, even in the services its tools call, carry the run id."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import msgspec
import pytest

import micro
from micro import logs
from micro.ai import scripted
from micro.errors import UsageError
from micro.registry.memory import MemoryRegistry

log = logging.getLogger("tests.users")


class Lookup(msgspec.Struct):
    user_id: str


class Users:
    async def Get(self, req: Lookup) -> dict[str, str]:
        """Look a user up."""
        log.info("looking up %s", req.user_id)
        return {"user_id": req.user_id}


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logs.configure("INFO", "json", stream)
    yield stream, handler
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)


async def test_a_service_called_by_an_agent_logs_with_the_run_id(
        captured: tuple[io.StringIO, logging.Handler]) -> None:
    stream, _ = captured
    registry = MemoryRegistry()
    model = scripted.turns(scripted.call("users_Users_Get", user_id="erin"), scripted.reply("done"))
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt1, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt2:
        users = micro.New("users", runtime=rt2)  # another runtime: the tool call goes over gRPC
        users.handle(Users())
        agent = micro.NewAgent("user-mgr", services=["users"], provider=model, runtime=rt1)
        async with users, agent:
            rsp = await agent.ask("who is erin?")
            log.info("outside any run")
    lines = [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]
    (handled,) = [r for r in lines if r["message"] == "looking up erin"]
    assert handled["run_id"] == rsp.run_id and handled["logger"] == "tests.users" and handled["level"] == "INFO"
    assert handled["ts"].endswith("Z")
    (summary,) = [r for r in lines if r["logger"] == "micro.agent" and "tool calls" in r["message"]]
    assert summary["run_id"] == rsp.run_id and summary["agent"] == "user-mgr"
    (outside,) = [r for r in lines if r["message"] == "outside any run"]
    assert "run_id" not in outside


def test_text_lines_end_with_the_fields_and_keep_tracebacks_below() -> None:
    stream = io.StringIO()
    handler = logs.configure("DEBUG", "text", stream)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"micro_run_id": "r1"})
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR tests.users: failed  run_id=r1")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_configure_rejects_unknown_levels_and_formats() -> None:
    with pytest.raises(UsageError, match="log format 'xml'"):
        logs.configure("INFO", "xml")
    with pytest.raises(UsageError, match="log level 'LOUD'"):
        logs.configure("LOUD", "json")
