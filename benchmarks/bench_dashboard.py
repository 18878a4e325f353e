"""Issue 20's dashboard benchmark: what serving the dashboard costs ``micro run``'s start-up.

``micro run examples/tasks`` is started REPS times with ``--no-http`` and REPS times with the
dashboard (``--http-address 127.0.0.1:0``), alternating which goes first, each in a fresh
``MICRO_HOME``. A start-up is the wall time from spawning the process to its ``Ctrl-C to stop``
line (every service registered and serving). Target (issue 20): the dashboard adds < 20 ms.
With the dashboard, the time until its first page answers is measured too (the HTTP stack is
imported in a worker thread after the services are up; connections wait in the socket's
backlog until then): that one is context, not a target.

The dashboard is not on the call path: calls between services never pass through the HTTP
server (it is one more client of the runtime). To check that it costs the services nothing
while it runs, ``micro bench task Task.ListOverdue`` (16 callers, CALL_SECONDS each) loads the
example system with the dashboard serving an open page's live stream, and with ``--no-http``,
alternating; the figure is the ratio of their throughputs (target: 1.0 within the noise).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

Result = tuple[str, float, str]

ROOT = Path(__file__).resolve().parent.parent
REPS = 15
PAGE_REPS = 5
CALL_REPS = 4
CALL_SECONDS = 3
READY = b"Ctrl-C to stop"


async def _page(url: str, deadline: float) -> float:
    """Seconds until GET / answers 200 (polling: a benchmark may)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    while time.perf_counter() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.002)
            continue
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        writer.close()
        await writer.wait_closed()
        if b" 200 " in status:
            return time.perf_counter()
        raise RuntimeError(f"the dashboard answered {status!r}")
    raise TimeoutError("the dashboard never answered")


async def _start(http: bool, *, page: bool = False) -> tuple[float, float | None]:
    """(seconds to the ready line, seconds to the first page or None) for one ``micro run``."""
    with tempfile.TemporaryDirectory(prefix="micro-bench-dash-") as home:
        env = {**os.environ, "MICRO_HOME": home, "MICRO_BROKER": "local://"}
        args = ["--http-address", "127.0.0.1:0"] if http else ["--no-http"]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "micro.cli", "run", "examples/tasks", *args,
                                                    cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        url = None
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if not line:
                    raise RuntimeError("micro run exited before it was ready")
                found = re.match(rb"dashboard: (http://\S+)", line)
                if found:
                    url = found.group(1).decode()
                if READY in line:
                    ready = time.perf_counter() - t0
                    break
            shown = (await _page(url, t0 + 60)) - t0 if page and url is not None else None
        finally:
            proc.send_signal(signal.SIGINT)
            await proc.communicate()
        return ready, shown


async def _throughput(http: bool) -> float:
    """Calls/s of ``micro bench`` against the example's Task.ListOverdue, with or without the dashboard (and
    then one open page's live stream)."""
    with tempfile.TemporaryDirectory(prefix="micro-bench-dash-") as home:
        env = {**os.environ, "MICRO_HOME": home, "MICRO_BROKER": "local://"}
        args = ["--http-address", "127.0.0.1:0"] if http else ["--no-http"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "micro.cli", "run", "examples/tasks", *args,
                                                    cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        live = None
        try:
            url = None
            while READY not in (line := await asyncio.wait_for(proc.stdout.readline(), 60)):
                if not line:
                    raise RuntimeError("micro run exited before it was ready")
                if found := re.match(rb"dashboard: (http://\S+)", line):
                    url = found.group(1).decode()
            if url is not None:  # a page left open: its live stream
                host, _, port = url.removeprefix("http://").rpartition(":")
                await _page(url, time.perf_counter() + 60)
                live = await asyncio.open_connection(host, int(port))
                live[1].write(f"GET /ui/events/services HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await live[0].readuntil(b"event: services")
            bench = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "micro.cli", "bench", "task", "Task.ListOverdue", '{"user_id": "alice"}',
                "-c", "16", "-d", f"{CALL_SECONDS}s", "--json", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
            out, _ = await bench.communicate()
            return float(json.loads(out)["calls_per_s"])
        finally:
            if live is not None:
                live[1].close()
            proc.send_signal(signal.SIGINT)
            await proc.communicate()


async def run() -> list[Result]:
    await _start(False)  # warm the file cache (imports) for both sides
    await _start(True)
    off: list[float] = []
    on: list[float] = []
    for rep in range(REPS):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for http in order:
            ready, _ = await _start(http)
            (on if http else off).append(ready)
    pages = [page for _ in range(PAGE_REPS) if (page := (await _start(True, page=True))[1]) is not None]
    rates_on: list[float] = []
    rates_off: list[float] = []
    for rep in range(CALL_REPS):
        for http in ((False, True) if rep % 2 == 0 else (True, False)):
            (rates_on if http else rates_off).append(await _throughput(http))
    call_ratio = statistics.median(a / b for a, b in zip(rates_on, rates_off, strict=True))
    added = [b - a for a, b in zip(off, on, strict=True)]
    med_off, med_on, med_added = statistics.median(off), statistics.median(on), statistics.median(added)
    best = min(on) - min(off)
    return [
        ("dashboard.startup_added_ms", round(med_added * 1000, 1),
         f"micro run examples/tasks: spawn to 'Ctrl-C to stop' {med_on * 1000:.0f} ms with the dashboard vs "
         f"{med_off * 1000:.0f} ms with --no-http (medians): {med_added * 1000:+.1f} ms, the median of the "
         f"differences of {REPS} alternating pairs (pairs {min(added) * 1000:+.0f}..{max(added) * 1000:+.0f} ms; "
         "target < 20 ms)"),
        ("dashboard.startup_added_best_ms", round(best * 1000, 1),
         f"the fastest of each side: {min(on) * 1000:.0f} vs {min(off) * 1000:.0f} ms, {best * 1000:+.1f} ms "
         "(the least disturbed by other load on the machine)"),
        ("dashboard.call_path_ratio", round(call_ratio, 3),
         f"micro bench task Task.ListOverdue (16 callers, {CALL_SECONDS} s): {statistics.median(rates_on):,.0f} "
         f"calls/s with the dashboard serving an open page vs {statistics.median(rates_off):,.0f} with --no-http: "
         f"{call_ratio:.3f}x (median of {CALL_REPS} alternating pairs; target 1.0: nothing on the call path)"),
        ("dashboard.first_page_ms", round(statistics.median(pages) * 1000, 1),
         f"(context) spawn to the dashboard's first page answered: {statistics.median(pages) * 1000:.0f} ms "
         f"(median of {len(pages)}): the HTTP stack loads after the services are up"),
    ]
