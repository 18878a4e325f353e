"""``micro run PATH``: import an app and run every service, agent and flow it defines on one loop.

PATH is a Python file, or a directory whose ``app.py``, ``main.py`` or
``__main__.py`` is run. Everything the module defines at top level that can be
started (a ``micro.Service``, and agents and flows, which are services too) is
started on one loop, so they share one runtime and call each other in process.
Ctrl-C (SIGINT) or SIGTERM stops them: deregister, drain, close.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import click
import msgspec
from rich.markup import escape

from micro.cli.main import err, fail, main, out, run_async
from micro.errors import MicroError, ServiceNotFound, UsageError

ENTRY_FILES = ("app.py", "main.py", "__main__.py")


def entry(path: Path) -> Path:
    """The file ``micro run PATH`` imports: PATH, or the first of ``ENTRY_FILES`` in the directory PATH."""
    if path.is_dir():
        for name in ENTRY_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(f"{path} has none of {', '.join(ENTRY_FILES)}: point micro run at a Python file")
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    return path


def load_app(path: Path) -> ModuleType:
    """Import the app at ``path`` (a file, or a directory with an entry file)."""
    path = entry(path)
    sys.path.insert(0, str(path.parent.resolve()))
    spec = importlib.util.spec_from_file_location(f"micro_app_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class AppError(Exception):
    """The app's own code raised while ``micro run`` imported or started it."""

    def __init__(self, path: Path, doing: str, error: Exception) -> None:
        super().__init__(f"{path}: {doing}: {type(error).__name__}: {error}")
        self.path, self.doing, self.error = path, doing, error

    def report(self) -> str:
        """One line, then the app's own frames (not click's, asyncio's or importlib's)."""
        exc = self.error
        head = f"{self.path}: {self.doing}: {type(exc).__name__}: {exc}"
        if isinstance(exc, RuntimeError) and "cannot be called from a running event loop" in str(exc):
            head += (" (micro run imports the file and serves what it defines at top level on its own loop: "
                     "put the asyncio.run(...) under `if __name__ == \"__main__\":`)")
        root = (self.path if self.path.is_dir() else self.path.parent).resolve()
        lines = traceback.format_list(app_frames(exc, root))
        if isinstance(exc, SyntaxError):  # where the parser stopped: file, line and a caret
            lines += traceback.format_exception_only(exc)[:-1]
        body = "".join(lines).rstrip("\n")
        return head + ("\n" + body if body else "") + "\n(micro run --traceback shows every frame)"


def app_frames(exc: BaseException, root: Path) -> list[traceback.FrameSummary]:
    """The frames of ``exc``'s traceback in the app's own files: under ``root``, not in a virtualenv there
    (not click's, asyncio's, importlib's or micro's)."""
    frames = []
    for f in traceback.extract_tb(exc.__traceback__):
        if f.filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
            continue
        try:
            rel = Path(f.filename).resolve().relative_to(root)
        except ValueError:
            continue
        if not any(part in (".venv", "venv", "site-packages") for part in rel.parts):
            frames.append(f)
    return frames


def runnables(module: ModuleType) -> list[Any]:
    """The services (agents and flows included) a module defines at top level, in order."""
    from micro.service import Service

    found: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, Service) and value not in found:
            found.append(value)
    return found


async def warn_if_served(runtime: Any, items: list[Any]) -> None:
    """Say so when live nodes already serve some of these services: a second ``micro run`` of an app.

    The registry holds only live nodes (each heart-beats; a stopped or dead process's
    record goes), so a name found there is being served right now.
    """
    served = []
    for item in items:
        try:
            records = await runtime.registry.get(item.name)
        except ServiceNotFound:
            continue
        nodes = [n.address for r in records for n in r.nodes]
        if nodes:
            served.append(f"{item.name} ({', '.join(nodes)})")
    if served:
        err.print(f"[yellow]warning:[/yellow] already served by a running process: {escape(', '.join(served))}. "
                  "This one adds a second node of each: calls go round-robin between the two, and each keeps "
                  "its own in-memory data. Stop the other (Ctrl-C in its terminal), or pass --replica to run "
                  "a replica on purpose without this warning.", emoji=False)


def flow_summary(meta: dict[str, str]) -> str:
    """What a flow's banner line says of it: its trigger or schedule, its steps or services, and what it runs
    on (an agent, a model); a part the flow does not have is left out."""
    when = [f"on {meta['trigger']}" if meta.get("trigger") else "",
            f"schedule {meta['schedule']}" if meta.get("schedule") else "",
            f"every {meta['every']}s" if meta.get("every") else ""]
    head = " and ".join(w for w in when if w)
    parts = [head]
    if meta.get("steps"):
        parts.append("steps: " + " → ".join(meta["steps"].split(",")))
    elif meta.get("services"):
        parts[0] = f"{head} over {meta['services']}".strip()
    if meta.get("agent"):
        parts.append(f"agent {meta['agent']}")
    if meta.get("model"):
        parts.append(f"model: {meta['model']}")
    return "; ".join(p for p in parts if p)


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
@click.option("--http-address", metavar="HOST:PORT", envvar="MICRO_HTTP_ADDRESS",
              help="Serve the dashboard and the JSON API here (or $MICRO_HTTP_ADDRESS; default 127.0.0.1:8080, "
              "and when that port is taken micro run goes on without them; port 0 picks a free one).")
@click.option("--no-http", is_flag=True, help="Serve no dashboard and no JSON API (whatever --http-address says).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also serve the dashboard for this Host name (on loopback only 127.0.0.1, localhost and ::1 are "
              "served; elsewhere the dashboard's forms need the names it is reached by: without any, only the JSON "
              "API is served there). Repeatable.")
@click.option("--token-env", metavar="VAR",
              help="The dashboard and API need the token in $VAR (pages ask once; API calls send a bearer header).")
@click.option("--traceback", "full_traceback", is_flag=True,
              help="When the app's code raises on import or start, print every frame (default: the app's own).")
@click.option("--reload", is_flag=True,
              help="Watch the app's directory; on a change, start the new version, wait until it is registered, "
              "then stop the old one (a version that fails to start leaves the old one running).")
@click.option("--replica", is_flag=True,
              help="Run even though a process on this machine already serves these services, without a warning: "
              "a second node of each (calls go round-robin; in-memory data is not shared).")
@run_async
async def run(path: Path | None, prompt: str | None, provider: str | None, out_dir: Path | None,
              rounds: int, log_level: str, log_format: str, metrics_address: str | None = None,
              http_address: str | None = None, no_http: bool = False, token_env: str | None = None,
              allow_hosts: tuple[str, ...] = (), full_traceback: bool = False, reload: bool = False,
              replica: bool = False) -> None:
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
    path = path if path is not None else Path(".")
    if no_http and (token_env is not None or allow_hosts):  # over --http-address / $MICRO_HTTP_ADDRESS it wins
        fail("--no-http serves no dashboard: drop --token-env and --allow-host, or --no-http", 2)
    http = None if no_http else Http(http_address or DEFAULT_HTTP_ADDRESS, explicit=http_address is not None,
                                     token_env=token_env, allow_hosts=allow_hosts)
    if reload:
        if metrics_address is not None:
            fail("--metrics-address does not go with --reload: the old and the new version would both bind it "
                 "during a swap (unset $MICRO_METRICS_ADDRESS, or run without --reload)", 2)
        from micro.cli.reload import serve_reloading

        # the versions overlap during a swap, so they cannot both hold the dashboard's port: the watching
        # process serves it (it is a client of the registry like `micro dashboard`), across every swap
        passed = ["--log-level", log_level, "--log-format", log_format, "--no-http",
                  *(["--traceback"] if full_traceback else [])]
        await serve_reloading(path, passed, replica=replica,
                              http_server=None if http is None else functools.partial(_http_server, http))
        return
    if metrics_address is not None:
        _enable_metrics()  # before the app is imported: its services and runtimes set up their hooks when made
    try:
        await serve(path, metrics_address=metrics_address, replica=replica, http=http)
    except AppError as exc:
        if full_traceback:
            raise exc.error from None
        err.print(f"[red]error:[/red] {escape(exc.report())}", emoji=False)
        # an app that called asyncio.run(main()) on import left main() unawaited: said above already
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        raise SystemExit(1) from None


DEFAULT_HTTP_ADDRESS = "127.0.0.1:8080"


class Http(msgspec.Struct, frozen=True):
    """Where ``micro run`` serves the dashboard and JSON API: the address, whether it was asked for (then a
    taken port is an error, not a warning), the ``--token-env`` variable and the ``--allow-host`` names."""

    address: str
    explicit: bool = True
    token_env: str | None = None
    allow_hosts: tuple[str, ...] = ()


def _enable_metrics() -> None:
    from micro import metrics

    try:
        metrics.enable()
    except ImportError:
        fail("--metrics-address needs prometheus_client: pip install 'micro[metrics]'", 2)


async def serve(path: Path, *, metrics_address: str | None = None, replica: bool = False,
                http: Http | None = None) -> None:
    """Import the app at ``path`` and run what it defines until SIGINT/SIGTERM (what ``micro run PATH`` does);
    with ``http``, the dashboard and the JSON API on one HTTP server beside them.

    Unless ``replica``, warns when a live process already serves one of its services.
    """
    try:
        module = load_app(path)
    except MicroError:
        raise
    except Exception as exc:
        raise AppError(entry(path), "importing", exc) from exc
    items = runnables(module)
    if not items:
        fail(f"{path} defines no services, agents or flows at top level")
    from micro.cli.reload import child_output, report_ready
    from micro.service.service import stop_on_signals

    reloading, banner = child_output()

    async with contextlib.AsyncExitStack() as stack:
        if metrics_address is not None:  # first in, last out: probes answer (503) while the services drain
            from micro.server.probes import start_probes

            probes = await start_probes(metrics_address, items)
            stack.push_async_callback(probes.aclose)
            out.print(f"[green]●[/green] metrics on {probes.url}/metrics (and /health/live, /health/ready)")
        if not replica:
            from micro.runtime import Runtime

            runtime = await stack.enter_async_context(Runtime.current())  # the services' own, unless they name one
            await warn_if_served(runtime, items)
        for item in items:
            try:
                await stack.enter_async_context(item)
            except MicroError:
                raise
            except Exception as exc:
                raise AppError(path, f"starting {item.name}", exc) from exc
        for item in items:
            meta = item.metadata
            kind = meta.get("type", "service")
            if kind == "agent":
                extra = f"manages {meta.get('services', '')}; model: {meta.get('model', '?')}"
            elif kind == "flow":
                extra = flow_summary(meta)
            else:
                n = len(item.endpoints)
                extra = f"{n} endpoint{'' if n == 1 else 's'}"
            if banner:
                out.print(f"[green]●[/green] {kind} [bold]{item.name}[/bold] on {item.address} ({extra})")
        server = None
        if http is not None:  # last in, first out: the dashboard stops before the services drain
            server = _http_server(http, items[0].runtime)
            if server is not None:
                stack.push_async_callback(server.aclose)
                out.print(f"{server.what}: {server.url}", markup=False)  # bound: connections wait in its backlog
        if module.__doc__ and banner:
            out.print(module.__doc__.strip(), markup=False)
        report_ready(items)
        async with anyio.create_task_group() as tg:  # cancelled by a signal; services stop after it
            await tg.start(stop_on_signals, tg.cancel_scope)
            if banner:
                out.print("[dim]Ctrl-C to stop[/dim]")
            sys.stdout.flush()
            if server is not None:
                server.start()  # only now: the HTTP stack loads while the services already answer
            await anyio.sleep_forever()
    if not reloading:
        out.print("stopped")


def _http_server(http: Http, runtime: Any) -> Any:
    """The bound (not yet serving) dashboard server, or None when the default port is taken or the
    dashboard's modules are not installed (a warning says which)."""
    from micro.cli.gateway import HttpServer, bind, loopback, missing_dashboard_modules, parse_address, token_from

    missing = missing_dashboard_modules()
    if missing:  # before binding: a bound port nobody serves would leave connections hanging
        err.print("[yellow]warning:[/yellow] " + escape(f"no dashboard: pip install 'micro[gateway]' (missing: "
                                                         f"{', '.join(missing)})"), markup=True, highlight=False)
        return None
    token = token_from(http.token_env, http.address)
    host, _ = parse_address(http.address)
    try:
        sock = bind(http.address)
    except OSError as exc:
        if http.explicit:
            fail(f"--http-address {http.address}: cannot listen there: {exc.strerror or exc}")
        err.print(f"[yellow]warning:[/yellow] no dashboard: cannot listen on {http.address} ({exc.strerror or exc}); "
                  "pass --http-address HOST:PORT (port 0 picks a free one), or --no-http", markup=True)
        return None
    # off loopback the dashboard needs the names browsers reach it by (its forms check them: DNS rebinding);
    # without them the JSON API is served for any Host, as an API in a container is, and no dashboard
    dashboard = loopback(host) or bool(http.allow_hosts)
    if not dashboard:
        err.print(f"[yellow]note:[/yellow] no dashboard on {escape(http.address)} (not a loopback address): serving "
                  "the JSON API only; pass --allow-host NAME (the names browsers reach it by, repeatable) to serve "
                  "the dashboard there too", markup=True, highlight=False)
    return HttpServer(sock, runtime, token=token, loopback_only=loopback(host), allow_hosts=http.allow_hosts,
                      dashboard=dashboard)
