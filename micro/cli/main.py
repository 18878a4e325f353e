"""The ``micro`` command group and the plumbing every command shares.

Each command runs one coroutine on a fresh loop with a CLI runtime (registry and
broker from ``MICRO_REGISTRY`` / ``MICRO_BROKER``, the local registry by default;
an in-memory store, so inspecting never writes). A micro error ends the command
with one line on stderr and exit code 1; bad arguments exit with 2.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from micro import eventloop
from micro.errors import MicroError, UsageError

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


def run_async(fn: Callable[P, Awaitable[T]]) -> Callable[P, T | None]:
    """Run an async command; micro errors become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            return eventloop.run(fn(*args, **kwargs))  # type: ignore[arg-type]
        except UsageError as exc:
            fail(str(exc), 2)
        except MicroError as exc:
            fail(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        return None

    return wrapper


def cli_runtime(**kwargs: Any) -> Any:
    """A runtime for one CLI command (in-memory store: inspecting never writes)."""
    from micro.runtime import Runtime

    kwargs.setdefault("store", "memory://")
    return Runtime(**kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="micro")
def main() -> None:
    """micro: services, agents and flows on one asyncio loop, over real gRPC.

    Backends come from MICRO_REGISTRY, MICRO_BROKER and MICRO_STORE (the local
    machine-wide registry by default; MICRO_HOME holds it, ~/.micro by default).
    """


def _register() -> None:
    from micro.cli import (  # noqa: F401  (commands register themselves)
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
