"""The example system's agents (examples/tasks) on the key-free demo model (issue 4, point 7).

The app is imported and started the way ``micro run examples/tasks`` does it
(``load_app`` + ``runnables``, every item entered on one loop), on memory
backends chosen through the ``MICRO_*`` environment variables.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import micro
from micro.ai import Message, ToolSpec, scripted
from micro.cli.run import load_app, runnables

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tasks"
GUARD = 10.0  # seconds: a deadlock guard, never a timing assertion


@pytest.fixture
async def app(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ModuleType]:
    for var in ("MICRO_REGISTRY", "MICRO_STORE", "MICRO_BROKER"):
        monkeypatch.setenv(var, "memory://")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # the labelled demo model, not Claude
    before = set(sys.modules)
    path = list(sys.path)
    try:
        module = load_app(EXAMPLE)
        async with contextlib.AsyncExitStack() as stack:
            for item in runnables(module):
                await stack.enter_async_context(item)
            yield module
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - before:  # the app's own modules (app, services, demo_model)
            del sys.modules[name]


async def test_task_mgr_answers_what_is_overdue_for_alice(app: ModuleType) -> None:
    agent: micro.Agent = app.task_mgr
    assert {"task", "project", "milestone", "task-mgr", "project-mgr"} <= {s.name for s in runnables(app)}
    assert agent.metadata["services"] == "task,project"
    assert "scripted demo model" in agent.metadata["model"]  # clearly labelled as not Claude
    with anyio.fail_after(GUARD):
        rsp = await agent.ask("What tasks are overdue for Alice?")
    (call,) = rsp.tool_calls
    assert call.name == "task_Task_ListOverdue" and not call.is_error
    assert json.loads(call.input) == {"user_id": "alice"}
    titles = [r["title"] for r in json.loads(call.result)["records"]]
    assert titles == ["Write quarterly report", "Review PR #42", "Update deployment docs"]
    assert rsp.reply.splitlines() == [
        "Alice has 3 overdue tasks:",
        "1. Write quarterly report (due June 1)",
        "2. Review PR #42 (due June 2)",
        "3. Update deployment docs (due June 3)",
    ]


async def test_the_example_agents_answer_agent_chat(app: ModuleType) -> None:
    client = app.task.client
    with anyio.fail_after(GUARD):
        rsp = await client.call("task-mgr", "Agent.Chat", {"message": "What tasks are overdue for Bob?"})
        milestones = await client.call("project-mgr", "Agent.Chat", {"message": "Show me the milestones"})
    assert rsp["reply"].startswith("Bob has 1 overdue task:")
    assert [c["name"] for c in milestones["tool_calls"]] == ["milestone_Milestone_List"]
    assert milestones["reply"].startswith("Found 3:")
    # task-mgr does not manage milestones: the demo model says what it can do instead
    unmanaged = await client.call("task-mgr", "Agent.Chat", {"message": "Show me the milestones"})
    assert unmanaged["tool_calls"] == [] and "milestone" not in unmanaged["reply"].split("tools:")[1]


def _demo_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_model_phrases", EXAMPLE / "demo_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listed(text: str, start: str, end: str) -> list[str]:
    """The phrases a text lists between ``start`` and ``end`` ("a, b and c", markdown emphasis aside)."""
    part = " ".join(text.split(start, 1)[1].split(end, 1)[0].replace("*", "").split())
    return [p.strip() for p in part.replace(" and ", ", ").split(",") if p.strip()]


def test_the_demo_model_understands_what_the_readme_and_micro_run_say() -> None:
    demo = _demo_model()
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    assert _listed(readme, "The demo model understands", ", for") == list(demo.PHRASES)
    docstring = (EXAMPLE / "app.py").read_text()  # micro run prints the app's docstring
    assert _listed(docstring, "It\nunderstands", ",\nfor") == list(demo.PHRASES)
    tools = [ToolSpec(name, "", {"type": "object"}) for name in (
        "task_Task_List", "task_Task_ListOverdue", "task_Task_Update", "task_Task_Delete", "project_Project_List",
        "milestone_Milestone_List", "notification_Notification_Send", "email_Email_Send")]
    for phrase in demo.PHRASES:
        said = demo._brain([Message.user(f"{phrase.replace('tN', 't7')} for bob")], tools)
        assert isinstance(said, scripted.Turn) and said.calls, phrase  # a tool call, not the list of tools
    assert "I only understand a few requests" in demo._brain([Message.user("good morning")], tools)
