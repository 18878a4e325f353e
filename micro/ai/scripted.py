"""The ``scripted`` provider: a deterministic model for tests and key-free demos.

It never reaches a network; its ``model`` is ``"scripted"`` so a demo can say
so. It plays a script: a list of turns, consumed one per call, or a function of
the conversation. Every call is recorded in ``model.calls`` (messages, tools,
system, max_tokens) so a test can assert on what the model was sent::

    from micro.ai import scripted

    model = scripted.turns(
        scripted.call("task_Task_ListOverdue", user_id="alice"),
        scripted.reply("Alice has 3 overdue tasks"),
    )
    ...
    assert model.calls[1].messages[-1].content[0].tool_use_id == "call_1"

A turn with several calls asks for them in parallel::

    scripted.turn("Checking both.", scripted.call("a"), scripted.call("b"))

A summarisation request (``system=micro.ai.SUMMARISE_PROMPT``, what agent memory
compaction sends) is answered with a deterministic digest of the user's lines,
without using a turn of the script, so a demo or test with a list script can compact.

A function script gets ``(messages, tools)`` and returns a ``Response``, a turn
or a string; it may be async. ``delay`` simulates model latency per call. When
a list script runs out, the call raises ``micro.errors.AgentError``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import operator
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import anyio
import msgspec

from micro.errors import AgentError, Timeout

from ._base import Model
from .messages import (
    SUMMARISE_PROMPT,
    Block,
    Done,
    Message,
    Response,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolSpec,
    ToolUseBlock,
    ToolUseDelta,
    ToolUseStart,
    Usage,
)

__all__ = [
    "ScriptFunction",
    "ScriptedCall",
    "ScriptedModel",
    "Turn",
    "call",
    "function",
    "reply",
    "turn",
    "turns",
]


class Turn(msgspec.Struct, frozen=True):
    """One scripted model turn: some text and/or tool calls (``(name, input)`` pairs)."""

    text: str = ""
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()


ScriptItem: TypeAlias = Turn | Response | str
ScriptFunction: TypeAlias = Callable[[list[Message], list[ToolSpec]], ScriptItem | Awaitable[ScriptItem]]


class ScriptedCall(msgspec.Struct, frozen=True):
    """What the scripted model received in one call."""

    messages: list[Message]
    tools: list[ToolSpec]
    system: str | None
    max_tokens: int | None

    @property
    def tool_names(self) -> list[str]:
        """The names of the tools offered in this call."""
        return [t.name for t in self.tools]


def reply(text: str) -> Turn:
    """A turn that answers with ``text`` and ends the run."""
    return Turn(text=text)


def call(name: str, args: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Turn:
    """A turn calling tool ``name``: ``call("get", user_id="a")`` or ``call("get", {"id": 1})``."""
    return Turn(calls=((name, {**(args or {}), **kwargs}),))


def turn(*parts: Turn | str) -> Turn:
    """One turn made of text and calls; several calls in one turn are parallel tool calls."""
    text = "".join(p if isinstance(p, str) else p.text for p in parts)
    calls = tuple(c for p in parts if isinstance(p, Turn) for c in p.calls)
    return Turn(text, calls)


def turns(*script: ScriptItem, delay: float = 0.0) -> ScriptedModel:
    """A model that plays these turns in order, one per call (a string is a reply)."""
    return ScriptedModel(list(script), delay=delay)


def function(fn: ScriptFunction, *, delay: float = 0.0) -> ScriptedModel:
    """A model whose every turn is ``fn(messages, tools)`` (sync or async)."""
    return ScriptedModel(fn, delay=delay)


class ScriptedModel(Model):
    """A deterministic model playing a script (see the module docstring).

    Args:
        script: a sequence of turns (``Turn``, ``Response`` or a reply string),
            or a function ``(messages, tools) -> Response | Turn | str``, sync or
            async. None answers every message with a labelled echo.
        delay: simulated latency in seconds per call.
        model: the label it answers as (``Response.model``); keep "scripted" in it so
            nobody mistakes a demo for a real model.
    """

    name = "scripted"

    def __init__(
        self,
        script: Sequence[ScriptItem] | ScriptFunction | None = None,
        *,
        delay: float = 0.0,
        model: str = "scripted",
    ) -> None:
        self.model = model
        self.delay = delay
        self.calls: list[ScriptedCall] = []
        self._fn: ScriptFunction | None = None
        self._turns: deque[ScriptItem] = deque()
        if script is None:
            self._fn = _echo
        elif callable(script):
            self._fn = script
        else:
            self._turns.extend(script)
        self._total = len(self._turns)
        self._ids = itertools.count(1)
        # each message's encoded size, by its first block's id (see _size)
        self._sizes: dict[int, tuple[tuple[Block, ...], int]] = {}

    @property
    def remaining(self) -> int | None:
        """Turns left in a list script; None for a function script."""
        return None if self._fn is not None else len(self._turns)

    def __repr__(self) -> str:
        left = "function" if self._fn is not None else f"{len(self._turns)} turns left"
        return f"ScriptedModel({left})"

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Response:
        received = ScriptedCall(list(messages), list(tools), system, max_tokens)
        self.calls.append(received)
        if system == SUMMARISE_PROMPT:
            return self._response(_digest(received.messages), received)
        if self._fn is None and not self._turns:
            raise AgentError(
                f"scripted model: the script has no more turns (it had {self._total}, "
                f"this is call {len(self.calls)}); add a turn such as scripted.reply('…') "
                "or use a function script"
            )
        try:
            with anyio.fail_after(timeout) if timeout is not None else _NO_DEADLINE:
                if self.delay:
                    await anyio.sleep(self.delay)
                if self._fn is not None:
                    item = self._fn(received.messages, received.tools)
                    if inspect.isawaitable(item):
                        item = await item
                else:
                    item = self._turns.popleft()
        except TimeoutError:
            raise Timeout(f"scripted model: no answer within timeout={timeout}s") from None
        return self._response(item, received)

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        rsp = await self.generate(messages, tools=tools, system=system, max_tokens=max_tokens, timeout=timeout)
        for block in rsp.content:
            if isinstance(block, TextBlock):
                for piece in re.findall(r"\s*\S+\s*", block.text) or [block.text]:
                    yield TextDelta(piece)
            elif isinstance(block, ToolUseBlock):
                yield ToolUseStart(block.id, block.name)
                yield ToolUseDelta(block.id, json.dumps(block.input))
        yield Done(rsp)

    def _response(self, item: ScriptItem, received: ScriptedCall) -> Response:
        if isinstance(item, Response):
            return item
        if isinstance(item, str):
            item = Turn(text=item)
        if not isinstance(item, Turn):
            raise AgentError(f"scripted model: a script item must be a Turn, Response or str, not {item!r}")
        content: list[Block] = [TextBlock(item.text)] if item.text else []
        content += [ToolUseBlock(f"call_{next(self._ids)}", n, dict(a)) for n, a in item.calls]
        stop = "tool_use" if item.calls else "end_turn"
        seen = self._size(received.messages) + len(received.system or "")
        usage = Usage(input_tokens=seen // 4, output_tokens=len(item.text) // 4 + len(item.calls))
        return Response(content, stop, usage, self.model)

    def _size(self, messages: Sequence[Message]) -> int:
        """The bytes of the messages' blocks as JSON, each block on its own, a message's figure kept
        from an earlier call while it holds the very same blocks: the history grows by a message or two
        per call, and a memory window's copies of the messages share their (frozen) blocks, so a call
        encodes only new messages. Kept by the first block's id; the entry holds the blocks, so no id
        in it is reused while it is kept."""
        sizes = self._sizes
        if len(sizes) > _SIZES_KEPT:
            sizes.clear()
        total = 0
        for m in messages:
            blocks = m.content
            if not blocks:
                continue
            kept = sizes.get(id(blocks[0]))
            if kept is None or len(kept[0]) != len(blocks) or not all(map(operator.is_, kept[0], blocks)):
                # one encode of the list, less its brackets and the commas between blocks
                kept = sizes[id(blocks[0])] = (tuple(blocks), len(_encode(blocks)) - len(blocks) - 1)
            total += kept[1]
        return total


def _echo(messages: list[Message], tools: list[ToolSpec]) -> str:
    last = next((m.text for m in reversed(messages) if m.role == "user" and m.text), "")
    return f"[scripted model: no script, echoing] {last}"


def _digest(messages: list[Message]) -> str:
    """The scripted summary: the transcript's user lines, each cut to 60 characters."""
    text = "\n".join(m.text for m in messages)
    said = [line.removeprefix("user: ")[:60] for line in text.splitlines() if line.startswith("user: ")]
    return f"[scripted summary of {len(said)} user lines] " + " | ".join(said)


_NO_DEADLINE: contextlib.nullcontext[None] = contextlib.nullcontext()
"""A call's scope without a timeout: nothing to build per call (a scope without a deadline does nothing)."""

_SIZES_KEPT = 4096  # messages whose size a model keeps; past this it starts again
_encode = msgspec.json.Encoder().encode

