"""A service for multi-process tests: `python peer.py NAME` serves Peer.Hello and Peer.Ask.

It knows only its environment (MICRO_REGISTRY, MICRO_HOME); it prints "ready" once
registered and runs until SIGTERM/SIGINT.
"""

import asyncio
import os
import sys

import msgspec

import micro


class HelloRequest(msgspec.Struct):
    name: str = ""


class HelloResponse(msgspec.Struct):
    greeting: str
    pid: int


class AskRequest(msgspec.Struct):
    target: str


class Peer:
    def __init__(self, service: micro.Service) -> None:
        self.service = service

    async def Hello(self, req: HelloRequest) -> HelloResponse:
        """Greet the caller."""
        return HelloResponse(f"hello {req.name} from {self.service.name}", os.getpid())

    async def Ask(self, req: AskRequest) -> HelloResponse:
        """Call Peer.Hello on another service and return its answer."""
        rsp = await self.service.client.call(req.target, "Peer.Hello", {"name": self.service.name},
                                             response_type=HelloResponse)
        return rsp


async def main(name: str) -> None:
    service = micro.New(name, ttl=float(os.environ.get("PEER_TTL", "15")))
    service.handle(Peer(service))
    async with service:
        print("ready", flush=True)
        await service.serve_forever() if hasattr(service, "serve_forever") else await _until_signal()


async def _until_signal() -> None:
    import anyio

    from micro.service.service import stop_on_signals

    async with anyio.create_task_group() as tg:
        await tg.start(stop_on_signals, tg.cancel_scope)
        await anyio.sleep_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
