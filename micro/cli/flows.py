"""``micro flow list | runs NAME | show RUN_ID | replay RUN_ID``: flows and their run history."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
import msgspec
from rich.table import Column, Table

from micro.cli.main import cli_runtime, fail, main, missing, out, run_async
from micro.errors import EndpointNotFound, ServiceNotFound


@main.group()
def flow() -> None:
    """Inspect flows and their runs."""


async def _flows(rt: Any) -> list[Any]:
    return [r for r in await rt.registry.list() if r.metadata.get("type") == "flow"]


@flow.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the flows as JSON.")
@run_async
async def list_flows(as_json: bool) -> None:
    """List every flow with its trigger and services."""
    async with cli_runtime() as rt:
        flows = await _flows(rt)
    if as_json:
        out.print_json(msgspec.json.encode(
            [{"name": f.name, "trigger": f.metadata.get("trigger", ""),
              "services": [s for s in f.metadata.get("services", "").split(",") if s],
              "agent": f.metadata.get("agent", "")} for f in flows]).decode())
        return
    if not flows:
        out.print("no flows registered (define one with micro.NewFlow and start it with `micro run`)")
        return
    table = Table.grid(padding=(0, 2))
    for f in flows:
        meta = f.metadata
        table.add_row(f"[cyan]⚡[/cyan] [bold]{f.name}[/bold]", f"on {meta.get('trigger', '?')}",
                      f"over: {meta.get('services') or meta.get('agent') or '-'}")
    out.print(table)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@flow.command("runs")
@click.argument("name")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the run records as JSON.")
@run_async
async def runs(name: str, limit: int, as_json: bool) -> None:
    """List the most recent runs of flow NAME."""
    async with cli_runtime() as rt:
        try:
            rsp = await rt.client.call(name, "Flow.Runs", {"limit": limit})
        except (EndpointNotFound, ServiceNotFound):
            await missing(rt, name, "flow")
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    widest = max((len(r["id"]) for r in rsp["runs"]), default=3)
    # run id, status and time whole at 80 columns (`micro flow show` takes the id); the error folds
    table = Table(Column("run", no_wrap=True, min_width=widest), Column("status", no_wrap=True),
                  Column("tries", no_wrap=True, justify="right"), Column("tools", no_wrap=True, justify="right"),
                  Column("started", no_wrap=True), Column("error", overflow="fold"),
                  box=None, pad_edge=False, header_style="bold")
    for r in rsp["runs"]:
        table.add_row(r["id"], r["status"], str(r["attempts"]), str(len(r["tool_calls"])), _when(r["started"]),
                      r["error"][:60])
    out.print(table)


async def _find(rt: Any, run_id: str, endpoint: str) -> dict[str, Any]:
    for f in await _flows(rt):
        rsp = await rt.client.call(f.name, endpoint, {"id": run_id})
        if rsp.get("run"):
            return dict(rsp["run"])
    fail(f"no flow has a run {run_id!r} (`micro flow runs NAME` lists them)")
    raise AssertionError


@flow.command("show")
@click.argument("run_id")
@run_async
async def show(run_id: str) -> None:
    """Show one run: its event, prompt, tool calls, reply and error."""
    async with cli_runtime() as rt:
        run = await _find(rt, run_id, "Flow.Show")
    out.print_json(msgspec.json.encode(run).decode())


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
