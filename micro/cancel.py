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
soon as it has left it, looked at every :data:`POLL` seconds. Nothing is paid per call: a
per-call ``anyio.CancelScope`` costs ~4–5 µs per task on CPython 3.11, most of the native
server's whole cost of a call; this looks at anyio's state only when a call is cancelled.

It reads anyio's record of each task's cancel scopes (``_task_states`` of its asyncio
backend, each scope's ``_parent_scope``): private names, checked at import
(:data:`SHIELDS`, asserted by a test). Without them it cancels at once, as ``Task.cancel()``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

try:
    from anyio._backends import _asyncio as _anyio

    _STATES: Any = _anyio._task_states
    SHIELDS = "_parent_scope" in _anyio.CancelScope.__slots__ and "cancel_scope" in _anyio.TaskState.__slots__
except (ImportError, AttributeError):  # another anyio: cancel at once (a test says so)
    _STATES = None
    SHIELDS = False

POLL = 0.005
"""Seconds between looks at a cancelled task that is still inside a shielded scope."""

__all__ = ["POLL", "SHIELDS", "cancel", "scope_of", "shielded"]


def scope_of(task: asyncio.Task[Any]) -> object | None:
    """The anyio cancel scope ``task`` is in now (``None``: none), to pass to :func:`cancel` as ``base`` when
    the work to cancel later starts here, inside scopes entered before it (which it must not look at)."""
    if not SHIELDS:
        return None
    state = _STATES.get(task)
    return None if state is None else state.cancel_scope


def shielded(task: asyncio.Task[Any], base: object | None = None) -> bool:
    """Whether ``task`` is inside a shielded anyio cancel scope entered since ``base``."""
    scope = scope_of(task)
    while scope is not None and scope is not base:
        if scope.shield:  # type: ignore[attr-defined]
            return True
        scope = scope._parent_scope  # type: ignore[attr-defined]
    return False


def cancel(task: asyncio.Task[Any], base: object | None = None, *, active: Callable[[], bool] | None = None,
           delivered: Callable[[], None] | None = None) -> None:
    """Cancel ``task`` now, or once it has left the shielded anyio scopes it entered since ``base`` (``None``:
    the work is the whole task). ``active`` says whether the cancellation still stands: a deferred one is
    dropped when it says no (the work ended meanwhile, and the task went on to other things);
    ``delivered`` is called just before ``Task.cancel()``."""
    if task.done() or (active is not None and not active()):
        return
    if SHIELDS and shielded(task, base):
        task.get_loop().call_later(POLL, functools.partial(cancel, task, base, active=active, delivered=delivered))
        return
    if delivered is not None:
        delivered()
    task.cancel()
