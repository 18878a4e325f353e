"""Conversation memory: the ``Memory`` protocol and ``StoreMemory``, the store-backed default.

``StoreMemory`` keeps one store record per message, keyed ``…/#{seq:012d}`` (messages
of an agent's default conversation under ``agent/{name}/history/``, those of a session
under ``agent/{name}/history/{session}/``), and one small *head* record per session,
``agent/{name}/memory/{session}`` (``#`` for the default conversation), holding the
next sequence number, where the live window starts and which summary comes first.

Replicas: any number of processes serving one agent over a shared store append to one
session safely. An append reserves a block of sequence numbers by a compare-and-set of
the head (``store.write(..., if_version=)``, retried on ``VersionConflict``; no lock is
held across a model call), then writes its messages in order: each run's messages are
one contiguous block, blocks in the order the runs *finished*. Appends of one process
to one session take turns for the reservation only, so they do not fight each other.

Cost: a window read is one head read plus one point read per message of the window
this process does not hold yet, made together; nothing lists the conversation, so it
costs O(window) on every backend however long the session is. A run killed between its
writes leaves a prefix of its block (the window drops a tool call left without its
result) or holes, which are skipped.

Messages this process wrote or read are kept decoded (the last ``window`` of each of its
``cached_sessions`` most recent sessions; appends add to it until it holds twice that): a message record is written once
(create-only) and never changed while its session's head lives, so what a window needs
again comes from here. Each head carries an ``epoch``, a random id given when the head is
created, and each message record the epoch of the head that reserved it: a forgotten
session (deleted by any replica) gets a new head with a new epoch, what was kept of the
old one is dropped, and a record a late append wrote for the old head is not a message of
the new one (its rightful writer writes over it; without a head, no record with an epoch
is read). An older micro rewrites a head without its epoch: the next append takes it back
from the newest message that has one. An append that finds its block taken
by the session's new lifetime stops with ``Conflict``: the session was forgotten while it
ran and its messages are not remembered. A kept message is not used past its expiry
(``retention``). Only the head (and the summary, if any) is read on every window. A window
hands out its own ``Message`` objects (new content lists: editing them changes nothing
kept); the blocks in them are shared with what is kept and must not be changed in place.

Compaction: when a session holds more than ``compact_at`` live messages, the oldest are
folded into one summary by a summariser (the agent's model by default) in the
background, after the reply; the cut always falls at the start of a run, so a tool call
is never separated from its result; the folded messages stay where they are (archived,
``messages(archived=True)``); the head's compare-and-set is the commit point, so a
failure or a cancellation leaves the history as it was.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, Self, runtime_checkable

import anyio
import anyio.abc
import msgspec

from micro.ai import Message, Model, TextBlock, ToolResultBlock, ToolUseBlock
from micro.ai.messages import SUMMARISE_PROMPT
from micro.errors import AgentError, BadRequest, Conflict, RecordNotFound, UsageError, VersionConflict
from micro.store import Record, Store

__all__ = ["CACHED_SESSIONS", "MAX_SESSION_BYTES", "Memory", "StoreMemory", "Summariser", "check_session"]

log = logging.getLogger("micro.agent")

MAX_SESSION_BYTES = 256
"""The longest session id (UTF-8 bytes): keys built from it fit every store backend."""

Summariser = Callable[[list[Message]], str | Awaitable[str]]
"""A function from the messages to fold (a previous summary first, if any) to the summary text."""

_MAX_SUMMARY = 100_000
SUMMARY_HEADER = "[Summary of the earlier conversation, messages {first}-{last}]\n"
"""How a summary message starts (its text follows): the model and ``micro agent history`` see it as such."""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Message).decode


CACHED_SESSIONS = 256
"""The default ``cached_sessions`` of a ``StoreMemory``: sessions whose window it keeps decoded."""


class _Head(msgspec.Struct):
    next: int = 1  # the sequence number the next message gets
    start: int = 1  # the first live (not archived) message
    summary: int = 0  # the summary made when `start` was set (0: none)
    epoch: str = ""  # random, given when the head is created ("": a head of an older micro, nothing kept)


class _Kept:
    """The messages of one session (one head's lifetime: ``epoch``) this process holds:
    seq -> (message, expiry, its call or result ids: see :func:`_ids`)."""

    __slots__ = ("epoch", "messages")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.messages: dict[int, tuple[Message, float | None, set[str]]] = {}


_decode_head = msgspec.json.Decoder(_Head).decode
_NO_HEAD = "-"  # the epoch of a session without a head record (never a uuid's hex)


def check_session(session: str) -> str:
    """``session`` if it can name a conversation, else ``BadRequest`` saying why."""
    if not isinstance(session, str):
        raise BadRequest(f"session must be a string, not {type(session).__name__}")
    if "/" in session or "#" in session:
        raise BadRequest(f"session {session[:80]!r}: '/' and '#' are not allowed in a session id")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in session):
        raise BadRequest(f"session {session[:80]!r}: control characters are not allowed in a session id")
    if len(session.encode()) > MAX_SESSION_BYTES:
        raise BadRequest(f"session {session[:40]!r}…: a session id is at most {MAX_SESSION_BYTES} UTF-8 bytes")
    return session


@runtime_checkable
class Memory(Protocol):
    """What an agent needs of a conversation memory. ``StoreMemory`` is the default.

    The agent calls ``bind`` once when it starts and uses what it returns. A memory of
    your own (a vector store, a memory service) implements these methods; ``session``
    ``""`` is the agent's default conversation.

    Example::

        class Recent:  # keeps the last 20 messages per session in this process
            def __init__(self): self.sessions = {}
            def bind(self, store, agent, model, task_group): return self
            async def window(self, session): return self.sessions.get(session, [])[-20:]
            async def append(self, session, messages): self.sessions.setdefault(session, []).extend(messages)
            async def compact(self, session): return False
            async def forget(self, session): self.sessions.pop(session, None)
            async def messages(self, session="", limit=0, *, archived=False):
                return self.sessions.get(session, [])[-limit:] if limit else self.sessions.get(session, [])
            async def aclose(self): pass

        agent = micro.Agent("bot", memory=Recent())
    """

    def bind(self, store: Store, agent: str, model: Model, task_group: anyio.abc.TaskGroup) -> Memory:
        """This memory for one agent: its store, name, model and a task group for background work."""
        ...

    async def window(self, session: str) -> list[Message]:
        """The messages to send the model before a new one (starting with a user message)."""
        ...

    async def append(self, session: str, messages: Sequence[Message]) -> None:
        """Remember one run's new messages, as one block."""
        ...

    async def compact(self, session: str) -> bool:
        """Fold old messages into a summary if the session is due; True if it did."""
        ...

    async def forget(self, session: str) -> None:
        """Delete everything remembered of ``session``."""
        ...

    async def messages(self, session: str = "", limit: int = 0, *, archived: bool = False) -> list[Message]:
        """The stored messages, oldest first: all live ones (a summary first), the last ``limit``,
        or with ``archived`` everything ever kept, summaries at their places."""
        ...

    async def aclose(self) -> None:
        """Stop background work (the agent calls it when it stops)."""
        ...


class StoreMemory:
    """Conversation memory in the agent's store (see the module docstring).

    Args:
        window: messages of history sent to the model with each ask (after the summary).
        compact_at: live messages in a session above which old ones are folded into a
            summary (0: never).
        keep: messages left live after a compaction (the cut moves back to a run's start).
        summariser: makes the summary: a ``Model``, a function ``(messages) -> str`` (sync
            or async), or None for the agent's own model.
        retention: seconds a message, summary or session head is kept after it was
            written (None: for ever); an idle session is gone ``retention`` after its last ask.
            The agent keeps its finished run records (which hold the run's messages) as long;
            a run that waits or runs is kept until it ends.
        cached_sessions: sessions whose last ``window`` messages this process keeps decoded
            (the least recently used go first; 0: none, every window reads its messages). The
            memory this takes is at most about ``cached_sessions x 2 x window x`` a message's size
            (appends add to a session's window until it holds twice that).

    Example::

        agent = micro.Agent("support", memory=StoreMemory(window=50, compact_at=400, keep=60))
    """

    def __init__(self, window: int = 50, *, compact_at: int = 400, keep: int = 60,
                 summariser: Summariser | Model | None = None, retention: float | None = None,
                 cached_sessions: int = CACHED_SESSIONS) -> None:
        for name, value in (("window", window), ("compact_at", compact_at), ("keep", keep),
                            ("cached_sessions", cached_sessions)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"StoreMemory: {name} must be an int, not {value!r}")
        if window <= 0:
            raise UsageError(f"StoreMemory: window must be at least 1 message, not {window}")
        if compact_at < 0 or keep < 1 or (compact_at and compact_at <= keep):
            raise UsageError(f"StoreMemory: need compact_at > keep >= 1 (or compact_at=0 for never), "
                             f"not compact_at={compact_at}, keep={keep}")
        if cached_sessions < 0:
            raise UsageError(f"StoreMemory: cached_sessions must be 0 or more, not {cached_sessions}")
        if retention is not None and (isinstance(retention, bool) or not isinstance(retention, int | float)
                                      or not 0 < retention < float("inf")):
            raise UsageError(f"StoreMemory: retention must be a positive number of seconds or None, not {retention!r}")
        if summariser is not None and not (isinstance(summariser, Model) or callable(summariser)):
            raise UsageError(f"StoreMemory: summariser must be a Model or a function, not {summariser!r}")
        self.window_size, self.compact_at, self.keep = window, compact_at, keep
        self.summariser, self.retention, self.cached_sessions = summariser, retention, cached_sessions
        self._store: Store | None = None
        self._agent = ""
        self._model: Model | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._reserving: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._compacting: set[str] = set()
        self._scopes: set[anyio.CancelScope] = set()
        self._running: set[anyio.Event] = set()
        self._kept: OrderedDict[str, _Kept] = OrderedDict()

    def bind(self, store: Store, agent: str, model: Model, task_group: anyio.abc.TaskGroup | None = None) -> Self:
        """A copy of this memory for agent ``agent`` (no I/O); compactions run in ``task_group``
        (None: on the appending caller's time)."""
        bound = copy.copy(self)
        bound._store, bound._agent, bound._model, bound._task_group = store, agent, model, task_group
        bound._reserving, bound._compacting, bound._scopes, bound._running = {}, set(), set(), set()
        bound._kept = OrderedDict()
        return bound

    @property
    def store(self) -> Store:
        if self._store is None:
            raise UsageError("StoreMemory is not bound to an agent: use memory.bind(store, agent, model)")
        return self._store

    # -- keys -----------------------------------------------------------------------------------

    def prefix(self, session: str = "") -> str:
        """The key prefix of a session's messages (``""`` is the default conversation)."""
        check_session(session)
        base = f"agent/{self._agent}/history"
        return f"{base}/{session}/#" if session else f"{base}/#"

    def _head_key(self, session: str) -> str:
        return f"agent/{self._agent}/memory/{session or '#'}"

    def _summary_key(self, session: str, at: int) -> str:
        return f"{self._head_key(session)}/summary/{at:012d}"

    async def _head(self, session: str) -> tuple[_Head, int]:
        """The session's head and its version (0: none stored yet)."""
        try:
            [rec] = await self.store.read(self._head_key(session))
        except RecordNotFound:
            # a conversation written before heads existed: continue after its last message (one look)
            last = await self.store.list(self.prefix(session), limit=1, reverse=True)
            return _Head(next=int(last[0].rsplit("#", 1)[1]) + 1 if last else 1, epoch=_NO_HEAD), 0
        return _decode_head(rec.value), rec.version

    async def _read(self, keys: Sequence[str]) -> list[Record | None]:
        """The records under ``keys`` (None where there is none), read together."""

        async def one(key: str) -> Record | None:
            try:
                return (await self.store.read(key))[0]
            except RecordNotFound:
                return None

        if len(keys) <= 1:  # nothing to read beside it: no task to pay for
            return [await one(k) for k in keys]
        return list(await asyncio.gather(*(one(k) for k in keys)))

    def _kept_of(self, session: str, epoch: str) -> _Kept | None:
        """What this process holds of ``session`` under the head ``epoch`` (dropped if the epoch changed)."""
        if not epoch or epoch == _NO_HEAD or not self.cached_sessions:
            self._kept.pop(session, None)
            return None
        kept = self._kept.get(session)
        if kept is not None and kept.epoch == epoch:
            self._kept.move_to_end(session)
            return kept
        kept = self._kept[session] = _Kept(epoch)
        self._kept.move_to_end(session)
        while len(self._kept) > self.cached_sessions:
            self._kept.popitem(last=False)
        return kept

    async def _range(self, session: str, head: _Head, first: int, end: int) -> list[tuple[int, Message]]:
        prefix = self.prefix(session)
        records = await self._read([f"{prefix}{seq:012d}" for seq in range(first, end)])
        return [(seq, _decode(r.value)) for seq, r in zip(range(first, end), records, strict=True)
                if r is not None and _ours(r, head)]

    async def _summary(self, session: str, head: _Head) -> Record | None:
        if not head.summary:
            return None
        [rec] = await self._read([self._summary_key(session, head.summary)])
        return rec

    # -- the protocol -------------------------------------------------------------------------

    async def window(self, session: str, limit: int | None = None) -> list[Message]:
        """The summary (if any), then at most the last ``limit`` (default ``window``) live
        messages, starting at a user message that is not a tool result."""
        limit = self.window_size if limit is None else limit
        head, _ = await self._head(session)
        first = max(head.start, head.next - limit)
        kept = self._kept_of(session, head.epoch)
        held = kept.messages if kept is not None else {}
        now = self.store.clock()
        found: dict[int, tuple[Message, set[str]]] = {}
        missing: list[int] = []
        for seq in range(first, head.next):
            hit = held.get(seq)
            if hit is not None and (hit[1] is None or hit[1] > now):
                found[seq] = hit[0], hit[2]
            else:
                missing.append(seq)
        for seq in [s for s in held if s < first]:  # out of the window now: not needed again
            del held[seq]
        keys = [f"{self.prefix(session)}{seq:012d}" for seq in missing]
        if head.summary:
            keys.append(self._summary_key(session, head.summary))
        records = await self._read(keys)
        summary = records.pop() if head.summary else None
        for seq, rec in zip(missing, records, strict=True):
            if rec is not None and _ours(rec, head):
                m = _decode(rec.value)
                found[seq] = m, (ids := _ids(m))
                if kept is not None:
                    held[seq] = (m, rec.expiry, ids)
        ordered = [found[seq] for seq in sorted(found)] if missing else list(found.values())
        messages = _paired([m for m, _ in ordered], [ids for _, ids in ordered])
        start = 0
        while start < len(messages) and (messages[start].role != "user" or _results(messages[start])):
            start += 1
        # copies: what the caller does with its list and the messages' content lists changes nothing kept
        return ([_decode(summary.value)] if summary is not None else []) + [
            Message(m.role, list(m.content)) for m in messages[start:]]

    async def append(self, session: str, messages: Sequence[Message]) -> None:
        """Append one run's messages as one block (one record each, in order); then, if the
        session is due, start a compaction in the background. Raises ``Conflict`` if the session
        was forgotten (and started afresh) while they were being written: they are not remembered."""
        if not messages:
            return
        prefix = self.prefix(session)
        head = await self._reserve(session, len(messages))
        kept = self._kept_of(session, head.epoch)
        first = head.next - len(messages)
        for seq, m in enumerate(messages, first):
            # the record expires `retention` after the store's clock at the write: no sooner than this
            expiry = None if self.retention is None else self.store.clock() + self.retention
            record = Record(f"{prefix}{seq:012d}", _encode(m), {"epoch": head.epoch})
            try:  # create-only: a message record is never written twice in one head's lifetime
                await self.store.write(record, ttl=self.retention, if_version=0)
            except VersionConflict:
                now, _ = await self._head(session)
                if now.epoch != head.epoch:  # forgotten (and maybe started afresh) since the reservation
                    self._kept.pop(session, None)
                    raise Conflict(
                        f"agent {self._agent}: session {session!r} was forgotten while this run's messages were "
                        f"being appended to it: its {len(messages)} new messages were not remembered "
                        f"({seq - first} of them were written before the forget and went with it); "
                        "an agent's run record keeps them") from None
                # still ours: the key holds a leftover of a late append to a forgotten lifetime of the session
                # (tagged with that lifetime's epoch: no window took it for a message of this one)
                await self.store.write(record, ttl=self.retention)
            if kept is not None:
                kept.messages[seq] = (Message(m.role, list(m.content)), expiry, _ids(m))
        if kept is not None and len(kept.messages) > 2 * self.window_size:  # out of the window: not needed again
            held, last = kept.messages, head.next - self.window_size  # (trimmed by the window: once in a while)
            for seq in [s for s in held if s < last]:
                del held[seq]
        if self.compact_at and head.next - head.start > self.compact_at and session not in self._compacting:
            if self._task_group is None:
                await self._compact_logged(session)
            else:
                self._compacting.add(session)  # one compaction per session per process at a time
                done = anyio.Event()
                self._running.add(done)
                self._task_group.start_soon(self._compact_owned, session, done)

    async def _reserve(self, session: str, count: int) -> _Head:
        """Move the head ``count`` on by compare-and-set; the head after it (the block ends at ``next``)."""
        entry = self._reserving.get(session)
        if entry is None:
            entry = self._reserving[session] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:  # appends of this process take turns here: only other processes conflict
                while True:
                    head, version = await self._head(session)
                    if version and not head.epoch:  # an older micro's head: the epoch it may have dropped
                        head.epoch = await self._epoch_of(session, head)
                    head.next += count
                    if not version or not head.epoch:  # a new head: a new lifetime
                        head.epoch = uuid.uuid4().hex
                    try:
                        await self.store.write(Record(self._head_key(session), _encode(head)),
                                               ttl=self.retention, if_version=version)
                        return head
                    except VersionConflict:
                        continue  # another replica appended first: read the head again
        finally:
            users[0] -= 1
            if not users[0]:
                del self._reserving[session]

    async def _epoch_of(self, session: str, head: _Head) -> str:
        """The epoch of the newest of the head's last ``window`` messages that has one ("" if none has):
        an older micro that rewrote the head (a rolling upgrade) kept its fields, not its epoch."""
        first = max(head.start, head.next - self.window_size)
        records = await self._read([f"{self.prefix(session)}{seq:012d}" for seq in range(first, head.next)])
        return next((r.metadata["epoch"] for r in reversed(records) if r is not None and "epoch" in r.metadata), "")

    async def _compact_owned(self, session: str, done: anyio.Event) -> None:
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                await self._compact_logged(session)
        finally:
            self._scopes.discard(scope)
            self._compacting.discard(session)
            self._running.discard(done)
            done.set()

    async def settle(self) -> None:
        """Wait for the background compactions started so far to end (done, failed or cancelled)."""
        for done in list(self._running):
            await done.wait()

    async def _compact_logged(self, session: str) -> None:
        try:
            await self.compact(session)
        except Exception as exc:  # background work: the history is unchanged, say why
            log.error("agent %s: compacting session %r failed, the history is unchanged: %s",
                      self._agent, session, exc, extra={"micro_agent": self._agent})

    async def compact(self, session: str) -> bool:
        """Fold the session's oldest live messages into a summary if it holds more than
        ``compact_at``; True if it did. Raises ``AgentError`` if the summariser fails or
        returns no text; the history is then unchanged."""
        if not self.compact_at:
            return False
        head, _ = await self._head(session)
        if head.next - head.start <= self.compact_at:
            return False
        found = await self._range(session, head, head.start, head.next)
        cut = _run_start(found, head.next - self.keep)
        if cut is None or cut <= head.start:
            return False
        folded = [m for seq, m in found if seq < cut]
        summary = await self._summary(session, head)
        before = [_decode(summary.value)] if summary is not None else []
        text = await self._summarise(before + folded, session)
        first = int(summary.metadata.get("first", head.start)) if summary is not None else head.start
        message = Message.user(SUMMARY_HEADER.format(first=first, last=cut - 1) + text)
        key = self._summary_key(session, cut)
        await self.store.write(Record(key, _encode(message), {"first": str(first)}), ttl=self.retention)
        while True:  # commit: move the head's start, unless another compaction got there first
            now, version = await self._head(session)
            if now.start != head.start or now.epoch != head.epoch or version == 0:  # compacted elsewhere, forgotten
                if now.summary != cut:  # (a replica that cut at the same place wrote the same key)
                    await self.store.delete(key)
                return False
            now.start, now.summary = cut, cut
            try:
                await self.store.write(Record(self._head_key(session), _encode(now)),
                                       ttl=self.retention, if_version=version)
                return True
            except VersionConflict:
                continue

    async def _summarise(self, messages: list[Message], session: str) -> str:
        how = self.summariser if self.summariser is not None else self._model
        where = f"agent {self._agent} session {session!r}: the summariser"
        try:
            if isinstance(how, Model):
                text: object = (await how.generate([Message.user(transcript(messages))], system=SUMMARISE_PROMPT)).text
            elif how is not None:
                text = how(messages)
                if inspect.isawaitable(text):
                    text = await text
            else:
                raise UsageError("StoreMemory is not bound to an agent: use memory.bind(store, agent, model)")
        except (AgentError, UsageError):
            raise
        except Exception as exc:
            raise AgentError(f"{where} failed: {exc}") from exc
        if not isinstance(text, str) or not text.strip():
            raise AgentError(f"{where} returned {text!r:.80}, not a summary text: nothing was compacted")
        if len(text) > _MAX_SUMMARY or any(unicodedata.category(c) == "Cs" for c in text):
            raise AgentError(f"{where} returned {len(text)} characters that are not a usable summary "
                             f"(over {_MAX_SUMMARY}, or not valid Unicode): nothing was compacted")
        return text.strip()

    async def forget(self, session: str) -> None:
        """Delete the session's messages (live and archived), summaries and head."""
        prefix = self.prefix(session)
        head_key = self._head_key(session)
        self._kept.pop(session, None)
        for key in [*await self.store.list(prefix), *await self.store.list(head_key + "/")]:
            await self.store.delete(key)
        await self.store.delete(head_key)

    async def clear(self, session: str = "") -> None:
        """Same as :meth:`forget`."""
        await self.forget(session)

    async def messages(self, session: str = "", limit: int = 0, *, archived: bool = False) -> list[Message]:
        """The stored messages, oldest first: the live ones (the summary first), the last
        ``limit`` live ones, or with ``archived`` every one kept, each summary before the
        first message it did not fold."""
        if limit < 0:
            raise BadRequest(f"limit must be >= 0, not {limit}")
        head, _ = await self._head(session)
        if archived:
            records = await self.store.read(self.prefix(session), prefix=True)
            summaries = await self.store.read(self._head_key(session) + "/summary/", prefix=True)
            at = {int(r.key.rsplit("/", 1)[1]): _decode(r.value) for r in summaries}
            out: list[Message] = []
            for r in records:
                if not _ours(r, head):
                    continue
                seq = int(r.key.rsplit("#", 1)[1])
                if seq in at:
                    out.append(at.pop(seq))
                out.append(_decode(r.value))
            return out + [at[k] for k in sorted(at)]
        first = max(head.start, head.next - limit) if limit else head.start
        found = await self._range(session, head, first, head.next)
        summary = None if limit else await self._summary(session, head)
        return ([_decode(summary.value)] if summary is not None else []) + [m for _, m in found]

    async def aclose(self) -> None:
        """Cancel compactions under way (each leaves the history as it was)."""
        for scope in list(self._scopes):
            scope.cancel()


def transcript(messages: Sequence[Message]) -> str:
    """The messages as plain text for a summariser: one line per block."""
    lines = []
    for m in messages:
        for b in m.content:
            if isinstance(b, TextBlock):
                lines.append(f"{m.role}: {b.text}")
            elif isinstance(b, ToolUseBlock):
                lines.append(f"{m.role} called {b.name}({msgspec.json.encode(b.input).decode()})")
            elif isinstance(b, ToolResultBlock):
                lines.append(f"tool result: {b.content}")
    return "\n".join(lines)


def _run_start(found: list[tuple[int, Message]], at: int) -> int | None:
    """The sequence number of the first run start (a user message that is not a tool
    result) at or before ``at``: a cut there separates no tool call from its result."""
    starts = [seq for seq, m in found if seq <= at and m.role == "user" and not _results(m)]
    return starts[-1] if starts else None


def _ours(record: Record, head: _Head) -> bool:
    """Whether a message record belongs to the head's lifetime (not a leftover of a late append to a
    forgotten one); a record or head of an older micro has no epoch and is taken as it is. Without a
    head, a record with an epoch is a leftover (a head is written before its messages)."""
    return not head.epoch or record.metadata.get("epoch", head.epoch) == head.epoch


def _results(m: Message) -> set[str]:
    return {b.tool_use_id for b in m.content if isinstance(b, ToolResultBlock)}


def _uses(m: Message) -> set[str]:
    return {b.id for b in m.content if isinstance(b, ToolUseBlock)}


def _ids(m: Message) -> set[str]:
    """A message's call ids (an assistant's) or result ids (a user's)."""
    return _uses(m) if m.role == "assistant" else _results(m)


def _paired(messages: list[Message], ids: list[set[str]] | None = None) -> list[Message]:
    """Drop tool calls without results and results without calls (left by a cut or a crash).

    ``ids``: each message's :func:`_ids`, if known already (a window keeps them with the messages)."""
    if ids is None:
        ids = [_ids(m) for m in messages]
    out: list[Message] = []
    asked: set[str] = set()  # the calls of the message last kept, if it is an assistant's
    for i, m in enumerate(messages):
        if m.role == "assistant" and (uses := ids[i]):
            answered = ids[i + 1] if i + 1 < len(messages) and messages[i + 1].role == "user" else set()
            if not uses <= answered:
                m = Message("assistant", [b for b in m.content if not isinstance(b, ToolUseBlock)])
        elif m.role == "user" and (results := ids[i]):
            if not results <= asked:
                m = Message("user", [b for b in m.content
                                     if not (isinstance(b, ToolResultBlock) and b.tool_use_id not in asked)])
        if m.content:
            out.append(m)
            asked = (ids[i] if m is messages[i] else _uses(m)) if m.role == "assistant" else set()
    return out

