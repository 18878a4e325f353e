"""``micro agent list | runs | show | history | inspect``: the agents in the registry, what they did and how
they are set up (the last four through each agent's ``AgentInfo`` endpoints)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import click
import msgspec
from rich.markup import escape
from rich.table import Table

from micro.cli.main import cli_runtime, fail, main, out, run_async
from micro.errors import EndpointNotFound


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
    table.add_column(no_wrap=True)
    table.add_column()
    table.add_column(no_wrap=True, overflow="ellipsis", max_width=36)
    for a in agents:
        table.add_row(f"[magenta]◆[/magenta] [bold]{a.name}[/bold]", f"manages: {', '.join(a.services) or '-'}",
                      f"[dim]{a.model}[/dim]")
    out.print(table)


async def _info(name: str, endpoint: str, request: dict[str, Any]) -> Any:
    """Call ``AgentInfo.*`` on agent NAME, with a one-line error when NAME is not an agent."""
    async with cli_runtime() as rt:
        try:
            return await rt.client.call(name, f"AgentInfo.{endpoint}", request)
        except EndpointNotFound:
            fail(f"{name} is not an agent (`micro agent list` shows the agents)")


@agent.command("runs")
@click.argument("name")
@click.option("--limit", type=int, default=20, show_default=True, help="How many runs, newest first.")
@click.option("--session", default=None, help="Only the runs of this session.")
@click.option("--json", "as_json", is_flag=True, help="Print the run records as JSON.")
@run_async
async def runs(name: str, limit: int, session: str | None, as_json: bool) -> None:
    """List the most recent runs of agent NAME: status, tools called, tokens, reply or error."""
    rsp = await _info(name, "Runs", {"limit": limit, "session": session})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    if not rsp["runs"]:
        out.print(f"{name} has no runs yet (ask it: micro chat --agent {name})")
        return
    width = max(out.width - 4, 40)
    for r in rsp["runs"]:
        usage = r["usage"]
        started = dt.datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
        status = "[green]completed[/green]" if r["status"] == "completed" else f"[red]{r['status']}[/red]"
        parent = f"  parent {r['parent_id']}" if r["parent_id"] else ""
        session = f"  session {escape(r['session'])}" if r["session"] else ""
        out.print(f"[bold]{r['id']}[/bold]  {started}  {status}  {len(r['tool_calls'])} tool calls  "
                  f"{usage['input_tokens']}/{usage['output_tokens']} tokens{session}{parent}")
        counts = Counter(c["name"] for c in r["tool_calls"])
        if counts:
            tools = ", ".join(n if k == 1 else f"{n} ×{k}" for n, k in counts.items())
            out.print(f"  [cyan]{escape(_short(tools, width))}[/cyan]")
        answer = f"[red]{escape(_short(r['error'], width))}[/red]" if r["error"] else escape(_short(r["reply"], width))
        out.print(f"  {answer}")


@agent.command("show")
@click.argument("name")
@click.argument("run_id")
@run_async
async def show(name: str, run_id: str) -> None:
    """Show one run of agent NAME as JSON: message, tool calls with timings and results, reply, usage."""
    rsp = await _info(name, "Run", {"id": run_id})
    out.print_json(msgspec.json.encode(rsp["run"]).decode())


@agent.command("history")
@click.argument("name")
@click.option("--session", default="", help="The session (default: the agent's default conversation).")
@click.option("--limit", "-n", type=click.IntRange(min=0), default=0, show_default=True,
              help="Only the last N messages (0: the whole conversation).")
@click.option("--json", "as_json", is_flag=True, help="Print the messages as JSON.")
@run_async
async def history(name: str, session: str, limit: int, as_json: bool) -> None:
    """Print the conversation agent NAME remembers, tool calls and results included."""
    rsp = await _info(name, "History", {"session": session, "limit": limit})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["messages"]).decode())
        return
    if not rsp["messages"]:
        out.print(f"{name} has no history{f' in session {session!r}' if session else ''}")
        return
    for m in rsp["messages"]:
        for block in m["content"]:
            kind = block["type"]
            if kind == "text":
                who = "you" if m["role"] == "user" else name
                out.print(f"[bold]{who}:[/bold] {escape(block['text'])}")
            elif kind == "tool_use":
                args = msgspec.json.encode(block["input"]).decode()
                out.print(f"  [cyan]→ {block['name']}({escape(_short(args))})[/cyan]")
            else:
                mark = "[red]✗[/red]" if block["is_error"] else "←"
                out.print(f"  {mark} {escape(_short(block['content']))}")


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@agent.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@run_async
async def inspect_agent(name: str, as_json: bool) -> None:
    """Show agent NAME's prompt, services, tools (with input schemas) and provider settings (never keys)."""
    desc = await _info(name, "Inspect", {})
    if as_json:
        out.print_json(msgspec.json.encode(desc).decode())
        return
    p, lim = desc["provider"], desc["limits"]
    out.print(f"[magenta]◆[/magenta] [bold]{desc['name']}[/bold]  manages: {', '.join(desc['services']) or '-'}")
    if desc["agents"]:
        out.print(f"  may delegate to: {', '.join(desc['agents'])}")
    base_url = f"  base_url: {p['base_url']}" if p["base_url"] else ""
    out.print(f"  provider: {p['name']}  model: {p['model']}{base_url}")
    out.print(f"  limits: max_steps={lim['max_steps']} loop_limit={lim['loop_limit']} "
              f"tool_timeout={lim['tool_timeout']} model_timeout={lim['model_timeout']} "
              f"history_limit={lim['history_limit']}")
    out.print(f"  prompt: {escape(desc['prompt'])}")
    out.print(f"  tools ({len(desc['tools'])}):")
    for t in desc["tools"]:
        out.print(f"    [cyan]{t['name']}[/cyan]  {escape(_short(t['description'], 100))}")
        out.print(f"      [dim]{escape(msgspec.json.encode(t['input_schema']).decode())}[/dim]")
