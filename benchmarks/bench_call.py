"""Issue 2's call benchmarks: every figure is a ratio against a baseline run in the same process.

(a) **in-process** ``client.call``: a micro service and its caller on one
    Runtime (memory backends) vs an asyncio Queue+Future request/response
    between two tasks running the same handler. Typed (msgspec in, msgspec out)
    and dict-in/dict-out. Sequential calls from one task; µs/call. Target: ≤ 1.0×.
(b) **gRPC over loopback, two processes**: micro's client (a Runtime that does
    not host the service, finding it through the ``local`` registry under a
    temporary ``MICRO_HOME``) against a micro service in a subprocess, vs raw
    grpclib with upb ``_pb2`` messages and hand-written stubs against a raw
    grpclib server in a subprocess. N workers each make a fixed number of
    sequential calls (the count per N is sized once from the baseline's warm-up
    rate, then the same for every side and repetition); calls/s at N = 1, 64 and
    256. micro is measured on both of its wires: proto-first (betterproto2
    messages, ``application/grpc``: the like-for-like comparison) and JSON
    (msgspec Structs, ``application/grpc+json``). Every call on both sides
    carries a 60 s deadline (micro always sends one). Targets: ≥ 1.0× at 64, and
    micro at 256 no slower than at 64.
(c) **any gRPC client**: the raw grpclib+upb client (the baseline's) calling
    micro's code-first endpoint over protobuf (the ``.proto`` micro derives from
    the msgspec Structs) and, for comparison, micro's proto-first endpoint, both
    ÷ raw. Target: code-first protobuf ≥ the proto-first figure (ratio of the two
    ≥ 1.0 at 64 in flight, within noise).
(d) **metrics**: the in-process typed call with ``micro.metrics.enable()`` ÷
    the same call with metrics off. Target: ≤ 1.10×.

Repetitions are interleaved (baseline, micro, baseline, …) so that drift on a
noisy machine hits both sides; a ratio is the median of the per-repetition
ratios, an absolute figure the median of its repetitions.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import micro
from benchmarks._call_server import SERVICE, ListOverdueRequest, ListOverdueResponse, Task
from benchmarks._proto import benchcall as bp
from benchmarks._rawpb import benchcall_pb2 as pb
from benchmarks._rawpb.benchcall_grpc import TaskStub
from micro import metrics

Result = tuple[str, float, str]
Call = Callable[[], Awaitable[Any]]

ROOT = Path(__file__).resolve().parent.parent

INPROC_REPS = 15
INPROC_CALLS = 10_000
GRPC_REPS = 13  # at most: fewer (never under GRPC_MIN_REPS) when the machine is too slow for the budget
GRPC_MIN_REPS = 5
GRPC_BUDGET_S = 70.0  # for the measured repetitions, estimated from the warm-up rates
GRPC_INFLIGHT = (1, 64, 256)
GRPC_MIN_EACH = {1: 150, 64: 12, 256: 6}  # sequential calls per worker, at least
GRPC_TARGET_S = 0.3  # a measurement's length at the raw baseline's warm-up rate
DEADLINE = 60.0


# -- helpers ---------------------------------------------------------------------------------


def _median_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def _seq_us(fn: Call, n: int) -> float:
    """µs per call of ``n`` sequential awaits of ``fn()``."""
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n * 1e6


async def _rate(fn: Call, workers: int, total: int) -> float:
    """calls/s of ``workers`` tasks each awaiting ``fn()`` ``total // workers`` times in a row."""
    each = max(1, total // workers)

    async def worker() -> None:
        for _ in range(each):
            await fn()

    gc.collect()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return each * workers / (time.perf_counter() - t0)


# -- (a) in-process --------------------------------------------------------------------------


async def _inproc() -> list[Result]:
    handler = Task()
    loop = asyncio.get_running_loop()

    # the baseline: a request queue served by a second task, a Future per call
    queue: asyncio.Queue[tuple[ListOverdueRequest, asyncio.Future[ListOverdueResponse]]] = asyncio.Queue()

    async def serve() -> None:
        while True:
            req, fut = await queue.get()
            try:
                fut.set_result(await handler.ListOverdue(req))
            except Exception as exc:
                fut.set_exception(exc)

    typed_req = ListOverdueRequest("alice")
    dict_req = {"user_id": "alice"}

    async def baseline() -> ListOverdueResponse:
        fut: asyncio.Future[ListOverdueResponse] = loop.create_future()
        queue.put_nowait((typed_req, fut))
        return await fut

    rt = micro.Runtime(registry="memory://", store="memory://", broker="memory://")
    server = asyncio.create_task(serve())
    try:
        async with rt:
            service = micro.New("benchtask", runtime=rt)
            service.handle(handler)
            async with service:
                call = rt.client.call

                def typed() -> Awaitable[Any]:
                    return call("benchtask", "Task.ListOverdue", typed_req, response_type=ListOverdueResponse)

                # the same service and call with metrics on: hooks are set up when runtimes and services are made
                metrics.enable()
                try:
                    metered = micro.Runtime(registry="memory://", store="memory://", broker="memory://")
                    async with metered:
                        on_service = micro.New("benchtask", runtime=metered)
                        on_service.handle(handler)
                        async with on_service:
                            on_us, off_us = await _metrics_cost(metered.client.call, call, typed_req)
                finally:
                    metrics.disable()

                def as_dict() -> Awaitable[Any]:
                    return call("benchtask", "Task.ListOverdue", dict_req)

                assert (await baseline()).total == 3
                assert (await typed()).total == 3
                assert (await as_dict())["total"] == 3
                for fn in (baseline, typed, as_dict):  # warm up
                    await _seq_us(fn, 2_000)
                base_us: list[float] = []
                typed_us: list[float] = []
                dict_us: list[float] = []
                for rep in range(INPROC_REPS):
                    first = rep % 2 == 0  # alternate which side goes first
                    if first:
                        base_us.append(await _seq_us(baseline, INPROC_CALLS))
                    typed_us.append(await _seq_us(typed, INPROC_CALLS))
                    dict_us.append(await _seq_us(as_dict, INPROC_CALLS))
                    if not first:
                        base_us.append(await _seq_us(baseline, INPROC_CALLS))
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)

    out: list[Result] = []
    r, lo, hi = _median_ratio(on_us, off_us)
    out.append((
        "inproc.metrics.ratio", round(r, 3),
        f"in-process typed call with metrics on (prometheus_client) vs off: {statistics.median(on_us):.1f} vs "
        f"{statistics.median(off_us):.1f} µs/call -> {r:.2f}x ({INPROC_REPS} reps: {lo:.2f}-{hi:.2f}; "
        f"target <= 1.10x: {_verdict(r <= 1.10)})",
    ))
    base = statistics.median(base_us)
    for label, name, us in (("typed msgspec in/out", "typed", typed_us), ("dict in/dict out", "dict", dict_us)):
        r, lo, hi = _median_ratio(us, base_us)
        out.append((
            f"inproc.{name}.ratio", round(r, 3),
            f"in-process client.call, {label}: micro {statistics.median(us):.1f} µs/call vs asyncio "
            f"Queue+Future {base:.1f} µs/call -> {r:.2f}x ({INPROC_REPS} reps: {lo:.2f}-{hi:.2f}; target <= 1.0x: "
            f"{_verdict(r <= 1.0)})",
        ))
    return out


async def _metrics_cost(on_call: Any, off_call: Any, req: Any) -> tuple[list[float], list[float]]:
    """µs/call with metrics on (a runtime made with them on) and off (one made with them off, the flag off)."""
    def on() -> Awaitable[Any]:
        return on_call("benchtask", "Task.ListOverdue", req, response_type=ListOverdueResponse)

    def off() -> Awaitable[Any]:
        return off_call("benchtask", "Task.ListOverdue", req, response_type=ListOverdueResponse)

    async def measure(fn: Call, enabled: bool, n: int) -> float:
        if enabled:
            metrics.enable()
        else:
            metrics.disable()
        return await _seq_us(fn, n)

    await measure(on, True, 2_000)
    await measure(off, False, 2_000)
    on_us: list[float] = []
    off_us: list[float] = []
    for rep in range(INPROC_REPS):
        pair = [(on, True, on_us), (off, False, off_us)]
        for fn, enabled, into in pair if rep % 2 == 0 else pair[::-1]:
            into.append(await measure(fn, enabled, INPROC_CALLS))
    return on_us, off_us


# -- (b) gRPC, two processes -----------------------------------------------------------------


async def _spawn(kind: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks._call_server", kind,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=ROOT, env=env, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        text = line.decode().strip()
        if not text.startswith("ready "):
            raise RuntimeError(f"the {kind} server did not start (exit code {await proc.wait()})")
        return proc, text.removeprefix("ready ")
    except BaseException:
        await _stop(proc)
        raise


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Close its stdin (it exits), then terminate, then kill: never leave it running."""
    try:
        if proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                pass
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 3)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _grpc() -> list[Result]:
    from grpclib.client import Channel, UnaryUnaryMethod

    procs: list[asyncio.subprocess.Process] = []
    reps = 0
    saved = os.environ.get("MICRO_HOME")
    with tempfile.TemporaryDirectory(prefix="micro-bench-") as home:
        env = {k: v for k, v in os.environ.items() if k != "MICRO_REGISTRY"}
        env["MICRO_HOME"] = home
        channel: Channel | None = None
        to_micro: Channel | None = None
        try:
            proc, micro_addr = await _spawn("micro", env)
            procs.append(proc)
            m_host, _, m_port = micro_addr.rpartition(":")
            to_micro = Channel(m_host, int(m_port))  # the raw grpclib+upb client, at micro's port
            upb_code_first = UnaryUnaryMethod(to_micro, "/benchcall.TaskJSON/ListOverdue",
                                              pb.ListOverdueRequest, pb.ListOverdueResponse)
            upb_proto_first = UnaryUnaryMethod(to_micro, "/benchcall.Task/ListOverdue",
                                               pb.ListOverdueRequest, pb.ListOverdueResponse)
            proc, raw_addr = await _spawn("raw", env)
            procs.append(proc)
            host, _, port = raw_addr.rpartition(":")
            channel = Channel(host, int(port))
            stub = TaskStub(channel)
            os.environ["MICRO_HOME"] = home  # the client runtime's local registry reads it
            async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
                assert SERVICE not in rt.local  # the network path, not the in-process one
                call = rt.client.call
                raw_req = pb.ListOverdueRequest(user_id="alice")
                bp_req = bp.ListOverdueRequest(user_id="alice")
                json_req = ListOverdueRequest("alice")

                def raw() -> Awaitable[Any]:
                    return stub.ListOverdue(raw_req, timeout=DEADLINE)

                def micro_proto() -> Awaitable[Any]:
                    return call(SERVICE, "Task.ListOverdue", bp_req, response_type=bp.ListOverdueResponse,
                                timeout=DEADLINE)

                def micro_json() -> Awaitable[Any]:
                    return call(SERVICE, "TaskJSON.ListOverdue", json_req, response_type=ListOverdueResponse,
                                timeout=DEADLINE)

                def code_first() -> Awaitable[Any]:
                    return upb_code_first(raw_req, timeout=DEADLINE)

                def proto_first() -> Awaitable[Any]:
                    return upb_proto_first(raw_req, timeout=DEADLINE)

                systems: dict[str, Call] = {"raw": raw, "proto": micro_proto, "json": micro_json,
                                            "upb_code_first": code_first, "upb_proto_first": proto_first}
                for name, fn in systems.items():
                    rsp = await fn()
                    assert rsp.total == 3 and len(rsp.records) == 3, (name, rsp)
                    await _rate(fn, 256, 2_048)  # warm up: connections open, code paths hot
                # one call count per concurrency, the same for every side and repetition, sized from
                # the baseline's rate so that the run stays short on a slow or busy machine
                counts: dict[int, int] = {}
                per_rep = 0.0
                for n in GRPC_INFLIGHT:
                    warm = await _rate(raw, n, n * GRPC_MIN_EACH[n])
                    counts[n] = n * max(GRPC_MIN_EACH[n], round(warm * GRPC_TARGET_S / n))
                    per_rep += counts[n] / warm * len(systems) * 1.3  # micro's sides are a bit slower
                reps = max(GRPC_MIN_REPS, min(GRPC_REPS, int(GRPC_BUDGET_S / per_rep)))
                rates: dict[tuple[str, int], list[float]] = {}
                order = list(systems)
                for rep in range(reps):
                    for n in GRPC_INFLIGHT:
                        k = rep % len(order)
                        for name in order[k:] + order[:k]:  # rotate: no side always goes first
                            rates.setdefault((name, n), []).append(await _rate(systems[name], n, counts[n]))
        finally:
            for ch in (channel, to_micro):
                if ch is not None:
                    ch.close()
            if saved is None:
                os.environ.pop("MICRO_HOME", None)
            else:
                os.environ["MICRO_HOME"] = saved
            for proc in procs:
                await _stop(proc)

    out: list[Result] = []
    labels = {
        "proto": "micro proto-first (betterproto2 messages, compiled codec, application/grpc)",
        "json": "micro JSON (msgspec, application/grpc+json)",
    }
    med = {k: statistics.median(v) for k, v in rates.items()}
    for wire in ("proto", "json"):
        for n in GRPC_INFLIGHT:
            r, lo, hi = _median_ratio(rates[wire, n], rates["raw", n])
            target = f"; target >= 1.0x: {_verdict(r >= 1.0)}" if n == 64 else ""
            out.append((
                f"grpc.{wire}.c{n}.ratio", round(r, 3),
                f"gRPC 2 processes, {n} in flight, {labels[wire]}: {med[wire, n]:,.0f} calls/s vs raw "
                f"grpclib+upb {med['raw', n]:,.0f} calls/s -> {r:.2f}x ({reps} reps: {lo:.2f}-{hi:.2f}{target})",
            ))
    for name, label in (("upb_code_first", "micro code-first (msgspec, protobuf from the derived .proto)"),
                        ("upb_proto_first", "micro proto-first (betterproto2)")):
        for n in GRPC_INFLIGHT:
            r, lo, hi = _median_ratio(rates[name, n], rates["raw", n])
            out.append((
                f"grpc.{name}.c{n}.ratio", round(r, 3),
                f"gRPC 2 processes, {n} in flight, a grpclib+upb client calling {label}: {med[name, n]:,.0f} "
                f"calls/s vs the raw grpclib+upb server {med['raw', n]:,.0f} -> {r:.2f}x "
                f"({reps} reps: {lo:.2f}-{hi:.2f})",
            ))
    for n in GRPC_INFLIGHT:
        r, lo, hi = _median_ratio(rates["upb_code_first", n], rates["upb_proto_first", n])
        target = f"; target >= 1.0x: {_verdict(r >= 0.97)} (within 3% noise)" if n == 64 else ""
        out.append((
            f"grpc.code_first_vs_proto_first.c{n}", round(r, 3),
            f"gRPC {n} in flight, protobuf to a code-first endpoint vs to a proto-first one (same upb client): "
            f"{med['upb_code_first', n]:,.0f} vs {med['upb_proto_first', n]:,.0f} calls/s -> {r:.2f}x "
            f"({reps} reps: {lo:.2f}-{hi:.2f}{target})",
        ))
    for name in ("proto", "json", "raw"):
        r, lo, hi = _median_ratio(rates[name, 256], rates[name, 64])
        who = labels.get(name, "raw grpclib+upb (baseline, one connection)")
        target = f"; target >= 1.0x: {_verdict(r >= 1.0)}" if name != "raw" else ""
        out.append((
            f"grpc.{name}.256_vs_64", round(r, 3),
            f"gRPC 256 vs 64 in flight, {who}: {med[name, 256]:,.0f} vs {med[name, 64]:,.0f} calls/s -> "
            f"{r:.2f}x ({reps} reps: {lo:.2f}-{hi:.2f}{target})",
        ))
    return out


async def run() -> list[Result]:
    return await _inproc() + await _grpc()


if __name__ == "__main__":
    for _, _, line in asyncio.run(run()):
        print(line)
