"""``micro flow list | runs | show | run | resume | replay``: flows, their runs, running one now, resuming one."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import click
import msgspec
from rich.markup import escape
from rich.table import Column, Table

from micro.cli.main import cli_runtime, fail, main, missing, out, run_async
from micro.errors import EndpointNotFound, ServiceNotFound, UsageError
from micro.flow.record import STATUSES
from micro.flow.schedule import Schedule


@main.group()
def flow() -> None:
    """Inspect flows and their runs; run a flow now; resume a run that waits."""


async def _flows(rt: Any) -> list[Any]:
    return [r for r in await rt.registry.list() if r.metadata.get("type") == "flow"]


def _next_firing(meta: dict[str, str]) -> float | None:
    """When a scheduled flow fires next (computed here, as every replica does), or None."""
    cron, every = meta.get("schedule") or None, meta.get("every") or None
    if cron is None and every is None:
        return None
    try:
        return Schedule("", cron=cron, every=float(every) if every else None).next_after(time.time())
    except (UsageError, ValueError):
        return None


@flow.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the flows as JSON.")
@run_async
async def list_flows(as_json: bool) -> None:
    """List every flow with its trigger or schedule (and when it fires next), its services or steps."""
    async with cli_runtime() as rt:
        flows = await _flows(rt)
    if as_json:
        listed = []
        for f in flows:
            meta = f.metadata
            entry: dict[str, Any] = {"name": f.name, "trigger": meta.get("trigger", ""),
                                     "services": [s for s in meta.get("services", "").split(",") if s],
                                     "agent": meta.get("agent", "")}
            if meta.get("steps"):
                entry["steps"] = meta["steps"].split(",")
            nxt = _next_firing(meta)
            if nxt is not None:
                entry["schedule"] = meta.get("schedule") or f"every {meta.get('every')}s"
                entry["next"] = nxt
            listed.append(entry)
        out.print_json(msgspec.json.encode(listed).decode())
        return
    if not flows:
        out.print("no flows registered (define one with micro.NewFlow and start it with `micro run`)")
        return
    rows = []
    for f in flows:
        meta = f.metadata
        when = f"on {meta.get('trigger')}" if meta.get("trigger") else ""
        nxt = _next_firing(meta)
        if nxt is not None:
            sched = meta.get("schedule") or f"every {meta.get('every')}s"
            when = f"{when}; " if when else ""
            when += f"{sched} (next {_when(nxt)})"
        work = (f"steps: {meta['steps'].replace(',', ' → ')}" if meta.get("steps")
                else f"over: {meta.get('services') or meta.get('agent') or '-'}")
        rows.append((f.name, when, work))
    # aligned columns, each flow on one line: a narrow terminal wraps the line's end, not a column's
    # cells (a table at 80 columns broke the steps over several lines)
    names = max(len(name) for name, _, _ in rows)
    whens = max(len(when) for _, when, _ in rows)
    for name, when, work in rows:
        cells = [f"[bold]{escape(name)}[/bold]" + " " * (names - len(name))]
        if whens:
            cells.append(escape(when) + " " * (whens - len(when)))
        cells.append(escape(work))
        out.print("[cyan]⚡[/cyan] " + "  ".join(cells))


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S") if ts else "-"


_COLOURS = {"completed": "green", "waiting": "yellow", "paused": "yellow", "input_required": "yellow",
            "running": "cyan", "retrying": "cyan"}


def _status(status: str) -> str:
    return f"[{_COLOURS.get(status, 'red')}]{status}[/]"


@flow.command("runs")
@click.argument("name")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES),
              help="Only runs with this status (repeatable), e.g. --status waiting.")
@click.option("--dead-lettered", is_flag=True,
              help="Only runs whose event the broker dead-lettered (its last delivery failed); "
                   "`micro flow replay RUN_ID` runs one again.")
@click.option("--json", "as_json", is_flag=True, help="Print the run records as JSON.")
@run_async
async def runs(name: str, limit: int, statuses: tuple[str, ...], dead_lettered: bool, as_json: bool) -> None:
    """List the most recent runs of flow NAME (newest first)."""
    async with cli_runtime() as rt:
        try:
            rsp = await rt.client.call(name, "Flow.Runs", {"limit": limit, "status": list(statuses) or None,
                                                           "dead_lettered": dead_lettered})
        except (EndpointNotFound, ServiceNotFound):
            await missing(rt, name, "flow")
    if dead_lettered:  # a flow node older than dead-lettering ignores the filter: its runs would all be listed
        rsp["runs"] = [r for r in rsp["runs"] if r.get("dead_lettered")]
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    if not rsp["runs"]:
        which = " or ".join(statuses) + (" dead-lettered" if dead_lettered else "")
        out.print(f"{name} has no {which.strip()} runs" if which.strip() else f"{name} has no runs yet")
        return
    widest = max(len(r["id"]) for r in rsp["runs"])
    # the id, status and time are never cut (`micro flow show` takes the id); the note gives way first
    table = Table(Column("run", no_wrap=True, min_width=widest), Column("status", no_wrap=True),
                  Column("tries", no_wrap=True, justify="right"), Column("started", no_wrap=True),
                  Column("note", overflow="ellipsis", no_wrap=True, ratio=1), box=None, pad_edge=False)
    for r in rsp["runs"]:
        waiting = r.get("waiting")
        note = (f"waits at {waiting['step']}" if r["status"] == "waiting" and waiting else r["error"]
                or (f"{len(r['tool_calls'])} tool calls" if r["tool_calls"] else ""))
        table.add_row(r["id"], _status(r["status"]), str(r["attempts"]), _when(r["started"]), escape(note))
    out.print(table)


async def _find(rt: Any, run_id: str) -> tuple[str, dict[str, Any]]:
    for f in await _flows(rt):
        rsp = await rt.client.call(f.name, "Flow.Show", {"id": run_id})
        if rsp.get("run"):
            return f.name, dict(rsp["run"])
    fail(f"no flow has a run {run_id!r} (`micro flow runs NAME` lists them)")


def _short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_run(run: dict[str, Any]) -> None:
    out.print(f"[bold]run {escape(run['id'])}[/bold]  flow {escape(run['flow'])}  {_status(run['status'])}  "
              f"attempts {run['attempts']}  started {_when(run['started'])}")
    waiting = run.get("waiting")
    if run["status"] == "waiting" and waiting:
        until = f", until {_when(waiting['until'])}" if waiting["until"] else ""
        prompt = f": {waiting['prompt']}" if waiting["prompt"] else ""
        out.print(f"[yellow]waits at {escape(waiting['step'])}{escape(prompt)}[/yellow] (since "
                  f"{_when(waiting['since'])}{until})")
        out.print(f"  continue it: micro flow resume {run['id']} --input '<JSON>'")
    if run["error"]:
        out.print(f"[red]error:[/red] {escape(run['error'])}")
    trace: dict[str, Any] = run.get("trace") or {}
    if trace:
        table = Table(Column("step", no_wrap=True), Column("kind", no_wrap=True), Column("status", no_wrap=True),
                      Column("tries", justify="right", no_wrap=True), Column("secs", justify="right", no_wrap=True),
                      Column("output", overflow="ellipsis", no_wrap=True, ratio=1), box=None, pad_edge=False)
        for path, info in trace.items():
            output = _short(run["steps"][path]) if path in run["steps"] else escape(info["error"])
            table.add_row(escape(path), info["kind"], _status(info["status"]), str(info["attempts"]),
                          f"{info['seconds']:.2f}", escape(output) if path in run["steps"] else output)
        out.print(table)
    elif run["steps"]:
        for key, value in run["steps"].items():
            out.print(f"  {escape(key)}: {escape(_short(value))}")
    if run.get("reply"):
        out.print(f"reply: {escape(run['reply'])}")


@flow.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole run record as JSON.")
@run_async
async def show(run_id: str, as_json: bool) -> None:
    """Show one run: each step with its status, attempts, duration and a short output (or --json: everything)."""
    async with cli_runtime() as rt:
        _, run = await _find(rt, run_id)
    if as_json:
        out.print_json(msgspec.json.encode(run).decode())
        return
    _print_run(run)


def _json_arg(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        fail(f"{what} is not JSON ({exc}): {text!r}", 2)


@flow.command("run")
@click.argument("name")
@click.argument("data", default="{}")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@run_async
async def run_now(name: str, data: str, as_json: bool) -> None:
    """Run flow NAME now on DATA (JSON; as if it were an event), without its trigger; show how it ended."""
    payload = _json_arg(data, "DATA")
    async with cli_runtime() as rt:
        if not any(f.name == name for f in await _flows(rt)):
            await missing(rt, name, "flow")
        rsp = await rt.client.call(name, "Flow.Run", {"data": payload})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["run"]).decode())
        return
    _print_run(rsp["run"])


@flow.command("resume")
@click.argument("run_id")
@click.option("--input", "input_", required=True, help="What the waiting Await step returns (JSON).")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@run_async
async def resume(run_id: str, input_: str, as_json: bool) -> None:
    """Continue a run that waits at an Await step, with INPUT as that step's output."""
    value = _json_arg(input_, "--input")
    async with cli_runtime() as rt:
        name, _ = await _find(rt, run_id)
        rsp = await rt.client.call(name, "Flow.Resume", {"id": run_id, "input": value})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["run"]).decode())
        return
    _print_run(rsp["run"])


@flow.command("replay")
@click.argument("run_id")
@run_async
async def replay(run_id: str) -> None:
    """Run a recorded event again (as a new run) and show the result."""
    async with cli_runtime() as rt:
        for f in await _flows(rt):
            shown = await rt.client.call(f.name, "Flow.Show", {"id": run_id})
            if shown.get("run"):
                rsp = await rt.client.call(f.name, "Flow.Replay", {"id": run_id})
                out.print_json(msgspec.json.encode(rsp["run"]).decode())
                return
    fail(f"no flow has a run {run_id!r} (`micro flow runs NAME` lists them)")
