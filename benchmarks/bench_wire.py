"""Issue 23: the native wire's transports and event loops. Ratios within one run.

Two server processes (``benchmarks._call_server wire``) serve bench_call's JSON handler,
one on the stock asyncio loop and one on uvloop, each as two services: one with a Unix
socket (its clients on this host use it) and one on TCP only. Two client processes
(``benchmarks._wire_client``), one per loop, call their loop's server through micro's
public client (``transport="native"``, a 60 s deadline per call); a client and its server
run on the same loop. N workers each make sequential calls; calls/s at N = 1 and 64.

- **Unix socket vs TCP** (``unix_vs_tcp``), on each loop, at 1 and 64 in flight.
- **uvloop vs the stock loop** (``uvloop_vs_asyncio``), over TCP and over the socket.

Repetitions are interleaved (every side once per repetition, the order rotated), so drift
on a noisy machine hits all sides; a ratio is the median of the per-repetition ratios.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile

from benchmarks.bench_call import ROOT, _median_ratio, _spawn, _stop

Result = tuple[str, float, str]

REPS = 7
INFLIGHT = (1, 64)
TARGET_S = 0.25  # a measurement's length at its side's warm-up rate
MIN_CALLS = {1: 300, 64: 64 * 20}
LOOPS = ("asyncio", "uvloop")
OVER = ("unix", "tcp")


class _Worker:
    """A client process: one line per measurement, one rate back."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def rate(self, service: str, workers: int, calls: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{service} {workers} {calls}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError(f"the {service} client exited (code {await self.proc.wait()})")
        return float(line)


async def _client(env: dict[str, str], prefix: str, uvloop: bool) -> tuple[asyncio.subprocess.Process, _Worker]:
    args = ["-m", "benchmarks._wire_client", "--prefix", prefix] + (["--uvloop"] if uvloop else [])
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
                                                start_new_session=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the {prefix} client did not start (exit code {await proc.wait()})")
        return proc, _Worker(proc)
    except BaseException:
        await _stop(proc)
        raise


async def run() -> list[Result]:
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="micro-bench-") as home:
        env = {k: v for k, v in os.environ.items() if k not in ("MICRO_REGISTRY", "MICRO_TRANSPORT", "MICRO_LOOP")}
        env["MICRO_HOME"] = home
        try:
            workers: dict[str, _Worker] = {}
            for loop in LOOPS:
                flags = ["--uvloop"] if loop == "uvloop" else []
                proc, _ = await _spawn("wire", env, ["--prefix", f"w{loop}", *flags])
                procs.append(proc)
                proc, worker = await _client(env, f"w{loop}", loop == "uvloop")
                procs.append(proc)
                workers[loop] = worker
            sides = [(loop, over, n) for n in INFLIGHT for loop in LOOPS for over in OVER]
            counts: dict[tuple[str, str, int], int] = {}
            for loop, over, n in sides:  # warm up, and size each side's call count from its own rate
                await workers[loop].rate(f"w{loop}-{over}", n, MIN_CALLS[n])
                warm = await workers[loop].rate(f"w{loop}-{over}", n, MIN_CALLS[n])
                counts[loop, over, n] = max(MIN_CALLS[n], n * round(warm * TARGET_S / n))
            rates: dict[tuple[str, str, int], list[float]] = {s: [] for s in sides}
            for rep in range(REPS):
                k = rep % len(sides)
                for loop, over, n in sides[k:] + sides[:k]:  # rotate: no side always goes first
                    rates[loop, over, n].append(await workers[loop].rate(f"w{loop}-{over}", n,
                                                                         counts[loop, over, n]))
        finally:
            for proc in procs:
                await _stop(proc)
    return _figures(rates)


def _figures(rates: dict[tuple[str, str, int], list[float]]) -> list[Result]:
    out: list[Result] = []
    med = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(name: str, num: tuple[str, str, int], den: tuple[str, str, int], what: str) -> None:
        r, lo, hi = _median_ratio(rates[num], rates[den])
        out.append((name, round(r, 3), f"{what}: {med[num]:,.0f} vs {med[den]:,.0f} calls/s -> {r:.2f}x "
                                       f"({REPS} reps: {lo:.2f}-{hi:.2f})"))

    for loop in LOOPS:
        for n in INFLIGHT:
            ratio(f"wire.{loop}.c{n}.unix_vs_tcp", (loop, "unix", n), (loop, "tcp", n),
                  f"native wire on {loop}, {n} in flight, Unix socket vs TCP (loopback), 2 processes")
    for over in OVER:
        for n in INFLIGHT:
            ratio(f"wire.{over}.c{n}.uvloop_vs_asyncio", ("uvloop", over, n), ("asyncio", over, n),
                  f"native wire over {'a Unix socket' if over == 'unix' else 'TCP'}, {n} in flight, uvloop vs the "
                  "stock asyncio loop (client and server on it)")
    return out


if __name__ == "__main__":
    for _, _, line in asyncio.run(run()):
        print(line)
