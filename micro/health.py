"""Whether a runtime's backends answer: checked every few seconds and on demand, one log line per change.

A runtime's :class:`Backends` asks each of its registry, store and broker a cheap
question (a registry lookup, a one-key store listing, the broker's
:meth:`~micro.broker.Broker.check`) with a two-second bound, every ``interval``
seconds (a supervised background task of the runtime) and whenever a readiness
probe asks (``/health/ready``). ``problems`` holds what is down and why. A backend
going down is logged once (a warning naming it and the reason) and its return once
(info), never once per check or per call.

A backend that errs is down at once; one that only takes longer than the bound is
*slow* the first time (logged at info, nothing changes) and down if its next check
fails too, so one slow answer does not take the node out. Checks overlap (the periodic
one and readiness probes): only a check begun after the slow one ended can turn slow
into down, not one that waited through the same stall. Task names and errors in the
answer have their URLs' passwords masked (readiness probes are unauthenticated). The runtime's supervised
background work (:attr:`supervised`: its registry watch, the checks themselves)
counts too: a task failing :data:`FAILURES_NOT_READY` times in a row is a problem
(``failing``: which task, since when, the last error) until it has run without
failing long enough for its supervisor to call it recovered.

Listeners hear each change of the whole (``True``: everything answers): every
service of the runtime turns its gRPC health to NOT_SERVING while a backend is
down, so balancers and Kubernetes probes take the node out, and back to SERVING
when it answers again. Calls that need a backend that is down still fail on their
own, fast, with ``Unavailable`` naming it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from micro.errors import NotFound
from micro.resource import redact

if TYPE_CHECKING:
    from micro.runtime import Runtime
    from micro.tasks import BackgroundTasks

__all__ = ["CHECK_TIMEOUT", "DEFAULT_INTERVAL", "FAILURES_NOT_READY", "Backends"]

log = logging.getLogger("micro.health")

CHECK_TIMEOUT = 2.0
"""Seconds a backend has to answer a check."""
DEFAULT_INTERVAL = 5.0
"""Seconds between the checks a runtime makes by itself."""
FAILURES_NOT_READY = 2
"""Failures in a row of a supervised background task that make its runtime not ready."""

_PROBE = "micro-health-check"  # a service name nobody registers: the registry answers "not found"


class Backends:
    """The registry, store and broker of one runtime: are they answering?

    Args:
        runtime: whose backends.
        interval: seconds between checks while the runtime is open (:meth:`watch`).
    """

    def __init__(self, runtime: Runtime, interval: float = DEFAULT_INTERVAL) -> None:
        self.runtime = runtime
        self.interval = interval
        self.problems: dict[str, str] = {}
        """Backends that did not answer the last check, with why (``{"store": "store postgresql://…: …"}``)."""
        self.failing: dict[str, str] = {}
        """Supervised background work failing in a row at the last check, with since when and why."""
        self.supervised: set[BackgroundTasks] = set()
        """Background work whose failure streaks count (:attr:`micro.tasks.BackgroundTasks.failing`)."""
        self.listeners: set[Callable[[bool], None]] = set()
        """Called with ``True`` / ``False`` when all backends start / stop answering."""
        self._told = True  # what the listeners last heard (checks may overlap: compare with this, not a start)
        self._slow: dict[str, int] = {}
        # backends whose last check only timed out (once: slow, not down), each with how many probes had
        # started when it did: only a probe started after that (not one overlapping the slow one) turns
        # slow into down
        self._probes = 0  # probes started so far (checks overlap: the 5 s watch and readiness probes)

    @property
    def ok(self) -> bool:
        """Every backend answered the last check and no supervised work is failing."""
        return not self.problems and not self.failing

    async def check(self) -> list[str]:
        """Ask every backend now; update :attr:`problems` (logging what changed) and return them."""
        rt = self.runtime
        probes: dict[str, tuple[str, Callable[[], Awaitable[object]]]] = {
            "registry": (rt.registry.url, self._registry),
            "store": (getattr(rt.store, "url", ""), lambda: rt.store.list("micro/", limit=1)),
            "broker": (rt.broker.url, rt.broker.check),
        }
        for name, (url, probe) in probes.items():
            self._probes += 1
            began = self._probes
            try:
                with anyio.fail_after(CHECK_TIMEOUT):
                    await probe()
            except Exception as exc:
                slow = isinstance(exc, TimeoutError)
                why = f"no answer within {CHECK_TIMEOUT:g} s" if slow else _scrub(str(exc))
                where = redact(url)
                problem = (why if where and where in why else f"{name} {where}: {why}")[:300]
                if slow and name not in self.problems:
                    if name not in self._slow:
                        self._slow[name] = self._probes  # once is slow, not down: down if the next check fails too
                        log.info("runtime: %s was slow: %s (unavailable if the next check fails too)", name,
                                 problem)
                        continue
                    if began <= self._slow[name]:
                        continue  # began during the same slow episode (an overlapping check): still just slow
                self._slow.pop(name, None)
                if name not in self.problems:
                    log.warning("runtime: %s is unavailable: %s (logged again when it answers)", name, problem)
                self.problems[name] = problem
            else:
                self._slow.pop(name, None)
                if self.problems.pop(name, None) is not None:
                    log.info("runtime: %s %s answers again", name, redact(url))
        # the probe's answer is unauthenticated: a task's name or error may hold a backend's URL
        self.failing = {_scrub(f"{tasks.name}: {name}"): _streak(f.since, f.failures, _scrub(f.error))
                        for tasks in list(self.supervised) for name, f in tasks.failing.items()
                        if f.failures >= FAILURES_NOT_READY}
        if self.ok != self._told:
            self._told = self.ok
            for listener in list(self.listeners):
                listener(self.ok)
        return ([f"{name} unavailable: {why}" for name, why in self.problems.items()]
                + [f"{what}: {why}" for what, why in self.failing.items()])

    async def _registry(self) -> None:
        try:
            await self.runtime.registry.get(_PROBE)
        except NotFound:
            pass  # answered

    async def watch(self) -> None:
        """Check every :attr:`interval` seconds (the runtime supervises this)."""
        while True:
            await self.check()
            await anyio.sleep(self.interval)


_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s/@:]*):[^\s/@]*@")


def _scrub(text: str) -> str:
    """``text`` with the password of every URL in it masked (as :func:`~micro.resource.redact` does one)."""
    return _PASSWORD.sub(r"\1:***@", text)


def _streak(since: float, failures: int, error: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
    return f"failing since {when} ({failures} failures in a row; the last: {error})"[:300]
