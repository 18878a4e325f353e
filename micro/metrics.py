"""Prometheus metrics (optional: ``pip install 'micro[metrics]'``).

Off unless enabled, so the hooks cost one flag check by default::

    micro.metrics.enable()                    # before creating runtimes and services
    app.mount("/metrics", micro.metrics.asgi_app())   # or your own exporter on metrics.registry()

``micro run --metrics-address 127.0.0.1:9464`` enables them and serves ``/metrics``
with ``/health/live`` and ``/health/ready`` (:mod:`micro.server.probes`); ``micro api``
and ``micro mcp --transport http`` serve ``/metrics`` too.

The metrics (labels in brackets; no label takes run ids, user ids or message text,
and labels whose values come from outside the code, such as topics, keep at most
:data:`MAX_VALUES` values each, the rest counted as ``other``):

- ``micro_rpc_server_calls_total`` [service, endpoint, path, code], ``micro_rpc_server_duration_seconds``
  [service, endpoint, path], ``micro_rpc_server_in_flight`` [service, endpoint, path]:
  every call a service handles; ``path`` is ``in-process``, ``grpc`` or ``native`` (micro's own wire),
  ``code`` the gRPC status
  (a server-streaming call is counted, and timed, until its stream starts).
- ``micro_rpc_client_calls_total``, ``micro_rpc_client_duration_seconds``, ``micro_rpc_client_in_flight``
  (the same labels): every unary call a client makes that reached a node, by the wire that carried it
  (names a caller made up that reach no node make no series). A call to a service in the same process
  is measured once, by the endpoint, and reported on both sides (path ``in-process``); the client side
  adds the calls it refused before the endpoint saw them (a bad body, a passed deadline).
- ``micro_overload_refusals_total`` [service]: calls refused by ``max_concurrency`` / ``max_queue``.
- ``micro_agent_runs_total`` [agent, status]: runs reaching ``completed``, ``failed``, ``cancelled``,
  ``paused`` or ``input_required``; ``micro_agent_tool_calls_total`` [agent, tool, outcome]: the tool
  calls of each run that ended.
- ``micro_model_calls_total`` [provider, model, outcome], ``micro_model_call_duration_seconds``
  [provider, model], ``micro_model_tokens_total`` [provider, model, kind] (``input`` / ``output``).
- ``micro_flow_events_total`` [flow, outcome] (``completed``, ``failed``, ``retrying``, ``cancelled``),
  ``micro_flow_retries_total`` [flow].
- ``micro_runs_waiting`` [owner, status]: runs of an agent or a flow (``owner``) that wait now —
  ``paused`` or ``input_required`` (for a person), ``waiting`` (a flow's ``Await``) — counted from the
  run engine's index in the store every 15 s by each process serving it (every replica reports the
  same number: aggregate with ``max``).
- ``micro_broker_published_total`` [broker, topic], ``micro_broker_consumed_total`` [broker, topic, outcome],
  ``micro_broker_dead_letters_total`` [broker, topic] (JetStream: flow events that failed their last delivery).
- ``micro_store_operation_duration_seconds`` [backend, operation] and
  ``micro_store_operations_total`` [backend, operation, outcome].
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Awaitable
from typing import Any

from micro.errors import Error, RecordNotFound, VersionConflict

__all__ = ["MAX_VALUES", "ON", "asgi_app", "calls_in", "calls_served", "disable", "enable", "enabled", "exposed",
           "exposition", "registry"]

ON = False
"""Whether metrics are collected (read by the hooks; change it with :func:`enable` / :func:`disable`)."""

exposed: str | None = None
"""``HOST:PORT`` where this process serves ``/metrics`` (set by :mod:`micro.server.probes` while it serves, i.e.
``micro run --metrics-address``), else ``None``. Services started meanwhile put it in their node records as
``metrics``, so a dashboard in another process can read the calls they served (:func:`calls_in`)."""

MAX_VALUES = 200
IN_PROCESS, GRPC, NATIVE = "in-process", "grpc", "native"
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0)
_BUCKET_NAMES = [*(repr(b) for b in _BUCKETS), "+Inf"]
_FIRST = _BUCKETS[0]
FOLD_AT = 256
"""OK calls an RPC child keeps unfolded at most (a list of floats, about 8 KiB): see ``_Rpc``."""
_MODEL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

_m: _Metrics | None = None
_bisect = bisect.bisect_left
SET: object = None
"""The metric set now in use (a new one after ``enable(registry)``): what a hook's cached children belong to."""


def enable(registry: Any = None) -> None:
    """Collect metrics into ``registry`` (a ``prometheus_client.CollectorRegistry``; default: a new one).

    Call it before creating runtimes, services and clients: their hooks are set up when
    they are made. Enabling again keeps the metrics collected so far unless a new
    registry is given.
    """
    global ON, SET, _m
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError("metrics need prometheus_client: pip install 'micro[metrics]'") from exc
    if _m is None or registry is not None:
        _m = SET = _Metrics(registry if registry is not None else prometheus_client.CollectorRegistry())
    ON = True


def disable() -> None:
    """Stop collecting (what was collected stays readable)."""
    global ON
    ON = False


def enabled() -> bool:
    return ON


def registry() -> Any:
    """The ``prometheus_client.CollectorRegistry`` micro's metrics are in (after :func:`enable`)."""
    return _metrics().registry


def exposition() -> tuple[bytes, str]:
    """The Prometheus text format of the metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(_metrics().registry), CONTENT_TYPE_LATEST


def asgi_app() -> Any:
    """An ASGI app that answers with the metrics (mount it at ``/metrics``)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(_metrics().registry)


def _metrics() -> _Metrics:
    if _m is None:
        raise RuntimeError("metrics are not enabled: call micro.metrics.enable() first")
    return _m


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.server = _RpcFamily("server", "Calls a service handled, by gRPC status code.",
                                 "Time a service took to answer a call.", "Calls a service is handling now.")
        self.client = _RpcFamily("client", "Calls a client made, by gRPC status code.",
                                 "Time a call took, as its caller saw it.", "Calls a client is waiting on now.")
        registry.register(_Collector(self.server, self.client))
        self.overload = Counter("micro_overload_refusals", "Calls refused at once by max_concurrency/max_queue.",
                                ["service"], registry=registry)
        self.agent_runs = Counter("micro_agent_runs", "Agent runs, by how they ended.", ["agent", "status"],
                                  registry=registry)
        self.tool_calls = Counter("micro_agent_tool_calls", "Tool calls of agent runs, by outcome.",
                                  ["agent", "tool", "outcome"], registry=registry)
        self.model_calls = Counter("micro_model_calls", "Model calls, by outcome.", ["provider", "model", "outcome"],
                                   registry=registry)
        self.model_seconds = Histogram("micro_model_call_duration_seconds", "Time a model call took.",
                                       ["provider", "model"], buckets=_MODEL_BUCKETS, registry=registry)
        self.model_tokens = Counter("micro_model_tokens", "Tokens of model calls (kind: input or output).",
                                    ["provider", "model", "kind"], registry=registry)
        self.flow_events = Counter("micro_flow_events", "Flow events, by outcome.", ["flow", "outcome"],
                                   registry=registry)
        self.flow_retries = Counter("micro_flow_retries", "Flow events given back to be tried again.", ["flow"],
                                    registry=registry)
        self.runs_waiting = Gauge("micro_runs_waiting", "Runs of an agent or flow that wait now (for a person, "
                                  "an answer or an event), from the store's index.", ["owner", "status"],
                                  registry=registry)
        self.dead_letters = Counter("micro_broker_dead_letters", "Messages (flow events) moved to the dead-letter "
                                    "topic after their last delivery failed (JetStream).", ["broker", "topic"],
                                    registry=registry)
        self.published = Counter("micro_broker_published", "Messages published.", ["broker", "topic"],
                                 registry=registry)
        self.consumed = Counter("micro_broker_consumed", "Messages a subscriber handled, by outcome.",
                                ["broker", "topic", "outcome"], registry=registry)
        self.store_seconds = Histogram("micro_store_operation_duration_seconds", "Time a store operation took.",
                                       ["backend", "operation"], buckets=_BUCKETS, registry=registry)
        self.store_ops = Counter("micro_store_operations", "Store operations, by outcome.",
                                 ["backend", "operation", "outcome"], registry=registry)
        self.seen: dict[tuple[str, int], set[str]] = {}

    def bounded(self, metric: str, position: int, value: str) -> str:
        """``value``, or ``other`` once this label of this metric has MAX_VALUES others."""
        seen = self.seen.setdefault((metric, position), set())
        if value in seen:
            return value
        if len(seen) >= MAX_VALUES:
            return "other"
        seen.add(value)
        return value


class _RpcFamily:
    """The RPC metrics of one side (``server`` or ``client``), as plain counters the event loop bumps.

    prometheus_client's own metric objects take a lock per update and a label lookup per call;
    a call would pay several microseconds for its four updates. Here a call costs a few integer
    additions on its (service, endpoint, path) child, and :meth:`collect` turns the children into
    metric families when Prometheus scrapes (a custom collector on the same registry).
    """

    def __init__(self, side: str, calls_help: str, seconds_help: str, in_flight_help: str) -> None:
        self.side = side
        self.helps = (calls_help, seconds_help, in_flight_help)
        self.children: dict[tuple[str, str, str], _Rpc] = {}

    def get(self, service: str, endpoint: str, path: str) -> _Rpc:
        key = (service, endpoint, path)
        rpc = self.children.get(key)
        if rpc is None:
            rpc = self.children[key] = _Rpc()
        return rpc

    def collect(self, in_process: _RpcFamily | None = None) -> Any:
        """The three metric families; ``in_process``: a family whose in-process children are added to
        this one's (the server side's, for the client side: an in-process call is measured once)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["service", "endpoint", "path"]
        name = f"micro_rpc_{self.side}"
        calls = CounterMetricFamily(f"{name}_calls", self.helps[0], labels=[*labels, "code"])
        seconds = HistogramMetricFamily(f"{name}_duration_seconds", self.helps[1], labels=labels)
        in_flight = GaugeMetricFamily(f"{name}_in_flight", self.helps[2], labels=labels)
        rows: dict[tuple[str, str, str], list[_Rpc]] = {key: [rpc] for key, rpc in list(self.children.items())}
        if in_process is not None:
            for key, rpc in list(in_process.children.items()):
                if key[2] == IN_PROCESS:
                    rows.setdefault(key, []).append(rpc)
        for key, rpcs in rows.items():
            codes: dict[str, int] = {}
            counts = [0] * len(_BUCKET_NAMES)
            total = 0.0
            flying = 0
            for rpc in rpcs:
                rpc_codes, rpc_buckets, rpc_total, rpc_in_flight = rpc.read()
                for code, n in rpc_codes.items():
                    codes[code] = codes.get(code, 0) + n
                counts = [a + b for a, b in zip(counts, rpc_buckets, strict=True)]
                total += rpc_total
                flying += rpc_in_flight
            for code, n in codes.items():
                calls.add_metric([*key, code], n)
            cumulative, buckets = 0, []
            for bound, n in zip(_BUCKET_NAMES, counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            seconds.add_metric(list(key), buckets, total)
            in_flight.add_metric(list(key), flying)
        return [calls, seconds, in_flight]


class _Rpc:
    """One (service, endpoint, path): calls by code, a histogram of seconds, calls in flight.

    Every call pays for what is kept here, so an OK call (the common case) only appends its
    seconds to ``pending`` (one ``list.append``: whole under the GIL, from any thread); they
    are folded into the counts, the buckets and the sum every :data:`FOLD_AT` calls on the
    thread that records, and read with them when Prometheus scrapes (:meth:`read`, from any
    thread). ``pending`` stays one list for the child's life: a fold takes the seconds it
    counts off its front under the lock and counts ``ok``, the buckets and the sum from that
    one snapshot, so an append from another thread (a second event loop on the same child)
    is never lost and a scrape never sees the buckets behind ``ok`` or the sum. The other
    calls are counted under the lock too. ``in_flight`` is exact while one event loop
    records on the child; loops in several threads sharing a child may miscount it (a gauge,
    kept without a lock on the hot path). ``Endpoint.handle`` and :func:`remote_wrapper` inline
    :meth:`done`'s OK branch (a method call is a fair part of the cost) and read :data:`FOLD_AT` from here.
    """

    __slots__ = ("buckets", "codes", "in_flight", "lock", "ok", "pending", "total")

    def __init__(self) -> None:
        self.in_flight = 0
        self.ok = 0  # calls answered OK, folded (the others are in pending)
        self.codes: dict[str, int] = {}  # the other calls, by status
        self.buckets = [0] * (len(_BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0
        self.pending: list[float] = []  # the seconds of OK calls not folded yet (never replaced)
        self.lock = threading.Lock()

    def done(self, code: str, elapsed: float) -> None:
        """A call counted in ``in_flight`` ended with ``code`` after ``elapsed`` seconds."""
        self.in_flight -= 1
        if code == "OK":
            pending = self.pending
            pending.append(elapsed)
            if len(pending) >= FOLD_AT:
                self.fold()
            return
        with self.lock:
            self.codes[code] = self.codes.get(code, 0) + 1
            self.total += elapsed
            self.buckets[_bisect(_BUCKETS, elapsed)] += 1

    def fold(self) -> None:
        """Count the pending OK calls in ``ok``, the buckets and the sum."""
        with self.lock:
            pending = self.pending
            taken = pending[:]
            del pending[:len(taken)]  # what another thread appended meanwhile stays for the next fold
            buckets, first, bounds = self.buckets, _FIRST, _BUCKETS
            for elapsed in taken:  # most in-process calls take less than the first bound
                buckets[0 if elapsed <= first else _bisect(bounds, elapsed)] += 1
            self.total += sum(taken)
            self.ok += len(taken)

    def read(self) -> tuple[dict[str, int], list[int], float, int]:
        """Calls by status code, the buckets, the sum of seconds and the calls in flight, as of now."""
        with self.lock:
            codes, buckets, total = dict(self.codes), list(self.buckets), self.total
            ok, pending, in_flight = self.ok, self.pending[:], self.in_flight
        for elapsed in pending:
            buckets[_bisect(_BUCKETS, elapsed)] += 1
        ok += len(pending)
        if ok:
            codes["OK"] = ok
        return codes, buckets, total + sum(pending), in_flight

    def calls(self) -> int:
        """Every call that ended so far (each counted once, also while a fold runs on another thread)."""
        with self.lock:
            return self.ok + len(self.pending) + sum(self.codes.values())


class _Collector:
    def __init__(self, server: _RpcFamily, client: _RpcFamily) -> None:
        self.server = server
        self.client = client

    def collect(self) -> Any:
        yield from self.server.collect()
        yield from self.client.collect(in_process=self.server)


def rpc(side: str, service: str, endpoint: str, path: str) -> _Rpc:
    """The child to record a call on (metrics must be enabled); the caller bumps ``in_flight``
    and calls ``done(code, seconds)`` when the call ends."""
    m = _metrics()
    return (m.server if side == "server" else m.client).get(service, endpoint, path)


def calls_served() -> dict[str, int]:
    """Calls each service of this process has handled so far (every endpoint, wire and status), by service
    name; empty while metrics are off. The dashboard's call rates are the differences of its samples."""
    m = _m
    if m is None or not ON:
        return {}
    out: dict[str, int] = {}
    for (service, _, _), rpc in list(m.server.children.items()):
        out[service] = out.get(service, 0) + rpc.calls()
    return out


def calls_in(exposition_text: str) -> dict[str, int]:
    """Calls served by service name in another process's ``/metrics`` text (the sum of its
    ``micro_rpc_server_calls_total`` over endpoints, paths and codes): what :func:`calls_served` is for this
    process. Raises ``ValueError`` if the text is not the Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition_text):  # (its family, by how the text declares it)
        for sample in family.samples:
            if sample.name == "micro_rpc_server_calls_total" and "service" in sample.labels:
                name = sample.labels["service"]
                out[name] = out.get(name, 0) + int(sample.value)
    return out


def refused(service: str, endpoint: str, code: str) -> None:
    """Count a call to an in-process service that the client refused before its endpoint saw it (the
    endpoint measures the others, for both sides)."""
    m = _m
    if m is None or not ON:
        return
    child = m.client.get(service, endpoint, IN_PROCESS)
    child.in_flight += 1
    child.done(code, 0.0)


def remote_wrapper(next: Any) -> Any:
    """``next`` (the client's call to another process) measured: every unary call by the wire that carried
    it (``req.wire``). Calls to in-process services are measured once, by the endpoint, for both sides
    (see :func:`refused`), so the in-process path has nothing of this.

    Made when the client is made: with metrics off then, it is ``next`` itself.
    """
    if not ON:
        return next
    # A call is counted once it reached a node (``req.wire`` set): its service and endpoint are then the
    # registry's names, not whatever a caller (a gateway's URL) made up, so the labels stay bounded. While
    # in flight it counts under the path this endpoint's last call took (none yet: not in flight): ``last``
    # keeps that path's child, of the metric set it was made in (a new set, after ``enable(registry)``,
    # makes it again). An OK call's seconds are appended as ``_Rpc.done`` does (inlined: it is a fair part
    # of the cost, as in ``Endpoint.handle``), folded every FOLD_AT calls.
    last: dict[tuple[str, str], tuple[str, _Rpc, object]] = {}
    perf_counter = time.perf_counter
    fold_at = FOLD_AT

    async def measured(req: Any) -> Any:
        m = _m
        if req.streaming or not ON or m is None:
            return await next(req)
        key = (req.service, req.endpoint)
        known = last.get(key)
        path: str | None = None
        child: _Rpc | None = None
        if known is not None:
            path = known[0]
            if known[2] is m:
                child = known[1]
            else:  # made in a metric set replaced since
                child = m.client.get(req.service, req.endpoint, path)
                last[key] = (path, child, m)
            child.in_flight += 1
        start = perf_counter()
        try:
            result = await next(req)
        except Error as exc:
            _ended(req, m, last, key, path, child, exc.status.name, perf_counter() - start)
            raise
        except Exception:
            _ended(req, m, last, key, path, child, "UNKNOWN", perf_counter() - start)
            raise
        except BaseException:
            _ended(req, m, last, key, path, child, "CANCELLED", perf_counter() - start)
            raise
        if req.wire is not path or child is None:  # (the wire names are the module's constants)
            _ended(req, m, last, key, path, child, "OK", perf_counter() - start)
        else:
            child.in_flight -= 1
            pending = child.pending
            pending.append(perf_counter() - start)
            if len(pending) >= fold_at:
                child.fold()
        return result

    return measured


def _ended(req: Any, m: _Metrics, last: dict[tuple[str, str], tuple[str, _Rpc, object]], key: tuple[str, str],
           path: str | None, child: _Rpc | None, code: str, elapsed: float) -> None:
    """A client call measured by :func:`remote_wrapper` ended with ``code``, other than the usual way (an OK
    call on the path its endpoint's last call took)."""
    if req.wire:
        if req.wire != path or child is None:
            if child is not None:
                child.in_flight -= 1
            child = m.client.get(req.service, req.endpoint, req.wire)
            last[key] = (req.wire, child, m)
            child.in_flight += 1
        child.done(code, elapsed)
    elif child is not None:  # refused before it reached a node (no such endpoint now, a bad body)
        child.in_flight -= 1


def count(name: str, *labels: str, by: float = 1.0, bounded: int | None = None) -> None:
    """Add ``by`` to the counter ``name`` (an attribute of the metric set) with these labels.

    ``bounded``: the position of a label whose values come from outside the code (a topic).
    """
    m = _m
    if m is None or not ON:
        return
    if bounded is not None:
        labels = (*labels[:bounded], m.bounded(name, bounded, labels[bounded]), *labels[bounded + 1:])
    getattr(m, name).labels(*labels).inc(by)


def observe(name: str, value: float, *labels: str) -> None:
    """Observe ``value`` in the histogram ``name`` with these labels."""
    m = _m
    if m is None or not ON:
        return
    getattr(m, name).labels(*labels).observe(value)


def gauge(name: str, value: float, *labels: str) -> None:
    """Set the gauge ``name`` with these labels to ``value``."""
    m = _m
    if m is None or not ON:
        return
    getattr(m, name).labels(*labels).set(value)



def subscriber(broker: str, topic: str, handler: Any) -> Any:
    """A broker handler that counts what it consumed, by outcome (``ok`` or ``error``)."""

    async def counted(message: Any) -> None:
        try:
            await handler(message)
        except BaseException:
            count("consumed", broker, topic, "error", bounded=1)
            raise
        count("consumed", broker, topic, "ok", bounded=1)

    return counted


class _Timed:
    """``with metrics.model_call(model) as seen: rsp = ...; seen(rsp)``: latency, outcome and tokens."""

    __slots__ = ("model", "rsp", "start")

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rsp: Any = None
        self.start = 0.0

    def __enter__(self) -> Any:
        self.start = time.perf_counter()
        return self._seen

    def _seen(self, rsp: Any) -> None:
        self.rsp = rsp

    def __exit__(self, t: Any, e: Any, tb: Any) -> None:
        if not ON:
            return
        provider, model = str(getattr(self.model, "name", "?")), str(getattr(self.model, "model", "?"))
        observe("model_seconds", time.perf_counter() - self.start, provider, model)
        outcome = "ok" if e is None else (e.status.name.lower() if isinstance(e, Error) else type(e).__name__)
        count("model_calls", provider, model, outcome, bounded=2)
        usage = getattr(self.rsp, "usage", None)
        if usage is not None:
            count("model_tokens", provider, model, "input", by=usage.input_tokens)
            count("model_tokens", provider, model, "output", by=usage.output_tokens)


def model_call(model: Any) -> _Timed:
    """Time one model call (see :class:`_Timed`)."""
    return _Timed(model)


async def store_op(backend: Any, operation: str, call: Awaitable[Any]) -> Any:
    """Await a store operation, recording its latency and outcome (``ok``, ``not_found``, ``conflict``, ``error``)."""
    name = type(backend).__name__
    start = time.perf_counter()
    outcome = "error"
    try:
        result = await call
        outcome = "ok"
        return result
    except Exception as exc:
        outcome = "not_found" if isinstance(exc, RecordNotFound) else "conflict" if isinstance(
            exc, VersionConflict) else "error"
        raise
    finally:
        observe("store_seconds", time.perf_counter() - start, name, operation)
        count("store_ops", name, operation, outcome)


def agent_run(agent: str, status: str, calls: Any) -> None:
    """An agent run reached ``status`` (ended, or paused), with these tool calls (``.name``, ``.is_error``;
    counted when the run ends, so pass none for a pause)."""
    if not ON:
        return
    count("agent_runs", agent, status)
    for call in calls:
        count("tool_calls", agent, call.name, "error" if call.is_error else "ok", bounded=1)


def flow_run(flow: str, status: str) -> None:
    """A flow event's run was recorded with ``status`` (``running`` is not counted: it is not an outcome)."""
    if not ON or status == "running":
        return
    count("flow_events", flow, status)
    if status == "retrying":
        count("flow_retries", flow)


def enable_if_installed() -> bool:
    """:func:`enable` when prometheus_client is installed (``micro api``, ``micro mcp``); whether it is on."""
    try:
        enable()
    except ImportError:
        return False
    return True
