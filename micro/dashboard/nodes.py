"""What the service list shows beside each node and service: the node's health and the service's call rate.

- **Health**: each node's own ``grpc.health.v1.Health/Check`` for its service (every micro node serves it
  on its gRPC address; :mod:`micro.server.health`), asked through the runtime's client (its pooled
  connection to the node, with the runtime's TLS: a private CA or a client certificate work as for calls),
  concurrently with a one-second bound, and kept for ``ttl`` seconds; a check under way is shared by every
  caller that needs it, so however many pages are open a node is asked at most once per ``ttl``:
  ``serving``, ``not serving`` (draining, or its runtime's registry, store or broker does not answer),
  ``not this service`` (another server answers at that address now) or ``unreachable`` (with the reason:
  no answer, a refused connection, a TLS handshake, an address that is not ``host:port``…).
- **Call rate**: calls per second each service handled over the last minute, from the counters
  :mod:`micro.metrics` keeps, sampled at each rendering: this process's own
  (:func:`micro.metrics.calls_served`) and, for the services of other processes, their ``/metrics``:
  a process that serves it (``micro run --metrics-address``) names it in its nodes' records
  (``metrics``: ``HOST:PORT``), and each such address is read at most once per ``ttl``
  (:class:`RemoteCalls`). Only where metrics are on: a service whose processes collect none shows no rate.

Both forget what leaves the registry: they hold one entry per registered node or service, never more.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
import msgspec

from micro import metrics
from micro.errors import NotFound

if TYPE_CHECKING:
    from micro.client import Client
    from micro.registry import Node, ServiceRecord

CHECK_TIMEOUT = 1.0
"""Seconds a node has to answer its health check."""
HEALTH_TTL = 5.0
"""Seconds a node's health is kept before it is asked again."""
log = logging.getLogger("micro.dashboard")

K = TypeVar("K")
A = TypeVar("A")
V = TypeVar("V")

RATE_WINDOW = 60.0
"""Seconds of samples a call rate is measured over."""


class Health(msgspec.Struct, frozen=True):
    """A node's health: ``state`` (``serving``, ``not serving``, ``not this service``, ``unreachable``) and
    why, in words, for the page's hover text."""

    state: str
    detail: str = ""


class Kept(Generic[K, A, V]):
    """Answers by key, each asked at most once per ``ttl`` seconds: ``of`` returns the kept answers and asks,
    concurrently, for the keys not asked within ``ttl``; a key another caller is asking now is awaited, not
    asked again; keys no longer wanted are forgotten (one entry per wanted key, never more).

    The asks a call starts run in its own task group (a caller that leaves ends them, and those waiting for
    them go on without those answers)."""

    def __init__(self, ask: Callable[[K, A], Awaitable[V]], *, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ask = ask
        self.ttl = ttl
        self.clock = clock
        self._known: dict[K, tuple[float, V]] = {}  # key -> (when, answer)
        self._asking: dict[K, anyio.Event] = {}  # asks under way, set when each ends

    async def of(self, wanted: Mapping[K, A]) -> dict[K, V]:
        """The answer for every key of ``wanted`` (asked with its value) that has one."""
        now = self.clock()
        self._known = {key: seen for key, seen in self._known.items() if key in wanted}  # forget who left
        stale = [key for key in wanted if key not in self._known or now - self._known[key][0] >= self.ttl]
        theirs = [self._asking[key] for key in stale if key in self._asking]
        mine = [key for key in stale if key not in self._asking]
        for key in mine:
            self._asking[key] = anyio.Event()
        try:
            if mine:
                async with anyio.create_task_group() as tg:
                    for key in mine:
                        tg.start_soon(self._ask, key, wanted[key])
        finally:
            for key in mine:
                self._asking.pop(key).set()
        for asked in theirs:
            await asked.wait()
        return {key: self._known[key][1] for key in wanted if key in self._known}

    async def _ask(self, key: K, arg: A) -> None:
        answer = await self.ask(key, arg)
        self._known[key] = (self.clock(), answer)


class NodeHealth:
    """The health of the registry's nodes, each asked at most once per ``ttl`` seconds through ``client``."""

    def __init__(self, client: Client, *, ttl: float = HEALTH_TTL, timeout: float = CHECK_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.timeout = timeout
        self._kept: Kept[tuple[str, str], Node, Health] = Kept(self._ask, ttl=ttl, clock=clock)

    async def of(self, records: Iterable[ServiceRecord]) -> dict[tuple[str, str], Health]:
        """The health of every node of ``records`` by (service, node id): kept answers, and the nodes not asked
        within ``ttl`` asked now, concurrently (:class:`Kept`)."""
        return await self._kept.of({(r.name, n.id): n for r in records for n in r.nodes})

    async def _ask(self, key: tuple[str, str], node: Node) -> Health:
        return await check(self.client, key[0], node, self.timeout)


class RemoteCalls:
    """Calls served by service in other processes, read from the ``/metrics`` their nodes' records name
    (``metrics``: ``HOST:PORT``, see :data:`micro.metrics.exposed`; this process's own is left out: its
    counts are :func:`micro.metrics.calls_served`), each address at most once per ``ttl`` and within
    ``timeout`` (:class:`Kept`). An address that does not answer in time, or not with the Prometheus text,
    counts nothing this round (its services show no rate), and this dashboard needs ``micro[metrics]`` to read
    one (without it, nothing is read)."""

    def __init__(self, *, ttl: float = HEALTH_TTL, timeout: float = CHECK_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._kept: Kept[str, None, dict[str, int]] = Kept(self._read, ttl=ttl, clock=clock)

    async def served(self, records: Iterable[ServiceRecord]) -> dict[str, int]:
        """Calls served so far by service name, summed over the processes the nodes of ``records`` name."""
        addresses = {n.metadata["metrics"] for r in records for n in r.nodes if n.metadata.get("metrics")}
        addresses.discard(metrics.exposed or "")
        out: dict[str, int] = {}
        for counts in (await self._kept.of(dict.fromkeys(addresses))).values():
            for name, n in counts.items():
                out[name] = out.get(name, 0) + n
        return out

    async def _read(self, address: str, _: None) -> dict[str, int]:
        try:
            import httpx

            with anyio.fail_after(self.timeout):
                async with httpx.AsyncClient(timeout=self.timeout) as http:
                    reply = await http.get(f"http://{address}/metrics")
            reply.raise_for_status()
            return metrics.calls_in(reply.text)
        except Exception as exc:  # no answer in time, a refusal, not the Prometheus text, no micro[metrics] here
            log.debug("dashboard: no call counts from %s/metrics: %s", address, exc or type(exc).__name__)
            return {}


async def check(client: Client, service: str, node: Node, timeout: float = CHECK_TIMEOUT) -> Health:
    """Ask ``node`` (over gRPC, on its registered address, through ``client``'s pooled connection and TLS)
    whether it serves ``service``. Never raises: whatever goes wrong is ``unreachable`` with the reason."""
    from micro.codec import PROTO
    from micro.errors import Error
    from micro.server import health

    try:
        with anyio.fail_after(timeout):
            reply = await client.grpc_channel(node).unary(
                "/grpc.health.v1.Health/Check", health.Request(service=service).SerializeToString(), wire=PROTO)
        status = health.Response.FromString(reply).status
    except NotFound:
        return Health("not this service", f"{node.address} answers, but serves no {service}")
    except TimeoutError:
        return Health("unreachable", f"{node.address} did not answer within {timeout:g} s")
    except Error as exc:
        return Health("unreachable", f"{node.address}: {exc.message}")
    except Exception as exc:  # a name that does not resolve, a TLS handshake, an address that is not host:port
        return Health("unreachable", f"{node.address}: {exc or type(exc).__name__}")
    if status == health.SERVING:
        return Health("serving", f"{node.address} serves {service}")
    return Health("not serving", f"{node.address} is draining, or a backend of its runtime does not answer")


class CallRates:
    """Calls per second per service over the last ``window`` seconds, from samples of
    :func:`micro.metrics.calls_served` (one deque per service this process serves, trimmed to the window)."""

    def __init__(self, *, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def sample(self, names: Iterable[str], served: Mapping[str, int] | None = None) -> dict[str, float]:
        """Take a sample of the calls served so far (``served``; default: this process's metrics) and return
        the rate of each of ``names`` that has two samples at least a second apart; forget the others."""
        now = self.clock()
        counts = metrics.calls_served() if served is None else served
        wanted = set(names)
        self._samples = {name: kept for name, kept in self._samples.items() if name in wanted and name in counts}
        rates = {}
        for name in wanted & counts.keys():
            kept = self._samples.setdefault(name, deque())
            if not kept or now - kept[-1][0] >= 1.0:  # at most one sample a second: bounded by the window
                kept.append((now, counts[name]))
            # the samples within the window, and one at most a second older (the window's start, as sampled):
            # an older one (the list was not looked at for a while) would spread calls over hours
            while len(kept) > 1 and (now - kept[1][0] >= self.window or now - kept[0][0] > self.window + 1.0):
                kept.popleft()
            (t0, n0), (t1, n1) = kept[0], kept[-1]
            if t1 - t0 >= 1.0:
                rates[name] = max(n1 - n0, 0) / (t1 - t0)
        return rates
