"""Conversation history in the store, appended per message.

Messages of an agent's default conversation live under ``agent/{name}/history``,
those of a session under ``agent/{name}/history/{session}``; each message is one
record keyed ``…/#{seq:012d}``, so appending costs one write per message whatever
the length of the history, and reading the window is one prefix read of the last
N records.

The messages of one run get one contiguous block of sequence numbers, reserved
before the first write, so concurrent runs in one session never interleave their
messages. The writes go in order, so a process killed mid-append leaves a prefix
of the run; :meth:`History.window` drops what such a cut leaves dangling (a tool
call without its result) and never starts on a tool result, since a model API
rejects a conversation that does.

The sequence counter is kept in memory once read: one process should own an
agent's history (replicas of an agent sharing a store should use sessions).
"""

from __future__ import annotations

import msgspec

from micro.ai import Message, ToolResultBlock, ToolUseBlock
from micro.errors import BadRequest
from micro.store import Record, Store

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Message).decode


class History:
    """The conversation memory of one agent.

    Example::

        history = History(runtime.store, "task-mgr")
        await history.append("", [Message.user("Hi"), Message.assistant("Hello")])
        assert len(await history.window("", 50)) == 2
    """

    def __init__(self, store: Store, agent: str) -> None:
        self.store = store
        self.base = f"agent/{agent}/history"
        self._next: dict[str, int] = {}

    def prefix(self, session: str = "") -> str:
        """The key prefix of a session's messages (``""`` is the default conversation)."""
        if "/" in session or "#" in session:
            raise BadRequest(f"session {session!r}: '/' and '#' are not allowed in a session id")
        return f"{self.base}/{session}/#" if session else f"{self.base}/#"

    async def _reserve(self, session: str, count: int) -> int:
        """The first of ``count`` consecutive sequence numbers, reserved for one caller."""
        nxt = self._next.get(session)
        if nxt is None:
            last = await self.store.list(self.prefix(session), limit=1, reverse=True)
            found = int(last[0].rsplit("#", 1)[1]) + 1 if last else 1
            # another append (or a window read) may have set it while this one waited for the store
            nxt = self._next.get(session, found)
        self._next[session] = nxt + count
        return nxt

    async def append(self, session: str, messages: list[Message]) -> None:
        """Append messages (one record each, in order)."""
        if not messages:
            return
        prefix = self.prefix(session)
        first = await self._reserve(session, len(messages))
        for seq, m in enumerate(messages, first):
            await self.store.write(Record(f"{prefix}{seq:012d}", _encode(m)))

    async def window(self, session: str, limit: int) -> list[Message]:
        """At most the last ``limit`` messages, starting at a user message that is not a tool result."""
        records = await self.store.read(self.prefix(session), prefix=True, limit=limit, reverse=True)
        if limit:  # the newest key is the last sequence number: the next append need not look it up
            self._next.setdefault(session, int(records[0].key.rsplit("#", 1)[1]) + 1 if records else 1)
        messages = _paired([_decode(r.value) for r in reversed(records)])
        start = 0
        while start < len(messages) and (messages[start].role != "user" or _results(messages[start])):
            start += 1
        return messages[start:]

    async def messages(self, session: str = "", limit: int = 0) -> list[Message]:
        """The stored messages of a session, oldest first: all of them, or the last ``limit``."""
        if limit:
            records = await self.store.read(self.prefix(session), prefix=True, limit=limit, reverse=True)
            records.reverse()
        else:
            records = await self.store.read(self.prefix(session), prefix=True)
        return [_decode(r.value) for r in records]

    async def clear(self, session: str = "") -> None:
        """Forget a session's messages."""
        for key in await self.store.list(self.prefix(session)):
            await self.store.delete(key)
        self._next.pop(session, None)


def _results(m: Message) -> set[str]:
    return {b.tool_use_id for b in m.content if isinstance(b, ToolResultBlock)}


def _uses(m: Message) -> set[str]:
    return {b.id for b in m.content if isinstance(b, ToolUseBlock)}


def _paired(messages: list[Message]) -> list[Message]:
    """Drop tool calls without results and results without calls (left by a cut or a crash)."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and (uses := _uses(m)):
            nxt = messages[i + 1] if i + 1 < len(messages) else None
            answered = _results(nxt) if nxt is not None and nxt.role == "user" else set()
            if not uses <= answered:
                m = Message("assistant", [b for b in m.content if not isinstance(b, ToolUseBlock)])
        elif m.role == "user" and (results := _results(m)):
            asked = _uses(out[-1]) if out and out[-1].role == "assistant" else set()
            if not results <= asked:
                m = Message("user", [b for b in m.content
                                     if not (isinstance(b, ToolResultBlock) and b.tool_use_id not in asked)])
        if m.content:
            out.append(m)
    return out
