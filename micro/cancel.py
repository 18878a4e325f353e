"""Cancelling a task from outside the way an anyio cancel scope around it would.

``Task.cancel()`` throws ``CancelledError`` into a task wherever it waits, also inside an
``anyio.CancelScope(shield=True)``: a handler that shields its clean-up or a store write is
cut anyway. anyio never does that: a cancelled scope holds its cancellation back while the
task is inside a shielded scope within it, and delivers it once the task is out. micro
cancels the work of a call from outside in these places — the native wire server (a
caller's ``CANCEL``, a lost connection, a drain past its grace), the gRPC server (a reset
stream, a lost connection, a stop past its grace), and the deadline
:class:`~micro.deadlines.Watchdog` (the native and gRPC servers' calls, the in-process path) —
and all of them go through :func:`cancel`, which does the same: at once when the task is in no
shielded scope entered since ``base`` (the scope the cancelled work started in), else as
soon as it has left it, looked at after :data:`POLL` seconds, then twice as long each time up to
:data:`POLL_MAX` (a thousand tasks held in long sections cost little). Nothing is paid per call: a
per-call ``anyio.CancelScope`` costs ~4–5 µs per task on CPython 3.11, most of the native
server's whole cost of a call; this looks at anyio's state only when a call is cancelled.

A task has at most one timer looking at it however often it is cancelled (a flood of a
caller's ``CANCEL`` frames, a deadline and a lost connection together): the cancellations
held back join one record, and the looks end when the task is done, when no cancellation
still stands, or when its owner gives up waiting (:func:`cut`).

It reads anyio's record of each task's cancel scopes (``_task_states`` of its asyncio
backend, each scope's ``_parent_scope``): private names, checked at import on instances
(:data:`SHIELDS`, asserted by a test; anyio 4.6 to 4.16 have them). Without them it cancels
at once, as ``Task.cancel()``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from anyio._backends import _asyncio as _anyio

log = logging.getLogger("micro.cancel")

DEFAULT_SHIELD_TIMEOUT = 5.0
"""Seconds a stopping server waits for a cancelled handler to leave its shielded section before it cuts it."""


def readable(backend: Any) -> bool:
    """Whether ``backend`` (anyio's asyncio backend module) keeps the record :func:`shielded` reads: a
    ``_task_states`` map to ``TaskState`` objects with a ``cancel_scope``, scopes with ``shield`` and
    ``_parent_scope``. Looked for on instances: anyio declares ``__slots__`` only from 4.14 and sets the same
    attributes in every 4.x (4.6, the lowest ``pyproject.toml`` allows, included)."""
    try:
        scope = backend.CancelScope()
        return (isinstance(backend._task_states, Mapping) and hasattr(scope, "shield")
                and hasattr(scope, "_parent_scope") and hasattr(backend.TaskState(None, None), "cancel_scope"))
    except (AttributeError, TypeError):
        return False


SHIELDS = readable(_anyio)
"""Whether cancellations respect anyio shields here (asserted by a test); without, they are ``Task.cancel()``."""
_STATES: Any = _anyio._task_states if SHIELDS else None

POLL = 0.005
"""Seconds before the first look at a cancelled task inside a shielded scope; each next one waits twice as long."""
POLL_MAX = 0.1
"""The longest wait between two looks at a task still inside a shielded scope: how late, at most, a held
cancellation is delivered after the section's end."""

__all__ = ["DEFAULT_SHIELD_TIMEOUT", "POLL", "POLL_MAX", "SHIELDS", "cancel", "cut", "pending", "readable",
           "scope_of", "shielded", "stop_all"]

_Request = tuple[object | None, Callable[[], bool] | None, Callable[[], None] | None]  # base, active, delivered

_HELD: weakref.WeakKeyDictionary[asyncio.Task[Any], _Held] = weakref.WeakKeyDictionary()
"""The tasks whose cancellation is held back (they are in a shielded scope): their one timer and requests."""


class _Held:
    __slots__ = ("delay", "requests", "timer")

    def __init__(self) -> None:  # no reference to its task: the weak key would never go
        self.requests: list[_Request] = []
        self.timer: asyncio.TimerHandle | None = None
        self.delay = POLL  # until the next look: doubled after each, up to POLL_MAX


def scope_of(task: asyncio.Task[Any]) -> object | None:
    """The anyio cancel scope ``task`` is in now (``None``: none), to pass to :func:`cancel` as ``base`` when
    the work to cancel later starts here, inside scopes entered before it (which it must not look at)."""
    if not SHIELDS:
        return None
    state = _STATES.get(task)
    return None if state is None else state.cancel_scope


def shielded(task: asyncio.Task[Any], base: object | None = None) -> bool:
    """Whether ``task`` is inside a shielded anyio cancel scope entered since ``base`` (``None``: any). When the
    task is no longer inside ``base``, the scopes it is in are not the work's: none counts."""
    scope = scope_of(task)
    found = False
    while scope is not None:
        if scope is base:
            return found
        found = found or bool(scope.shield)  # type: ignore[attr-defined]
        scope = scope._parent_scope  # type: ignore[attr-defined]
    return found and base is None


def pending(task: asyncio.Task[Any]) -> bool:
    """Whether a cancellation of ``task`` is held back until it leaves a shielded scope."""
    return task in _HELD


def cancel(task: asyncio.Task[Any], base: object | None = None, *, active: Callable[[], bool] | None = None,
           delivered: Callable[[], None] | None = None) -> None:
    """Cancel ``task`` now, or once it has left the shielded anyio scopes it entered since ``base`` (``None``:
    the work is the whole task). ``active`` says whether the cancellation still stands: a deferred one is
    dropped when it says no (the work ended meanwhile, and the task went on to other things);
    ``delivered`` is called just before ``Task.cancel()``.

    Cancelling a task whose cancellation is held back already adds no timer: the same request again is
    one request, another joins the held ones (each delivered when the task is out of its shields, with a
    ``Task.cancel()`` of its own: a deadline's watch that ``uncancel()``s its one leaves the others standing)."""
    if task.done() or (active is not None and not active()):
        return
    if SHIELDS and shielded(task, base):
        held = _HELD.get(task)
        if held is None:
            held = _HELD[task] = _Held()
            held.timer = task.get_loop().call_later(held.delay, _look, task)
        request = (base, active, delivered)
        if request not in held.requests:
            held.requests.append(request)
        return
    if delivered is not None:
        delivered()
    task.cancel()


def cut(task: asyncio.Task[Any]) -> None:
    """``Task.cancel()`` now, shielded or not, and stop looking at it: its owner waited long enough for the
    shielded section (a stop past its bound). The cancellations held back are dropped, not delivered."""
    held = _HELD.pop(task, None)
    if held is not None and held.timer is not None:
        held.timer.cancel()
    if not task.done():
        task.cancel()


def _look(task: asyncio.Task[Any]) -> None:
    held = _HELD.get(task)
    if held is None:
        return
    held.timer = None
    if task.done():
        del _HELD[task]
        return
    ready: list[_Request] = []
    waiting: list[_Request] = []
    for request in held.requests:
        base, active, _ = request
        if active is not None and not active():
            continue  # the work ended meanwhile
        (waiting if shielded(task, base) else ready).append(request)
    held.requests = waiting
    if waiting:
        held.delay = min(2 * held.delay, POLL_MAX)
        held.timer = task.get_loop().call_later(held.delay, _look, task)
    else:
        del _HELD[task]
    for _, _, delivered in ready:  # one Task.cancel() each: a watch's uncancel() takes back its own alone
        if delivered is not None:
            delivered()
        task.cancel()


async def stop_all(tasks: Mapping[asyncio.Task[Any], str], bound: float, where: str) -> set[asyncio.Task[Any]]:
    """A stopping server's last word on the calls still running after its grace: cancel each (after its
    shielded section, :func:`cancel`), wait ``bound`` seconds for them, then cut those still in a shielded
    section (:func:`cut`, logged with the call's name from ``tasks``) and wait ``bound`` once more.

    Returns the tasks that still run (their handler caught the cancellation and went on: logged as an
    error); the server stops without them. ``where`` names the server in the log lines."""
    left = [t for t in tasks if not t.done()]
    for t in left:
        cancel(t)
    if not left:
        return set()
    _, still = await asyncio.wait(left, timeout=bound)
    if not still:
        return set()
    for t in still:
        log.warning("%s: %s: the handler was still in a shielded section %g s after the stopping server "
                    "cancelled it: cut (Task.cancel())", where, tasks[t], bound)
        cut(t)
    _, still = await asyncio.wait(still, timeout=bound)
    for t in still:
        log.error("%s: %s: the handler went on after it was cancelled with Task.cancel() (does it catch "
                  "CancelledError?): the server stops without it", where, tasks[t])
    return still
