"""``micro bench SERVICE ENDPOINT [JSON]``: load-test an endpoint through micro's public client.

A closed loop (``-c`` callers, each calling again as soon as its call returns) for
``-d`` seconds or ``-n`` calls, or an open loop at ``--rate`` calls per second spread
over the same callers. It reports what an application would see: throughput,
latency percentiles (p50/p90/p99/max), a small latency histogram and errors by
status, live while it runs and once at the end (``--json`` for scripts). ``--wire``
picks micro's native wire or gRPC (the client's transport; ``native-tcp``: the native wire over
TCP also to nodes on this host, as ``MICRO_UNIX=0`` does), and the summary says what carried the
calls (``via``: connections by ``native unix``, ``native tcp``, ``grpc``). ``--messages FILE.jsonl``
cycles through one request per line (for ``Agent.Chat``: ``{"message": "..."}``), and
for agents it reports tool calls per run. The anchors are ghz (gRPC) and hey (HTTP).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.live import Live
from rich.table import Table

from micro.cli.call import parse_request
from micro.cli.main import cli_runtime, main, missing, out, run_async
from micro.errors import Error, ServiceNotFound, UsageError

_BOUNDS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Stats:
    """Latencies (seconds) and outcomes of the calls made so far."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.tool_calls = 0
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def calls(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    @property
    def elapsed(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ok = len(lat)

        def pct(p: float) -> float:
            return round(lat[min(ok - 1, max(0, math.ceil(p / 100 * ok) - 1))] * 1000, 3) if ok else 0.0

        counts = [0] * (len(_BOUNDS_MS) + 1)
        for x in lat:
            counts[bisect.bisect_left(_BOUNDS_MS, x * 1000)] += 1
        histogram = [{"le_ms": b, "count": c} for b, c in zip((*_BOUNDS_MS, None), counts, strict=True) if c]
        elapsed = self.elapsed
        return {
            "calls": self.calls,
            "ok": ok,
            "errors": dict(sorted(self.errors.items())),
            "seconds": round(elapsed, 3),
            "calls_per_s": round(self.calls / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "max": round(lat[-1] * 1000, 3) if ok else 0.0,
                           "mean": round(sum(lat) / ok * 1000, 3) if ok else 0.0},
            "histogram": histogram,
            "tool_calls_per_run": round(self.tool_calls / ok, 3) if ok else 0.0,
        }


def _duration(text: str) -> float:
    """``10s``, ``500ms``, ``2m`` or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, unit = text, "s"
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"--duration {text!r} is not a duration: write 10s, 500ms or 2m") from None
    if not value > 0 or not math.isfinite(value):
        raise UsageError(f"--duration {text!r} must be more than zero")
    return value


def _requests(request: str | None, messages: Path | None) -> list[Any]:
    if messages is None:
        return [parse_request(request or "{}")]
    if request is not None:
        raise UsageError("give the request as JSON or --messages FILE.jsonl, not both")
    try:
        lines = messages.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--messages {messages}: {exc.strerror or exc}") from None
    found: list[Any] = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                found.append(parse_request(line))
            except UsageError as exc:
                raise UsageError(f"--messages {messages} line {n}: {exc}") from None
    if not found:
        raise UsageError(f"--messages {messages} has no requests: write one JSON object per line")
    return found


def _table(service: str, endpoint: str, wire: str, s: dict[str, Any]) -> Table:
    t = Table(title=f"micro bench {service} {endpoint} ({wire})", show_header=False)
    t.add_row("calls", f"{s['calls']:,} ({s['ok']:,} ok) in {s['seconds']:.1f} s")
    t.add_row("throughput", f"{s['calls_per_s']:,.1f} calls/s")
    lat = s["latency_ms"]
    t.add_row("latency", f"p50 {lat['p50']} ms · p90 {lat['p90']} ms · p99 {lat['p99']} ms · max {lat['max']} ms")
    if s["errors"]:
        t.add_row("errors", ", ".join(f"{k} {v:,}" for k, v in s["errors"].items()))
    if s["tool_calls_per_run"]:
        t.add_row("tool calls", f"{s['tool_calls_per_run']} per run")
    if s.get("via"):  # known once the run is over
        t.add_row("via", ", ".join(f"{k} ×{v}" for k, v in s["via"].items()))
    if s["histogram"]:
        top = max(h["count"] for h in s["histogram"])
        for h in s["histogram"]:
            label = f"≤ {h['le_ms']} ms" if h["le_ms"] is not None else f"> {_BOUNDS_MS[-1]} ms"
            t.add_row(label, f"{'█' * max(1, round(30 * h['count'] / top))} {h['count']:,}")
    return t


async def run_bench(service: str, endpoint: str, requests: list[Any], *, concurrency: int, duration: float | None,
                    total: int | None, rate: float | None, timeout: float, wire: str,
                    live: bool) -> dict[str, Any]:
    """Run the load and return the summary (what ``--json`` prints)."""
    stats = Stats()
    runtime = cli_runtime(transport="native" if wire == "native-tcp" else wire)
    if wire == "native-tcp":
        runtime.client.unix = False  # before any call made a pool: no node's socket is used
    via: dict[str, int] = {}
    async with runtime as rt:
        try:
            _, ep = await rt.client.resolve(service, endpoint)
        except ServiceNotFound:
            await missing(rt, service)
        if ep.streaming:
            raise UsageError(f"{service} {endpoint} streams its responses: micro bench calls unary endpoints")
        call = rt.client.call
        issued = 0
        deadline = None if duration is None else time.perf_counter() + duration
        start = time.perf_counter()

        def next_index() -> int | None:
            nonlocal issued
            if total is not None and issued >= total:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

        async def caller() -> None:
            while (i := next_index()) is not None:
                if rate is not None:  # the open loop: call i leaves at start + i / rate, late or not
                    wait = start + i / rate - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                t0 = time.perf_counter()
                try:
                    rsp = await call(service, endpoint, requests[i % len(requests)], timeout=timeout)
                except Error as exc:
                    stats.errors[exc.code] += 1
                    continue
                stats.latencies.append(time.perf_counter() - t0)
                if isinstance(rsp, dict) and isinstance(rsp.get("tool_calls"), list):
                    stats.tool_calls += len(rsp["tool_calls"])

        stats.started = time.perf_counter()
        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        try:
            if live:
                with Live(_table(service, endpoint, wire, stats.summary()), console=out, refresh_per_second=4,
                          transient=True) as view:
                    while not all(c.done() for c in callers):
                        await asyncio.wait(callers, timeout=0.25)
                        view.update(_table(service, endpoint, wire, stats.summary()))
            await asyncio.gather(*callers)
        finally:
            for c in callers:
                c.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        stats.ended = time.perf_counter()
        via = await _via(rt, service)
    summary = stats.summary()
    return {"service": service, "endpoint": endpoint, "wire": wire, "concurrency": concurrency,
            "rate": rate, **summary, "via": via}


async def _via(rt: Any, service: str) -> dict[str, int]:
    """The connections open to the service's nodes after the run, by what carries them."""
    got: Counter[str] = Counter()
    try:
        records = await rt.client.lookup(service)
    except Error:
        return {}
    for record in records:
        for node in record.nodes:
            try:
                pool = rt.client.channel(node)
            except Error:  # a node this transport does not reach (no native address with --wire native)
                continue
            for how in pool.connected():
                got["grpc" if how == "grpc" else f"native {how}"] += 1
    return dict(sorted(got.items()))


@main.command()
@click.argument("service")
@click.argument("endpoint")
@click.argument("request", required=False)
@click.option("-c", "--concurrency", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Callers at once.")
@click.option("-d", "--duration", default=None, help="How long, e.g. 10s, 500ms, 2m (default 10s; not with -n).")
@click.option("-n", "--requests", "total", type=click.IntRange(1), default=None, help="Stop after this many calls.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Calls per second in all (an open loop); without it each caller calls again at once.")
@click.option("--wire", type=click.Choice(["auto", "native", "native-tcp", "grpc"]), default="auto",
              show_default=True,
              help="micro's native wire or gRPC (auto: native where the node has it; native-tcp: the native wire "
                   "over TCP, not a node's Unix socket on this host, as MICRO_UNIX=0).")
@click.option("--messages", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSONL file of requests to cycle through (e.g. Agent.Chat messages).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds each call may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@run_async
async def bench(service: str, endpoint: str, request: str | None, concurrency: int, duration: str | None,
                total: int | None, rate: float | None, wire: str, messages: Path | None, timeout: float,
                as_json: bool) -> None:
    """Load-test ENDPOINT of SERVICE with a JSON REQUEST and report throughput and latencies.

    \b
    Examples:
      micro bench task Task.ListOverdue '{"user_id": "alice"}' -c 64 -d 10s
      micro bench task Task.ListOverdue '{"user_id": "alice"}' -n 10000 --wire grpc --json
      micro bench task-mgr Agent.Chat --messages chats.jsonl -c 4 -d 30s
    """
    if duration is not None and total is not None:
        raise UsageError("give -d/--duration or -n/--requests, not both")
    seconds = _duration(duration) if duration is not None else (None if total is not None else 10.0)
    summary = await run_bench(service, endpoint, _requests(request, messages), concurrency=concurrency,
                              duration=seconds, total=total, rate=rate, timeout=timeout, wire=wire,
                              live=not as_json and out.is_terminal)
    if as_json:
        out.print_json(msgspec.json.encode(summary).decode())
    else:
        out.print(_table(service, endpoint, wire, summary))
