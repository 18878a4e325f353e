"""Prometheus metrics: counters move by exactly the calls made, read back with prometheus_client's parser.

Metrics are process-wide and hooks are set up when runtimes and services are made,
so every test enables them on a fresh ``CollectorRegistry`` before making anything,
and turns them off after.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import micro
from micro import metrics
from micro.ai import scripted
from micro.errors import BadRequest, NotFound, ResourceExhausted
from micro.flow.record import FlowRun
from micro.registry.memory import MemoryRegistry
from micro.server.probes import ProbeServer, readiness


class Req(msgspec.Struct):
    name: str


class Rsp(msgspec.Struct):
    greeting: str


class Greeter:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Hello(self, req: Req) -> Rsp:
        if req.name == "bad":
            raise BadRequest("no bad names")
        if req.name == "hold":
            self.entered.set()
            await self.release.wait()
        return Rsp(f"hello {req.name}")


@pytest.fixture
def fresh() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    metrics.enable(registry)
    try:
        yield registry
    finally:
        metrics.disable()


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def test_rpc_counters_move_by_exactly_the_calls_made(fresh: CollectorRegistry) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="grpc") as away, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as native:
        service = micro.Service("greet", runtime=home)
        service.handle(Greeter())
        async with service:
            for _ in range(3):
                await home.client.call("greet", "Greeter.Hello", {"name": "a"})
            for _ in range(2):
                await away.client.call("greet", "Greeter.Hello", {"name": "b"})
            with pytest.raises(BadRequest):
                await away.client.call("greet", "Greeter.Hello", {"name": "bad"})
            for _ in range(4):
                await native.client.call("greet", "Greeter.Hello", {"name": "c"})
            with pytest.raises(BadRequest):  # refused before it reaches the service: a client-side count only
                await home.client.call("greet", "Greeter.Hello", {"name": 5})
            for made_up in ("nosuch", "other"):  # names from a caller (a gateway URL) that reach no node
                with pytest.raises(NotFound):
                    await away.client.call(made_up, "X.Y", {})
                with pytest.raises(NotFound):
                    await away.client.call("greet", f"Greeter.{made_up}", {})
            body, ctype = metrics.exposition()
            # what the dashboard's call rates are made of: every call the endpoint saw, OK ones not folded yet too
            assert metrics.calls_served()["greet"] == 3 + 2 + 1 + 4
    assert ctype.startswith("text/plain")
    found = samples(body)
    ep = {"service": "greet", "endpoint": "Greeter.Hello"}
    assert value(found, "micro_rpc_server_calls_total", **ep, path="in-process", code="OK") == 3
    assert value(found, "micro_rpc_server_calls_total", **ep, path="grpc", code="OK") == 2
    assert value(found, "micro_rpc_server_calls_total", **ep, path="grpc", code="INVALID_ARGUMENT") == 1
    assert value(found, "micro_rpc_server_calls_total", **ep, path="native", code="OK") == 4
    assert value(found, "micro_rpc_server_duration_seconds_count", **ep, path="in-process") == 3
    assert value(found, "micro_rpc_server_duration_seconds_count", **ep, path="grpc") == 3
    assert value(found, "micro_rpc_server_in_flight", **ep, path="grpc") == 0
    assert value(found, "micro_rpc_client_calls_total", **ep, path="in-process", code="OK") == 3
    assert value(found, "micro_rpc_client_calls_total", **ep, path="in-process", code="INVALID_ARGUMENT") == 1
    # the client labels a call by the wire that carried it, as the server does
    assert value(found, "micro_rpc_client_calls_total", **ep, path="grpc", code="OK") == 2
    assert value(found, "micro_rpc_client_calls_total", **ep, path="grpc", code="INVALID_ARGUMENT") == 1
    assert value(found, "micro_rpc_client_duration_seconds_count", **ep, path="grpc") == 3
    assert value(found, "micro_rpc_client_calls_total", **ep, path="native", code="OK") == 4
    assert value(found, "micro_rpc_client_duration_seconds_count", **ep, path="native") == 4
    assert value(found, "micro_rpc_client_in_flight", **ep, path="grpc") == 0
    assert value(found, "micro_rpc_client_in_flight", **ep, path="native") == 0
    labels = {dict(k[1]).get("service") for k in found} | {dict(k[1]).get("endpoint") for k in found}
    assert not labels & {"nosuch", "other", "Greeter.nosuch", "Greeter.other"}  # no series for made-up names


async def test_client_calls_count_in_the_metric_set_enabled_after_the_client_was_made(
        fresh: CollectorRegistry) -> None:
    """The client keeps the child an endpoint's calls count under; a new registry (``enable(registry)``) is a new
    metric set, and the calls made after it count there, the earlier ones stay in the old one."""
    from prometheus_client import generate_latest

    registry = MemoryRegistry()
    later = CollectorRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as home, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://", transport="native") as native:
        service = micro.Service("greet", runtime=home)
        service.handle(Greeter())
        async with service:
            for _ in range(2):
                await native.client.call("greet", "Greeter.Hello", {"name": "a"})
            metrics.enable(later)
            for _ in range(3):
                await native.client.call("greet", "Greeter.Hello", {"name": "b"})
            with pytest.raises(BadRequest):
                await native.client.call("greet", "Greeter.Hello", {"name": "bad"})
    ep = {"service": "greet", "endpoint": "Greeter.Hello", "path": "native"}
    before, after = samples(generate_latest(fresh)), samples(generate_latest(later))
    assert value(before, "micro_rpc_client_calls_total", **ep, code="OK") == 2
    assert value(before, "micro_rpc_client_calls_total", **ep, code="INVALID_ARGUMENT") == 0
    assert value(after, "micro_rpc_client_calls_total", **ep, code="OK") == 3
    assert value(after, "micro_rpc_client_calls_total", **ep, code="INVALID_ARGUMENT") == 1
    assert value(after, "micro_rpc_client_duration_seconds_count", **ep) == 4
    assert value(before, "micro_rpc_client_in_flight", **ep) == value(after, "micro_rpc_client_in_flight", **ep) == 0


async def test_in_flight_and_overload_refusals(fresh: CollectorRegistry) -> None:
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        greeter = Greeter()
        service = micro.Service("busy", runtime=rt, max_concurrency=1)
        service.handle(greeter)
        async with service, anyio.create_task_group() as tg:
            tg.start_soon(rt.client.call, "busy", "Greeter.Hello", {"name": "hold"})
            await greeter.entered.wait()
            held = samples(metrics.exposition()[0])
            for _ in range(2):
                with pytest.raises(ResourceExhausted):
                    await rt.client.call("busy", "Greeter.Hello", {"name": "x"})
            greeter.release.set()
        found = samples(metrics.exposition()[0])
    ep = {"service": "busy", "endpoint": "Greeter.Hello", "path": "in-process"}
    assert value(held, "micro_rpc_server_in_flight", **ep) == 1
    assert value(held, "micro_rpc_client_in_flight", **ep) == 1
    assert value(found, "micro_rpc_server_in_flight", **ep) == 0
    assert value(found, "micro_overload_refusals_total", service="busy") == 2
    assert value(found, "micro_rpc_server_calls_total", **ep, code="RESOURCE_EXHAUSTED") == 2
    assert value(found, "micro_rpc_server_calls_total", **ep, code="OK") == 1


async def test_off_means_nothing_is_recorded() -> None:
    registry = CollectorRegistry()
    metrics.enable(registry)
    metrics.disable()
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("quiet", runtime=rt)
        service.handle(Greeter())
        async with service:
            await rt.client.call("quiet", "Greeter.Hello", {"name": "a"})
    found = samples(metrics.exposition()[0])
    assert not [k for k in found if k[0].startswith("micro_rpc") and k[0].endswith("_total")]


async def test_probe_server_serves_metrics_and_health(fresh: CollectorRegistry) -> None:
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("probed", runtime=rt)
        service.handle(Greeter())
        probes = ProbeServer(lambda: readiness([service]))
        await probes.start("127.0.0.1", 0)
        base = f"http://127.0.0.1:{probes.port}"
        try:
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/health/live")).status_code == 200
                not_yet = await http.get("/health/ready")
                assert not_yet.status_code == 503
                assert "probed: not serving" in not_yet.text
                async with service:
                    assert (await http.get("/health/ready")).status_code == 200
                    await rt.client.call("probed", "Greeter.Hello", {"name": "a"})
                    text = (await http.get("/metrics")).text
                    scraped = samples(text.encode())
                    # its node says where its metrics are, and they hold the calls it served: a dashboard in
                    # another process reads its call rate from there
                    [record] = await rt.registry.get("probed")
                    assert record.nodes[0].metadata["metrics"] == f"127.0.0.1:{probes.port}" == metrics.exposed
                    assert metrics.calls_in(text) == {"probed": 1}
                assert (await http.get("/health/ready")).status_code == 503  # stopped
                assert (await http.get("/nope")).status_code == 404
                assert (await http.post("/metrics")).status_code == 405
        finally:
            await probes.aclose()
        assert metrics.exposed is None  # a service started now advertises no metrics
    assert value(scraped, "micro_rpc_server_calls_total", service="probed", endpoint="Greeter.Hello",
                 path="in-process", code="OK") == 1
    with pytest.raises(ValueError):
        metrics.calls_in("micro_rpc_server_calls_total{service= 1\n")


async def test_agent_model_tool_flow_broker_and_store_metrics(fresh: CollectorRegistry) -> None:
    model = scripted.turns(scripted.call("greet_Greeter_Hello", name="x"), scripted.call("nope"), "done")
    done = anyio.Event()

    async def step(event: dict[str, Any], run: FlowRun) -> int:
        if event["n"] == 2:
            done.set()
        return int(event["n"])

    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("greet", runtime=rt)
        service.handle(Greeter())
        agent = micro.Agent("helper", services=["greet"], provider=model, runtime=rt)
        flow = micro.NewFlow("jobs", trigger="jobs.created", steps=[step], runtime=rt)
        async with service, agent, flow:
            rsp = await agent.ask("greet x")
            for n in (1, 2):
                await rt.client.publish("jobs.created", {"n": n}, headers={"Micro-Id": f"e{n}"})
            with anyio.fail_after(10):
                await done.wait()
                while len([r for r in await flow.runs.list(10) if r.status == "completed"]) < 2:
                    await anyio.wait_all_tasks_blocked()
            found = samples(metrics.exposition()[0])
            record = await agent.runs.get(rsp.run_id)
    assert rsp.reply == "done" and record is not None
    labels = {"provider": model.name, "model": model.model}
    assert value(found, "micro_agent_runs_total", agent="helper", status="completed") == 1
    assert value(found, "micro_agent_tool_calls_total", agent="helper", tool="greet_Greeter_Hello", outcome="ok") == 1
    assert value(found, "micro_agent_tool_calls_total", agent="helper", tool="nope", outcome="error") == 1
    assert value(found, "micro_model_calls_total", **labels, outcome="ok") == 3
    assert value(found, "micro_model_call_duration_seconds_count", **labels) == 3
    assert value(found, "micro_model_tokens_total", **labels, kind="output") == record.usage.output_tokens > 0
    assert value(found, "micro_model_tokens_total", **labels, kind="input") == record.usage.input_tokens > 0
    assert value(found, "micro_flow_events_total", flow="jobs", outcome="completed") == 2
    assert value(found, "micro_broker_published_total", broker="MemoryBroker", topic="jobs.created") == 2
    assert value(found, "micro_broker_consumed_total", broker="MemoryBroker", topic="jobs.created", outcome="ok") == 2
    store = {"backend": "MemoryStore"}
    assert value(found, "micro_store_operations_total", **store, operation="write", outcome="ok") >= 4
    assert value(found, "micro_store_operation_duration_seconds_count", **store, operation="write") == value(
        found, "micro_store_operations_total", **store, operation="write", outcome="ok")


async def test_runs_waiting_gauge_follows_a_run_that_waits_for_approval(fresh: CollectorRegistry) -> None:
    """micro_runs_waiting counts the agent's paused runs from the store's index: 1 while the approval is
    pending, 0 once it is given (updated on each change in this process, not only every 15 s)."""
    model = scripted.turns(scripted.call("greet_Greeter_Hello", name="x"), "done")

    async def gauge_reads(n: float) -> None:
        with anyio.fail_after(10):
            while value(samples(metrics.exposition()[0]), "micro_runs_waiting", owner="careful",
                        status="paused") != n:
                await anyio.wait_all_tasks_blocked()

    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("greet", runtime=rt)
        service.handle(Greeter())
        agent = micro.Agent("careful", services=["greet"], provider=model, runtime=rt,
                            needs_approval=["greet_Greeter_Hello"])
        async with service, agent:
            await gauge_reads(0)
            rsp = await agent.ask("greet x")
            assert rsp.status == "paused"
            await gauge_reads(1)
            record = await agent.runs.get(rsp.run_id)
            assert record is not None and record.expires > 0
            # past its pause_ttl a run no longer waits: the index counts it as expired
            assert await agent.runs.waiting_counts(record.expires) == {"expired": 1}
            assert await agent.runs.waiting_counts(record.expires - 1) == {"paused": 1}
            done = await agent.resume(rsp.run_id, approve=True)
            assert done.status == "completed"
            await gauge_reads(0)
            found = samples(metrics.exposition()[0])
    assert value(found, "micro_runs_waiting", owner="careful", status="input_required") == 0
    assert ("micro_runs_waiting", frozenset({("owner", "careful"), ("status", "waiting")})) in found


def test_labels_from_outside_the_code_keep_at_most_max_values(fresh: CollectorRegistry) -> None:
    for i in range(metrics.MAX_VALUES + 5):
        metrics.count("published", "MemoryBroker", f"topic.{i}", bounded=1)
    found = samples(metrics.exposition()[0])
    topics = {dict(k[1])["topic"] for k in found if k[0] == "micro_broker_published_total"}
    assert len(topics) == metrics.MAX_VALUES + 1
    assert value(found, "micro_broker_published_total", broker="MemoryBroker", topic="other") == 5


async def test_the_gateways_serve_metrics_behind_their_token_and_health_without(fresh: CollectorRegistry) -> None:
    from micro.gateway.http import app
    from micro.gateway.mcp import MCPGateway

    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("greet", runtime=rt)
        service.handle(Greeter())
        async with service:
            await rt.client.call("greet", "Greeter.Hello", {"name": "a"})
            for asgi in (app(rt, token="s3cret"), MCPGateway(rt).http_app(token="s3cret")):
                transport = httpx.ASGITransport(asgi)
                async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                    assert (await http.get("/health/live")).text == "live\n"
                    assert (await http.get("/health/ready")).text == "ready\n"
                    assert (await http.get("/metrics")).status_code == 401
                    scraped = await http.get("/metrics", headers={"Authorization": "Bearer s3cret"})
                    assert scraped.status_code == 200
                    found = samples(scraped.content)
                    assert value(found, "micro_rpc_server_calls_total", service="greet", endpoint="Greeter.Hello",
                                 path="in-process", code="OK") == 1


def test_rpc_child_buckets_and_codes_before_and_after_a_fold(fresh: CollectorRegistry) -> None:
    """A call's seconds land in the first bucket whose bound is >= them (Prometheus' ``le``), the same
    while an OK call waits in ``pending`` and once folded; other codes are counted at once."""
    child = metrics.rpc("server", "unit", "U.Call", "in-process")
    for code, seconds in (("OK", 0.0001), ("OK", 0.00011), ("OK", 100.0), ("INTERNAL", 0.003), ("OK", 0.00002)):
        child.in_flight += 1
        child.done(code, seconds)
    child.in_flight += 1  # one still running

    def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {k: v for k, v in samples(metrics.exposition()[0]).items() if dict(k[1]).get("service") == "unit"}

    before = scraped()
    child.fold()
    assert not child.pending
    assert scraped() == before
    ep = {"service": "unit", "endpoint": "U.Call", "path": "in-process"}
    buckets = {le: value(before, "micro_rpc_server_duration_seconds_bucket", **ep, le=le)
               for le in ("0.0001", "0.00025", "0.005", "60.0", "+Inf")}
    assert buckets == {"0.0001": 2, "0.00025": 3, "0.005": 4, "60.0": 4, "+Inf": 5}
    assert value(before, "micro_rpc_server_duration_seconds_count", **ep) == 5
    assert value(before, "micro_rpc_server_duration_seconds_sum", **ep) == pytest.approx(100.00323)
    assert value(before, "micro_rpc_server_calls_total", **ep, code="OK") == 4
    assert value(before, "micro_rpc_server_calls_total", **ep, code="INTERNAL") == 1
    assert value(before, "micro_rpc_server_in_flight", **ep) == 1


async def test_rpc_counts_stay_exact_across_folds_and_scrapes_from_another_thread(
        fresh: CollectorRegistry) -> None:
    """More in-process calls than two folds hold, scraped from a thread meanwhile (an exporter of the
    app's own): every scrape counts no more calls than were made, never fewer than the last one did,
    and the last one counts them all, on both sides."""
    from prometheus_client import generate_latest

    ep = {"service": "greet", "endpoint": "Greeter.Hello", "path": "in-process"}
    seen: list[tuple[float, float, float]] = []  # (server calls, server histogram count, client calls)
    made = 0
    stop = False
    scraped = anyio.Event()

    def scrape() -> None:
        found = samples(generate_latest(fresh))
        seen.append((value(found, "micro_rpc_server_calls_total", **ep, code="OK"),
                     value(found, "micro_rpc_server_duration_seconds_count", **ep),
                     value(found, "micro_rpc_client_calls_total", **ep, code="OK")))

    async def scraping() -> None:
        nonlocal scraped
        while not stop:
            before = made
            await anyio.to_thread.run_sync(scrape)  # the loop goes on making calls meanwhile
            assert all(n <= made for n in seen[-1]) and seen[-1][0] >= before
            scraped.set()
            scraped = anyio.Event()

    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        service = micro.Service("greet", runtime=rt)
        service.handle(Greeter())
        async with service:
            async with anyio.create_task_group() as tg:
                tg.start_soon(scraping)
                for i in range(2 * metrics.FOLD_AT + 7):
                    await rt.client.call("greet", "Greeter.Hello", {"name": "a"})
                    made += 1
                    if i % 64 == 63:  # an in-process call never yields: wait for a scrape now and then
                        await scraped.wait()
                stop = True
            scrape()
    assert len(seen) >= 2 * metrics.FOLD_AT // 64
    for earlier, later in itertools.pairwise(seen):
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), (earlier, later)
    assert seen[-1] == (made, made, made)


def test_an_ok_call_recorded_from_another_thread_during_a_fold_is_counted_once() -> None:
    """Two event loops in two threads recording on one RPC child: an OK call whose append lands
    while the other thread folds (it took the list before the fold) is counted, once, in the calls,
    the buckets and the sum; the other calls are counted with them."""
    child = metrics._Rpc()
    held = child.pending  # what the other thread's appender holds when this one folds
    for _ in range(metrics.FOLD_AT):
        child.in_flight += 1
        child.done("OK", 0.001)  # the last one folds
    assert child.ok == metrics.FOLD_AT
    held.append(2.0)  # the other thread's call lands now
    child.in_flight += 1
    child.done("INTERNAL", 0.5)
    for _ in range(2):  # read before and after the next fold
        codes, buckets, total, in_flight = child.read()
        assert codes == {"OK": metrics.FOLD_AT + 1, "INTERNAL": 1}
        assert sum(buckets) == metrics.FOLD_AT + 2 and in_flight == 0
        assert total == pytest.approx(metrics.FOLD_AT * 0.001 + 2.5)
        assert child.calls() == metrics.FOLD_AT + 2
        child.fold()
    assert child.ok == metrics.FOLD_AT + 1 and child.pending == []
