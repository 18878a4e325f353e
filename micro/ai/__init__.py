"""Models for agents and flows: one message model, many providers.

``micro.ai`` is the layer between the agent loop and a model API. Code speaks
the neutral message model (:class:`Message` of :class:`TextBlock`,
:class:`ToolUseBlock` and :class:`ToolResultBlock`; :class:`Response` with
:class:`Usage`) to a :class:`Model`, and a provider translates:

- ``anthropic``: Claude via the official SDK, with prompt caching;
- ``openai``: any OpenAI-compatible chat-completions server (OpenAI, Ollama, vLLM, llama.cpp);
- ``scripted``: deterministic turns or a function, for tests and key-free demos.

Example::

    from micro.ai import Message, from_provider

    async with from_provider("anthropic") as model:      # reads ANTHROPIC_API_KEY
        rsp = await model.generate([Message.user("What is 2 + 2?")], system="Be brief.")
        print(rsp.text, rsp.usage)

The SDK-backed providers are imported only when asked for, so ``micro.ai``
works without the ``anthropic`` / ``openai`` extras.
"""

from __future__ import annotations

from . import scripted
from ._base import OFFLINE_ENV, PROVIDERS, Model, from_provider, known_providers
from .messages import (
    INVALID_JSON,
    SUMMARISE_PROMPT,
    Block,
    Done,
    Message,
    Response,
    Role,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseDelta,
    ToolUseStart,
    Usage,
    parse_tool_input,
)

__all__ = [
    "INVALID_JSON",
    "OFFLINE_ENV",
    "PROVIDERS",
    "SUMMARISE_PROMPT",
    "Block",
    "Done",
    "Message",
    "Model",
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
    "from_provider",
    "known_providers",
    "parse_tool_input",
    "scripted",
]
