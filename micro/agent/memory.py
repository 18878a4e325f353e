"""Conversation history in the store, appended per message.

Messages of an agent's default conversation live under ``agent/{name}/history``,
those of a session under ``agent/{name}/history/{session}``; each message is one
record keyed ``…/#{seq:012d}``, so appending costs one write whatever the length
of the history, and reading the window is one prefix read of the last N records.
The window never starts between a tool call and its result.
"""

from __future__ import annotations

import msgspec

from micro.ai import Message, ToolResultBlock
from micro.store import Record, Store

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Message).decode


class History:
    """The conversation memory of one agent."""

    def __init__(self, store: Store, agent: str) -> None:
        self.store = store
        self.base = f"agent/{agent}/history"
        self._next: dict[str, int] = {}

    def prefix(self, session: str = "") -> str:
        """The key prefix of a session's messages (``""`` is the default conversation)."""
        if "/" in session or "#" in session:
            raise ValueError(f"session {session!r}: '/' and '#' are not allowed in a session id")
        return f"{self.base}/{session}/#" if session else f"{self.base}/#"

    async def _seq(self, session: str) -> int:
        nxt = self._next.get(session)
        if nxt is None:
            last = await self.store.list(self.prefix(session), limit=1, reverse=True)
            nxt = int(last[0].rsplit("#", 1)[1]) + 1 if last else 1
        self._next[session] = nxt + 1
        return nxt

    async def append(self, session: str, messages: list[Message]) -> None:
        """Append messages (one record each)."""
        prefix = self.prefix(session)
        for m in messages:
            seq = await self._seq(session)
            await self.store.write(Record(f"{prefix}{seq:012d}", _encode(m)))

    async def window(self, session: str, limit: int) -> list[Message]:
        """The last ``limit`` messages, starting at a user message that is not a tool result."""
        records = await self.store.read(self.prefix(session), prefix=True, limit=limit, reverse=True)
        messages = [_decode(r.value) for r in reversed(records)]
        while messages and (messages[0].role != "user" or _has_results(messages[0])):
            messages.pop(0)
        return messages

    async def clear(self, session: str = "") -> None:
        for key in await self.store.list(self.prefix(session)):
            await self.store.delete(key)
        self._next.pop(session, None)


def _has_results(m: Message) -> bool:
    return any(isinstance(b, ToolResultBlock) for b in m.content)
