"""Retries for idempotent endpoints and a circuit breaker per node.

Only endpoints marked ``@micro.idempotent`` are retried, only on UNAVAILABLE, with
exponential backoff and full jitter, and never past the call's deadline. A node
that failed ``threshold`` times in a row is skipped for ``cooldown`` seconds
(doubling while it keeps failing, up to ``max_cooldown``); after that one call
may try it again (half-open), and a success closes the breaker.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RetryPolicy:
    """How idempotent calls are retried."""

    attempts: int = 3
    base: float = 0.05
    cap: float = 1.0

    def delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based): full jitter over an exponential bound."""
        return random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))


@dataclass(slots=True)
class _State:
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0


@dataclass
class Breakers:
    """Consecutive failures per node address; open nodes are skipped until their cooldown ends."""

    threshold: int = 3
    cooldown: float = 2.0
    max_cooldown: float = 30.0
    _nodes: dict[str, _State] = field(default_factory=dict)

    def available(self, address: str) -> bool:
        state = self._nodes.get(address)
        return state is None or state.open_until <= time.monotonic()

    def failure(self, address: str) -> None:
        state = self._nodes.setdefault(address, _State())
        state.failures += 1
        if state.failures >= self.threshold:
            state.cooldown = min(self.max_cooldown, state.cooldown * 2 if state.cooldown else self.cooldown)
            state.open_until = time.monotonic() + state.cooldown

    def success(self, address: str) -> None:
        if address in self._nodes:
            del self._nodes[address]

    def is_open(self, address: str) -> bool:
        return not self.available(address)
