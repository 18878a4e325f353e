"""``micro agent list``: the agents in the registry and the services they manage."""

from __future__ import annotations

import click
import msgspec
from rich.table import Table

from micro.cli.main import cli_runtime, main, out, run_async


@main.group()
def agent() -> None:
    """Inspect the agents in the registry."""


@agent.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the agents as JSON.")
@run_async
async def list_agents(as_json: bool) -> None:
    """List every agent with the services it manages."""
    from micro.agent.router import discover

    async with cli_runtime() as rt:
        agents = await discover(rt.registry)
    if as_json:
        out.print_json(msgspec.json.encode(agents).decode())
        return
    if not agents:
        out.print("no agents registered (define one with micro.NewAgent and start it with `micro run`)")
        return
    table = Table.grid(padding=(0, 2))
    for a in agents:
        table.add_row(f"[magenta]◆[/magenta] [bold]{a.name}[/bold]", f"manages: {', '.join(a.services) or '-'}",
                      f"[dim]{a.model}[/dim]")
    out.print(table)
