"""Tool-call assertions on what a scripted model saw, or on an agent's response.

A :class:`~micro.ai.scripted.ScriptedModel` records every call it received, so
the tool calls of a run can be read back from the conversation: each
``tool_use`` block the model produced, the arguments, and the result the agent
sent back. A ``ChatResponse`` (what ``agent.ask`` returns) lists them too::

    model = scripted.turns(scripted.call("task_Task_ListOverdue", user_id="alice"), "Alice has 3.")
    rsp = await ask(make_agent, "What is overdue for Alice?", model=model, services={"task": Task()})
    call = assert_called(model, "task_Task_ListOverdue", user_id="alice")
    assert '"total":3' in call.result
    assert_not_called(rsp, "task_Task_Update")
    assert "past their due date" in assert_offered(model, "task_Task_ListOverdue").description
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeAlias

from micro._proto.micro.agent import ChatResponse
from micro.ai import ToolResultBlock, ToolSpec, ToolUseBlock
from micro.ai.scripted import ScriptedModel

__all__ = ["Source", "ToolUse", "assert_called", "assert_not_called", "assert_offered", "tool_calls"]

Source: TypeAlias = ScriptedModel | ChatResponse
"""Where tool calls are read from: a scripted model, or an agent's response."""


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One tool call: its name and arguments, and the result the model got back (None if none yet)."""

    id: str
    name: str
    input: dict[str, Any]
    result: str | None = None
    is_error: bool = False


def tool_calls(source: Source, name: str | None = None) -> list[ToolUse]:
    """The tool calls in ``source``, in the order they were made (only those named ``name``, if given)."""
    found = _from_response(source) if isinstance(source, ChatResponse) else _from_model(source)
    return [c for c in found if name is None or c.name == name]


def assert_called(source: Source, name: str, /, **args: Any) -> ToolUse:
    """Assert that tool ``name`` was called with at least these arguments; return the first such call.

    Arguments not given are not checked: ``assert_called(model, "task_Task_Create", title="x")``
    passes whatever the call's other arguments were.
    """
    calls = tool_calls(source)
    for c in calls:
        if c.name == name and all(k in c.input and c.input[k] == v for k, v in args.items()):
            return c
    wanted = f"{name}({_args(args)})" if args else name
    raise AssertionError(f"expected a tool call {wanted}; the calls made were: {_listing(calls)}")


def assert_not_called(source: Source, name: str, /) -> None:
    """Assert that tool ``name`` was never called."""
    calls = tool_calls(source, name)
    if calls:
        raise AssertionError(f"expected no call of {name}; it was called: {_listing(calls)}")


def assert_offered(model: ScriptedModel, name: str, /) -> ToolSpec:
    """Assert that tool ``name`` was offered to the model in some call; return how the model saw it."""
    offered: dict[str, ToolSpec] = {}
    for received in model.calls:
        for spec in received.tools:
            offered.setdefault(spec.name, spec)
    if name not in offered:
        raise AssertionError(f"tool {name} was never offered to the model; offered: {sorted(offered) or 'none'}")
    return offered[name]


def _from_model(model: ScriptedModel) -> list[ToolUse]:
    uses: dict[str, ToolUseBlock] = {}
    results: dict[str, ToolResultBlock] = {}
    for received in model.calls:
        for message in received.messages:
            for block in message.content:
                if isinstance(block, ToolUseBlock):
                    uses.setdefault(block.id, block)
                elif isinstance(block, ToolResultBlock):
                    results.setdefault(block.tool_use_id, block)
    out: list[ToolUse] = []
    for block in uses.values():
        res = results.get(block.id)
        out.append(ToolUse(block.id, block.name, dict(block.input),
                           None if res is None else res.content, False if res is None else res.is_error))
    return out


def _from_response(rsp: ChatResponse) -> list[ToolUse]:
    out: list[ToolUse] = []
    for c in rsp.tool_calls:
        try:
            value = json.loads(c.input) if c.input else {}
        except ValueError:
            value = {}
        out.append(ToolUse(c.id, c.name, value if isinstance(value, dict) else {}, c.result, c.is_error))
    return out


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _listing(calls: list[ToolUse]) -> str:
    if not calls:
        return "none"
    return "; ".join(f"{c.name}({_args(c.input)})" for c in calls)
