"""The ``micro`` command group and the plumbing every command shares.

Each command runs one coroutine on a fresh loop with a CLI runtime (registry and
broker from ``MICRO_REGISTRY`` / ``MICRO_BROKER``, the local registry by default;
an in-memory store, so inspecting never writes). A micro error ends the command
with one line on stderr and exit code 1; bad arguments exit with 2.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from micro import eventloop
from micro.errors import MicroError, UsageError, closest

P = ParamSpec("P")
T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # what str.splitlines splits on


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line on stderr and exit.

    The message is printed as it is: a service's error may quote what the caller sent,
    so rich markup (``[/x]``) and emoji codes in it are not interpreted, and line breaks
    are escaped (``\\n``) to keep it one line.
    """
    line = _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode(), message)
    err.print(f"[red]error:[/red] {escape(line)}", markup=True, emoji=False)
    raise SystemExit(code)


def _single(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one error each, or ``exc`` itself.

    A command's task group wraps an error raised in one of its tasks (a chat turn asks its
    agents in a task group): the user sees that error, not the group's traceback.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_async(fn: Callable[P, Awaitable[T]]) -> Callable[P, T | None]:
    """Run an async command; micro errors become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            try:
                return eventloop.run(fn(*args, **kwargs))  # type: ignore[arg-type]
            except BaseExceptionGroup as group:
                inner = _single(group)
                if inner is group:
                    raise
                raise inner from None
        except UsageError as exc:
            fail(str(exc), 2)
        except MicroError as exc:
            fail(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        return None

    return wrapper


def not_found(kind: str, name: str, names: Sequence[str], listing: str, *, other: str | None = None) -> str:
    """The one-line error for an unknown ``kind`` (agent, flow, service): what exists, and the closest name.

    ``listing`` is the command that lists them (``micro agent list``); ``other`` is what
    ``name`` is instead, when it is registered as another kind (a service, not an agent).
    """
    plural = "services" if kind == "service" else f"{kind}s"
    known = ", ".join(sorted(names)) if names else "none"
    guess = closest(name, names)
    suggestion = f"; did you mean {guess}?" if guess else f" (`{listing}` lists them)"
    if other is not None:
        return f"{name} is {_a(other)}, not {_a(kind)} ({plural}: {known}){suggestion}"
    return f"no {kind} {name!r} is registered ({plural}: {known}){suggestion}"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


async def missing(rt: Any, name: str, kind: str = "service") -> NoReturn:
    """Fail with :func:`not_found` for ``name``, naming what is registered of ``kind``
    (``service``: everything, agents and flows are services too).

    Example::

        try:
            rsp = await rt.client.call(service, endpoint, body)
        except ServiceNotFound:
            await missing(rt, service)
    """
    # micro's own records (the local broker's micro-broker) are no one's guess: not listed, never suggested
    records = [r for r in await rt.registry.list() if r.metadata.get("type") != "internal"]
    names = [r.name for r in records if kind == "service" or r.metadata.get("type") == kind]  # agents are services
    listing = {"agent": "micro agent list", "flow": "micro flow list"}.get(kind, "micro services")
    other = next((r.metadata.get("type", "service") for r in records if r.name == name), None)
    fail(not_found(kind, name, names, listing, other=other))


def cli_runtime(**kwargs: Any) -> Any:
    """A runtime for one CLI command (in-memory store: inspecting never writes)."""
    from micro.runtime import Runtime

    kwargs.setdefault("store", "memory://")
    return Runtime(**kwargs)


class _Group(click.Group):
    """The ``micro`` group: click's own errors (unknown command, bad option) read like micro's,
    ``error: …`` on stderr after the usage line, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                click.echo(ctx.get_usage(), err=True)
                click.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.\n", err=True)
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="micro")
def main() -> None:
    """micro: services, agents and flows on one asyncio loop, over real gRPC.

    Backends come from MICRO_REGISTRY, MICRO_BROKER and MICRO_STORE (the local
    machine-wide registry by default; MICRO_HOME holds it, ~/.micro by default).
    """


def _register() -> None:
    from micro.cli import (  # noqa: F401  (commands register themselves)
        a2a,
        agents,
        bench,
        broker,
        call,
        chat,
        flows,
        gateway,
        new,
        run,
        services,
    )


_register()
