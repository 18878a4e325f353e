"""``micro call SERVICE ENDPOINT [JSON | -]``: call an endpoint and print the response as JSON."""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec

from micro.cli.main import cli_runtime, fail, main, missing, out, run_async
from micro.errors import ServiceNotFound, UsageError

_EXAMPLE = "pass an object such as '{\"user_id\": \"alice\"}'"


def parse_request(request: str | bytes) -> Any:
    """The JSON value of a ``micro call`` request (empty: ``{}``), or ``UsageError`` (exit 2) saying why not."""
    try:
        data = request.encode() if isinstance(request, str) else request
    except UnicodeEncodeError:  # argument bytes that are not UTF-8 arrive as lone surrogates
        raise UsageError(f"the request is not valid UTF-8 text: {_EXAMPLE}") from None
    try:
        return msgspec.json.decode(data or b"{}")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # msgspec raises RecursionError for nesting deeper than the stack, UnicodeDecodeError for non-UTF-8
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UsageError(f"the request is not valid JSON ({reason}): {_EXAMPLE}") from None


@main.command()
@click.argument("service")
@click.argument("endpoint")
@click.argument("request", required=False)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before giving up.")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Call metadata (repeatable).")
@run_async
async def call(service: str, endpoint: str, request: str | None, timeout: float,
               metadata: tuple[str, ...]) -> None:
    """Call ENDPOINT of SERVICE with a JSON REQUEST (from the argument, or stdin with - or no argument).

    \b
    Example:
      micro call task Task.ListOverdue '{"user_id": "alice"}'
    """
    if request is None or request == "-":
        body = parse_request("{}" if request is None and sys.stdin.isatty() else sys.stdin.buffer.read())
    else:
        body = parse_request(request)
    md = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"metadata {item!r} is not KEY=VALUE", 2)
        md[key.lower()] = value
    async with cli_runtime() as rt:
        try:
            _, ep = await rt.client.resolve(service, endpoint)
        except ServiceNotFound:
            await missing(rt, service)
        if ep.streaming:
            async for item in rt.client.stream(service, endpoint, body, timeout=timeout, metadata=md):
                out.print(msgspec.json.encode(item).decode(), markup=False)
        else:
            rsp = await rt.client.call(service, endpoint, body, timeout=timeout, metadata=md)
            out.print_json(msgspec.json.encode(rsp).decode())
