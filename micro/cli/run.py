"""``micro run PATH``: import an app and run every service, agent and flow it defines on one loop.

PATH is a Python file, or a directory whose ``app.py``, ``main.py`` or
``__main__.py`` is run. Everything the module defines at top level that can be
started (a ``micro.Service``, and agents and flows, which are services too) is
started on one loop, so they share one runtime and call each other in process.
Ctrl-C (SIGINT) or SIGTERM stops them: deregister, drain, close.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import click

from micro.cli.main import fail, main, out, run_async
from micro.errors import UsageError

ENTRY_FILES = ("app.py", "main.py", "__main__.py")


def load_app(path: Path) -> ModuleType:
    """Import the app at ``path`` (a file, or a directory with an entry file)."""
    if path.is_dir():
        for name in ENTRY_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(f"{path} has none of {', '.join(ENTRY_FILES)}: point micro run at a Python file")
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    sys.path.insert(0, str(path.parent.resolve()))
    spec = importlib.util.spec_from_file_location(f"micro_app_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def runnables(module: ModuleType) -> list[Any]:
    """The services (agents and flows included) a module defines at top level, in order."""
    from micro.service import Service

    found: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, Service) and value not in found:
            found.append(value)
    return found


@main.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", help="Generate a system of services and an agent from this description, "
              "validate it in a separate process, then run it.")
@click.option("--provider", help="The model for --prompt: anthropic, openai, 'openai:MODEL', … "
              "(default: $MICRO_PROVIDER, or anthropic when ANTHROPIC_API_KEY is set).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Where --prompt writes the system (default: a new directory named after the prompt).")
@click.option("--rounds", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Repair rounds for --prompt: how often validation problems go back to the model.")
@click.option("--log-level", envvar="MICRO_LOG_LEVEL", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log level (or $MICRO_LOG_LEVEL); logs go to stderr.")
@click.option("--log-format", envvar="MICRO_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="Log lines as text or JSON (or $MICRO_LOG_FORMAT); "
              "records made inside an agent run carry its run id.")
@click.option("--metrics-address", metavar="HOST:PORT", envvar="MICRO_METRICS_ADDRESS",
              help="Serve Prometheus /metrics, /health/live and /health/ready here (or $MICRO_METRICS_ADDRESS; "
              "off by default; needs micro[metrics]).")
@run_async
async def run(path: Path | None, prompt: str | None, provider: str | None, out_dir: Path | None,
              rounds: int, log_level: str, log_format: str, metrics_address: str | None = None) -> None:
    """Run every service, agent and flow defined in PATH (a file, or a directory with app.py; default .).

    With --prompt, a model writes the system first (see docs/scaffolding.md); it runs
    only once it has passed validation.

    \b
    Examples:
      micro run examples/tasks
      micro run --prompt "task management system" --out tasks
    """
    from micro import logs

    logs.configure(log_level, log_format)
    if prompt is not None:
        if path is not None:
            fail("give PATH or --prompt, not both", 2)
        from micro.cli.generate import generate_for_cli

        path = await generate_for_cli(prompt, provider, out_dir, rounds)
    elif provider is not None or out_dir is not None:
        fail("--provider and --out go with --prompt", 2)
    if metrics_address is not None:
        _enable_metrics()  # before the app is imported: its services and runtimes set up their hooks when made
    await serve(path if path is not None else Path("."), metrics_address=metrics_address)


def _enable_metrics() -> None:
    from micro import metrics

    try:
        metrics.enable()
    except ImportError:
        fail("--metrics-address needs prometheus_client: pip install 'micro[metrics]'", 2)


async def serve(path: Path, *, metrics_address: str | None = None) -> None:
    """Import the app at ``path`` and run what it defines until SIGINT/SIGTERM (what ``micro run PATH`` does)."""
    module = load_app(path)
    items = runnables(module)
    if not items:
        fail(f"{path} defines no services, agents or flows at top level")
    from micro.service.service import stop_on_signals

    async with contextlib.AsyncExitStack() as stack:
        if metrics_address is not None:  # first in, last out: probes answer (503) while the services drain
            from micro.server.probes import start_probes

            probes = await start_probes(metrics_address, items)
            stack.push_async_callback(probes.aclose)
            out.print(f"[green]●[/green] metrics on {probes.url}/metrics (and /health/live, /health/ready)")
        for item in items:
            await stack.enter_async_context(item)
        for item in items:
            meta = item.metadata
            kind = meta.get("type", "service")
            if kind == "agent":
                extra = f"manages {meta.get('services', '')}; model: {meta.get('model', '?')}"
            elif kind == "flow":
                via = f"agent {meta['agent']}" if meta.get("agent") else f"model: {meta.get('model', '?')}"
                extra = f"on {meta.get('trigger', '?')} over {meta.get('services', '') or '-'}; {via}"
            else:
                n = len(item.endpoints)
                extra = f"{n} endpoint{'' if n == 1 else 's'}"
            out.print(f"[green]●[/green] {kind} [bold]{item.name}[/bold] on {item.address} ({extra})")
        if module.__doc__:
            out.print(module.__doc__.strip(), markup=False)
        async with anyio.create_task_group() as tg:  # cancelled by a signal; services stop after it
            await tg.start(stop_on_signals, tg.cancel_scope)
            out.print("[dim]Ctrl-C to stop[/dim]")
            sys.stdout.flush()
            await anyio.sleep_forever()
    out.print("stopped")
