"""The provider-neutral message model every ``micro.ai`` provider speaks.

A conversation is a list of :class:`Message` values, each a role and a list of
content blocks: :class:`TextBlock`, :class:`ToolUseBlock` (the model asks for a
tool) and :class:`ToolResultBlock` (the answer, sent back in a user message). A
model call returns a :class:`Response`; a streaming call yields
:data:`StreamEvent` values and ends with :class:`Done`. All of them are frozen
msgspec Structs tagged with a ``type`` field, so a history encodes to JSON and
decodes back losslessly::

    data = msgspec.json.encode(history)
    history = msgspec.json.decode(data, type=list[Message])

Providers translate these values to and from their wire formats; nothing in here
knows about any provider.

Tool arguments a model produced that are not a JSON object never raise: the
block keeps the raw text under :data:`INVALID_JSON` (``{"__invalid_json__": raw}``)
and :attr:`ToolUseBlock.invalid_json` returns it, so the agent loop can answer
with an ``is_error`` result and let the model try again.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

__all__ = [
    "INVALID_JSON",
    "SUMMARISE_PROMPT",
    "Block",
    "Done",
    "Message",
    "Response",
    "Role",
    "StreamEvent",
    "TextBlock",
    "TextDelta",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "ToolUseDelta",
    "ToolUseStart",
    "Usage",
    "parse_tool_input",
    "writable",
]

INVALID_JSON = "__invalid_json__"
"""Key of the marker input a :class:`ToolUseBlock` carries when its arguments were not JSON."""

Role = Literal["user", "assistant"]

SUMMARISE_PROMPT = (
    "Summarise the conversation below for your own later use: the user's goals, facts and "
    "decisions, what tools were called and what they returned that still matters, and what is "
    "still open. Be concise; write the summary only."
)
"""The system prompt of a summarisation request (agent memory compaction); the scripted model
answers it with a deterministic digest."""


class TextBlock(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    """Plain text from the user or the model."""

    text: str


class ToolUseBlock(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type"):
    """The model asks to run tool ``name`` with ``input``; ``id`` pairs it with its result."""

    id: str
    name: str
    input: dict[str, Any]

    @property
    def invalid_json(self) -> str | None:
        """The raw arguments text when the model's arguments were not a JSON object, else None.

        The agent loop answers such a call with
        ``ToolResultBlock(block.id, "…not valid JSON…", is_error=True)`` instead of running it.
        """
        raw = self.input.get(INVALID_JSON) if len(self.input) == 1 else None
        return raw if isinstance(raw, str) else None


class ToolResultBlock(msgspec.Struct, frozen=True, tag="tool_result", tag_field="type"):
    """What a tool returned (or why it failed, with ``is_error``), sent in a user message."""

    tool_use_id: str
    content: str
    is_error: bool = False


Block = TextBlock | ToolUseBlock | ToolResultBlock


class Message(msgspec.Struct, frozen=True):
    """One turn of a conversation.

    Example::

        history = [Message.user("What is overdue?")]
        rsp = await model.generate(history, tools=tools)
        history.append(rsp.message)
    """

    role: Role
    content: list[Block]

    @classmethod
    def user(cls, *content: str | Block) -> Message:
        """A user message; strings become text blocks (tool results go here too)."""
        return cls("user", _blocks(content))

    @classmethod
    def assistant(cls, *content: str | Block) -> Message:
        """An assistant message; strings become text blocks."""
        return cls("assistant", _blocks(content))

    @property
    def text(self) -> str:
        """The text blocks joined together."""
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))


def _blocks(content: tuple[str | Block, ...]) -> list[Block]:
    return [TextBlock(c) if isinstance(c, str) else c for c in content]


class Usage(msgspec.Struct, frozen=True):
    """Tokens a call used. ``input_tokens`` excludes the cached ones, as Anthropic counts them.

    Usages add up: ``total = sum(usages, Usage())``.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )


class Response(msgspec.Struct, frozen=True):
    """A finished model turn.

    ``stop_reason`` is normalised across providers: ``"end_turn"``, ``"tool_use"``,
    ``"max_tokens"``, ``"stop_sequence"``, ``"refusal"``; anything else is passed
    through as the provider said it. ``model`` is the model id that answered.
    """

    content: list[Block]
    stop_reason: str
    usage: Usage
    model: str

    @property
    def text(self) -> str:
        """The text blocks joined together ("" when the model only called tools)."""
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        """The tool calls of this turn, in the order the model made them."""
        return [b for b in self.content if isinstance(b, ToolUseBlock)]

    @property
    def message(self) -> Message:
        """This turn as an assistant message, to append to the history."""
        return Message("assistant", list(self.content))


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool the model may call: ``input_schema`` is a JSON Schema of an object."""

    name: str
    description: str
    input_schema: dict[str, Any]


# --- streaming -------------------------------------------------------------


class TextDelta(msgspec.Struct, frozen=True, tag="text_delta", tag_field="type"):
    """More text of the answer, as the provider sent it."""

    text: str


class ToolUseStart(msgspec.Struct, frozen=True, tag="tool_use_start", tag_field="type"):
    """The model started a tool call; its arguments follow, the block is in ``Done``."""

    id: str
    name: str


class ToolUseDelta(msgspec.Struct, frozen=True, tag="tool_use_delta", tag_field="type"):
    """A piece of a tool call's JSON arguments (for progress display only)."""

    id: str
    partial_json: str


class Done(msgspec.Struct, frozen=True, tag="done", tag_field="type"):
    """The last event of every stream: the whole turn, as ``generate`` would return it."""

    response: Response


StreamEvent = TextDelta | ToolUseStart | ToolUseDelta | Done


MAX_TOOL_INPUT_DEPTH = 128
"""Tool arguments nested deeper than this are refused as invalid (no tool needs them; they would
overflow the stack of every encoder that writes them into a history or a run record)."""


def parse_tool_input(raw: str) -> dict[str, Any]:
    """Tool arguments from the JSON text a model produced; never raises.

    An empty string is ``{}``; text that is not a JSON object, or an object that could
    not be written back as JSON (a lone surrogate such as ``"\\ud800"``, nesting deeper
    than :data:`MAX_TOOL_INPUT_DEPTH`), becomes the :data:`INVALID_JSON` marker (see
    :attr:`ToolUseBlock.invalid_json`).
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack allows
        return {INVALID_JSON: raw}
    return value if isinstance(value, dict) and writable(value) else {INVALID_JSON: raw}


def writable(value: Any) -> bool:
    """Whether a decoded JSON value encodes back to JSON: no lone surrogates, bounded nesting."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict | list):
            if depth >= MAX_TOOL_INPUT_DEPTH:
                return False
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True
