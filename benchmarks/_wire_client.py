"""``bench_wire``'s client process: micro's public client on the event loop it is told to use.

``python -m benchmarks._wire_client --prefix P [--uvloop]`` opens a Runtime (the ``local``
registry under ``$MICRO_HOME``, ``transport="native"``), calls ``P-unix`` and ``P-tcp`` once
each, checks that the first rides the Unix socket and the second TCP, prints ``ready``, then
answers each stdin line ``SERVICE WORKERS CALLS`` with the calls/s of ``WORKERS`` tasks making
``CALLS // WORKERS`` sequential calls each (every call with a 60 s deadline). It exits when
its stdin closes.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

from benchmarks._call_server import ListOverdueRequest, ListOverdueResponse

DEADLINE = 60.0


async def _main(prefix: str) -> None:
    import micro
    from micro.client.native import NativePool

    async with micro.Runtime(registry="local://", store="memory://", broker="memory://", transport="native") as rt:
        client = rt.client
        req = ListOverdueRequest("alice")
        for over in ("unix", "tcp"):
            service = f"{prefix}-{over}"
            rsp = await client.call(service, "TaskJSON.ListOverdue", req, response_type=ListOverdueResponse)
            assert rsp.total == 3, rsp
            (record,) = await client.lookup(service)
            pool = client.channel(record.nodes[0])
            assert isinstance(pool, NativePool) and (pool.unix is not None) == (over == "unix"), (over, pool.unix)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            service, workers, calls = line.split()
            n = int(workers)
            each = max(1, int(calls) // n)

            async def worker(service: str = service, each: int = each) -> None:
                for _ in range(each):
                    await client.call(service, "TaskJSON.ListOverdue", req, response_type=ListOverdueResponse,
                                      timeout=DEADLINE)

            gc.collect()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(n)))
            print(each * n / (time.perf_counter() - t0), flush=True)


def main() -> None:
    prefix = sys.argv[sys.argv.index("--prefix") + 1]
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.run(_main(prefix))
    else:
        asyncio.run(_main(prefix))


if __name__ == "__main__":
    from benchmarks._wire_client import main as _main_

    _main_()
