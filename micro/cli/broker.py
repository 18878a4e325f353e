"""``micro publish TOPIC JSON`` and ``micro subscribe TOPIC``: the message bus from a terminal.

Both use the broker of ``--broker``, else ``MICRO_BROKER``, else ``local://`` (the
machine-wide broker ``make run`` starts the example on): the in-process ``memory://``
default of apps reaches no other process. ``subscribe`` prints each message as one
JSON line (``{"topic", "id", "headers", "data"}``) until Ctrl-C; ``--queue`` joins a
queue group. Both refuse ``memory://`` when it is asked for: from a terminal of its
own, a message published there reaches no one and nothing can arrive, so they say
which broker to set instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import click
import msgspec

from micro.cli.main import cli_runtime, fail, main, out, run_async

_decode = msgspec.json.Decoder().decode


def _url(broker_url: str | None) -> str:
    """``--broker``, else ``MICRO_BROKER``, else ``local://``: a broker other processes on this machine share."""
    return broker_url or os.environ.get("MICRO_BROKER") or "local://"


def _shared(rt: Any, what: str) -> None:
    """Refuse a broker that only this process can use."""
    if str(getattr(rt.broker, "url", "")).startswith("memory:"):  # local:// builds on MemoryBroker: by URL
        fail(f"cannot {what}: the broker is memory://, which only this process sees. Set MICRO_BROKER to a "
             "broker other processes share, here and in the app's process: local:// (this machine, no "
             "server) or nats://HOST:4222 (or pass --broker)", 2)


@main.command()
@click.argument("topic")
@click.argument("message", required=False)
@click.option("--broker", "broker_url", help="Broker URL (default: $MICRO_BROKER, else local://).")
@click.option("-H", "--header", "headers", multiple=True, metavar="KEY=VALUE", help="Message header (repeatable).")
@run_async
async def publish(topic: str, message: str | None, broker_url: str | None, headers: tuple[str, ...]) -> None:
    """Publish a JSON MESSAGE on TOPIC (from the argument, or stdin with - or no argument)."""
    if message is None or message == "-":
        message = sys.stdin.read()
    try:
        body = _decode(message.encode())
    except msgspec.DecodeError as exc:
        fail(f"the message is not valid JSON ({exc})", 2)
    hdrs = {}
    for item in headers:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"header {item!r} is not KEY=VALUE", 2)
        hdrs[key] = value
    async with cli_runtime(broker=_url(broker_url)) as rt:
        _shared(rt, f"publish to {topic}")
        await rt.broker.publish(topic, body, headers=hdrs)
    out.print(f"published to {topic}")


@main.command()
@click.argument("topic")
@click.option("--broker", "broker_url", help="Broker URL (default: $MICRO_BROKER, else local://).")
@click.option("--queue", help="Join this queue group (each message to one member).")
@click.option("-n", "--count", type=int, default=0, help="Exit after this many messages (0: run until Ctrl-C).")
@run_async
async def subscribe(topic: str, broker_url: str | None, queue: str | None, count: int) -> None:
    """Print the messages on TOPIC (wildcards * and > allowed) as JSON lines until Ctrl-C."""
    from micro.service.service import stop_on_signals

    seen = 0
    done = anyio.Event()

    async def show(msg: Any) -> None:
        nonlocal seen
        try:
            data: Any = _decode(msg.data)
        except msgspec.DecodeError:
            data = msg.data.decode("utf-8", "replace")
        line = {"topic": msg.topic, "id": msg.id, "headers": msg.headers, "data": data}
        sys.stdout.write(msgspec.json.encode(line).decode() + "\n")
        sys.stdout.flush()
        seen += 1
        if count and seen >= count:
            done.set()

    async with cli_runtime(broker=_url(broker_url)) as rt:
        _shared(rt, f"subscribe to {topic}")
        sub = await rt.broker.subscribe(topic, show, queue=queue)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(stop_on_signals, tg.cancel_scope)
                sys.stderr.write(f"subscribed to {topic}\n")
                sys.stderr.flush()
                await done.wait()
                tg.cancel_scope.cancel()
        finally:
            await sub.unsubscribe()
