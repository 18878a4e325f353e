"""An agent on the real Anthropic SDK path, end to end (issue 4, point 6).

``provider="anthropic"`` builds the official SDK client pointed at
``tests/fake_anthropic.py``, a Messages API server on loopback. The agent runs a
turn with two parallel tool_use blocks and then a text answer, through ``ask``
(JSON responses) and through ``stream`` (server-sent events); the fake server
records what the SDK sent: the tools, the cache breakpoints, the tool results.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from fake_anthropic import FakeAnthropic, message, text, tool_use

import micro
from micro._proto.micro.agent import ChatEvent
from micro.agent.loop import system_prompt
from micro.ai.anthropic import AnthropicModel

GUARD = 10.0  # seconds: a deadlock guard, never a timing assertion
EPHEMERAL = {"type": "ephemeral"}
PROMPT = "You manage tasks and projects."


class OverdueRequest(msgspec.Struct):
    user_id: str
    as_of: str = ""


class TaskList(msgspec.Struct):
    titles: list[str]


class ProjectsRequest(msgspec.Struct):
    owner: str = ""


class ProjectList(msgspec.Struct):
    names: list[str]


class Task:
    async def ListOverdue(self, req: OverdueRequest) -> TaskList:
        """List the open tasks of a user that are past their due date."""
        return TaskList(["Write quarterly report", "Review PR #42", "Update deployment docs"])


class Project:
    async def List(self, req: ProjectsRequest) -> ProjectList:
        """List projects, filtered by owner when given."""
        return ProjectList(["Website", "Launch"])


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "MICRO_ANTHROPIC_MODEL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
async def api() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def rt() -> AsyncIterator[micro.Runtime]:
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as runtime:
        task, project = micro.Service("task", runtime=runtime), micro.Service("project", runtime=runtime)
        task.handle(Task())
        project.handle(Project())
        async with task, project:
            yield runtime


def script(api: FakeAnthropic, hold: anyio.Event | None = None) -> None:
    api.reply(
        message(
            text("Let me check tasks and projects."),
            tool_use("toolu_1", "task_Task_ListOverdue", {"user_id": "alice"}),
            tool_use("toolu_2", "project_Project_List", {}),
        ),
        message(text("Alice has 3 overdue tasks across 2 projects."), hold=hold),
    )


def check_requests(api: FakeAnthropic, streaming: bool) -> None:
    assert len(api.requests) == 2 and api.pending == 0
    first, second = (r.body for r in api.requests)
    headers = api.requests[0].headers
    assert "test" in headers.get("x-api-key", "") + headers.get("authorization", "")
    assert bool(first.get("stream")) is streaming
    assert first["system"] == [{"type": "text", "text": system_prompt(PROMPT), "cache_control": EPHEMERAL}]
    tools = {t["name"]: t for t in first["tools"]}
    assert sorted(tools) == ["project_Project_List", "request_input", "task_Task_ListOverdue"]
    overdue = tools["task_Task_ListOverdue"]
    assert overdue["description"] == "List the open tasks of a user that are past their due date."
    assert overdue["input_schema"]["type"] == "object"
    assert overdue["input_schema"]["required"] == ["user_id"]
    assert set(overdue["input_schema"]["properties"]) == {"user_id", "as_of"}
    assert first["tools"][-1]["cache_control"] == EPHEMERAL  # the breakpoint that caches the whole list
    assert all("cache_control" not in t for t in first["tools"][:-1])
    assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is overdue for Alice?"}]}]
    # the second request carries the tool calls and their results, in the order asked
    assistant, results = second["messages"][-2:]
    assert [b["id"] for b in assistant["content"] if b["type"] == "tool_use"] == ["toolu_1", "toolu_2"]
    assert results["role"] == "user"
    blocks = [b for b in results["content"] if b["type"] == "tool_result"]
    assert [b["tool_use_id"] for b in blocks] == ["toolu_1", "toolu_2"]
    assert not any(b.get("is_error") for b in blocks)
    contents = [b["content"] if isinstance(b["content"], str) else b["content"][0]["text"] for b in blocks]
    assert json.loads(contents[0])["titles"][0] == "Write quarterly report"
    assert json.loads(contents[1]) == {"names": ["Website", "Launch"]}


def anthropic_agent(rt: micro.Runtime, api: FakeAnthropic) -> micro.Agent:
    return micro.NewAgent(
        "task-mgr", micro.AgentServices("task", "project"), micro.AgentPrompt(PROMPT),
        provider="anthropic", api_key="test", base_url=api.base_url, runtime=rt,
    )


async def test_ask_through_the_anthropic_sdk(rt: micro.Runtime, api: FakeAnthropic) -> None:
    script(api)
    agent = anthropic_agent(rt, api)
    async with agent:
        with anyio.fail_after(GUARD):
            rsp = await agent.ask("What is overdue for Alice?")
    assert rsp.reply == "Alice has 3 overdue tasks across 2 projects."
    assert [(c.name, json.loads(c.input)) for c in rsp.tool_calls] == [
        ("task_Task_ListOverdue", {"user_id": "alice"}), ("project_Project_List", {}),
    ]
    check_requests(api, streaming=False)


async def test_stream_through_the_anthropic_sdk(rt: micro.Runtime, api: FakeAnthropic) -> None:
    hold = anyio.Event()  # the fake pauses the answer after its first word until this is set
    script(api, hold)
    events: list[ChatEvent] = []
    async with anthropic_agent(rt, api) as agent:
        with anyio.fail_after(GUARD):
            async for ev in agent.stream("What is overdue for Alice?"):
                events.append(ev)
                if ev.type == "text" and any(e.type == "tool_end" for e in events):
                    hold.set()  # the answer's first word arrived while the model was still speaking
    kinds = [e.type for e in events]
    first_start, last_end = kinds.index("tool_start"), len(kinds) - 1 - kinds[::-1].index("tool_end")
    assert kinds[:first_start] == ["text"] * first_start and first_start >= 3  # word by word, before the tools
    assert "".join(e.text for e in events[:first_start]) == "Let me check tasks and projects."
    assert sorted(kinds[first_start:last_end + 1]) == ["tool_end"] * 2 + ["tool_start"] * 2
    assert {e.tool_call.name for e in events[first_start:last_end + 1] if e.tool_call} == {
        "task_Task_ListOverdue", "project_Project_List"}
    assert kinds[last_end + 1:] == ["text"] * (len(kinds) - last_end - 2) + ["done"]
    assert "".join(e.text for e in events[last_end + 1:-1]) == "Alice has 3 overdue tasks across 2 projects."
    final = events[-1].response
    assert kinds[-1] == "done" and final and final.reply == "Alice has 3 overdue tasks across 2 projects."
    check_requests(api, streaming=True)


async def test_the_agent_closes_the_model_it_built(rt: micro.Runtime, api: FakeAnthropic) -> None:
    agent = anthropic_agent(rt, api)
    first = agent.model
    assert isinstance(first, AnthropicModel)
    async with agent:
        pass
    assert first._closed and agent.model is not first  # a fresh client, should it start again
    script(api)
    async with agent:
        rsp = await agent.ask("What is overdue for Alice?")
    assert rsp.reply.startswith("Alice has 3")

    mine = AnthropicModel(api_key="test", base_url=api.base_url)
    async with micro.Agent("other", provider=mine, runtime=rt):
        pass
    assert not mine._closed  # a model passed in belongs to the caller
    await mine.aclose()


def test_provider_options_reach_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(micro.errors.ConfigError, match="ANTHROPIC_API_KEY"):
        micro.Agent("a", provider="anthropic")
    agent: Any = micro.Agent("a", provider="anthropic", api_key="k", base_url="http://127.0.0.1:9")
    assert agent.model.base_url == "http://127.0.0.1:9"
    assert agent.metadata["provider"] == "anthropic"
