"""Whether a runtime's backends answer: checked every few seconds and on demand, one log line per change.

A runtime's :class:`Backends` asks each of its registry, store and broker a cheap
question (a registry lookup, a one-key store listing, the broker's
:meth:`~micro.broker.Broker.check`) with a two-second bound, every ``interval``
seconds (a supervised background task of the runtime) and whenever a readiness
probe asks (``/health/ready``). ``problems`` holds what is down and why. A backend
going down is logged once (a warning naming it and the reason) and its return once
(info), never once per check or per call.

Listeners hear each change of the whole (``True``: everything answers): every
service of the runtime turns its gRPC health to NOT_SERVING while a backend is
down, so balancers and Kubernetes probes take the node out, and back to SERVING
when it answers again. Calls that need a backend that is down still fail on their
own, fast, with ``Unavailable`` naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from micro.errors import NotFound
from micro.resource import redact

if TYPE_CHECKING:
    from micro.runtime import Runtime

__all__ = ["CHECK_TIMEOUT", "DEFAULT_INTERVAL", "Backends"]

log = logging.getLogger("micro.health")

CHECK_TIMEOUT = 2.0
"""Seconds a backend has to answer a check."""
DEFAULT_INTERVAL = 5.0
"""Seconds between the checks a runtime makes by itself."""

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
        self.listeners: set[Callable[[bool], None]] = set()
        """Called with ``True`` / ``False`` when all backends start / stop answering."""
        self._told = True  # what the listeners last heard (checks may overlap: compare with this, not a start)

    @property
    def ok(self) -> bool:
        """Every backend answered the last check."""
        return not self.problems

    async def check(self) -> list[str]:
        """Ask every backend now; update :attr:`problems` (logging what changed) and return them."""
        rt = self.runtime
        probes: dict[str, tuple[str, Callable[[], Awaitable[object]]]] = {
            "registry": (rt.registry.url, self._registry),
            "store": (getattr(rt.store, "url", ""), lambda: rt.store.list("micro/", limit=1)),
            "broker": (rt.broker.url, rt.broker.check),
        }
        for name, (url, probe) in probes.items():
            try:
                with anyio.fail_after(CHECK_TIMEOUT):
                    await probe()
            except Exception as exc:
                why = f"no answer within {CHECK_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else str(exc)
                where = redact(url)
                problem = (why if where and where in why else f"{name} {where}: {why}")[:300]
                if name not in self.problems:
                    log.warning("runtime: %s is unavailable: %s (logged again when it answers)", name, problem)
                self.problems[name] = problem
            else:
                if self.problems.pop(name, None) is not None:
                    log.info("runtime: %s %s answers again", name, redact(url))
        if self.ok != self._told:
            self._told = self.ok
            for listener in list(self.listeners):
                listener(self.ok)
        return [f"{name} unavailable: {why}" for name, why in self.problems.items()]

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
