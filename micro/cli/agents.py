"""``micro agent list | runs | show | history | forget | inspect``: the agents in the registry, what they did
and how they are set up (all but ``list`` through each agent's ``AgentInfo`` endpoints); ``micro agent pending |
approve | answer | cancel | resume``: the runs that wait for a person, and deciding them (``Agent.Resume`` and
friends)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import click
import msgspec
from rich.markup import escape
from rich.table import Table

from micro.agent.record import STATUSES
from micro.cli.main import cli_runtime, fail, main, missing, out, run_async
from micro.errors import EndpointNotFound, Error, ServiceNotFound


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
    table = Table.grid(padding=(0, 2))  # the model on a line of its own: whole at 80 columns
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for a in agents:
        table.add_row(f"[magenta]◆[/magenta] [bold]{a.name}[/bold]", f"manages: {', '.join(a.services) or '-'}")
        table.add_row("", f"[dim]model: {escape(a.model or '?')}[/dim]")
    out.print(table)


def plural(n: int, noun: str) -> str:
    """``1 tool call``, ``2 tool calls``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


async def _info(name: str, endpoint: str, request: dict[str, Any]) -> Any:
    """Call ``AgentInfo.*`` on agent NAME, with a one-line error naming the agents when NAME is not one."""
    async with cli_runtime() as rt:
        try:
            return await rt.client.call(name, f"AgentInfo.{endpoint}", request)
        except (EndpointNotFound, ServiceNotFound):
            await missing(rt, name, "agent")


@agent.command("runs")
@click.argument("name")
@click.option("--limit", type=int, default=20, show_default=True, help="How many runs, newest first.")
@click.option("--session", default=None, help="Only the runs of this session.")
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES),
              help="Only runs with this status (repeatable), e.g. --status paused --status interrupted.")
@click.option("--json", "as_json", is_flag=True, help="Print the run records as JSON.")
@run_async
async def runs(name: str, limit: int, session: str | None, statuses: tuple[str, ...], as_json: bool) -> None:
    """List the most recent runs of agent NAME: status, tools called, tokens, reply or error."""
    rsp = await _info(name, "Runs", {"limit": limit, "session": session, "status": list(statuses) or None})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    if not rsp["runs"]:
        if statuses:
            out.print(f"{name} has no {' or '.join(statuses)} runs")
        else:
            out.print(f"{name} has no runs yet (ask it: micro chat --agent {name})")
        return
    width = max(out.width - 4, 40)
    for r in rsp["runs"]:
        usage = r["usage"]
        started = dt.datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
        status = {"completed": "[green]completed[/green]", "paused": "[yellow]paused[/yellow]",
                  "input_required": "[yellow]input_required[/yellow]", "cancelled": "[yellow]cancelled[/yellow]",
                  "running": "[cyan]running[/cyan]"}.get(r["status"], f"[red]{r['status']}[/red]")
        parent = f"  parent {r['parent_id']}" if r["parent_id"] else ""
        session = f"  session {escape(r['session'])}" if r["session"] else ""
        out.print(f"[bold]{r['id']}[/bold]  {started}  {status}  {plural(len(r['tool_calls']), 'tool call')}  "
                  f"{usage['input_tokens']}/{usage['output_tokens']} tokens{session}{parent}")
        counts = Counter(c["name"] for c in r["tool_calls"])
        if counts:
            tools = ", ".join(n if k == 1 else f"{n} ×{k}" for n, k in counts.items())
            out.print(f"  [cyan]{escape(_short(tools, width))}[/cyan]")
        if r["status"] in ("paused", "input_required"):
            out.print(f"  [yellow]waits for {escape(_short(_waits(r), width))}[/yellow]")
            continue
        answer = f"[red]{escape(_short(r['error'], width))}[/red]" if r["error"] else escape(_short(r["reply"], width))
        out.print(f"  {answer}")


@agent.command("show")
@click.argument("name")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The record as stored (times in seconds since the epoch).")
@run_async
async def show(name: str, run_id: str, as_json: bool) -> None:
    """Show one run of agent NAME as JSON: message, tool calls with timings and results, reply, usage.

    Times are local date-times (``started``, ``finished``, ``updated``, ``expires``; ``-`` when unset) and
    durations in seconds to the millisecond; ``--json`` prints the record as stored.
    """
    rsp = await _info(name, "Run", {"id": run_id})
    run = rsp["run"]
    if not as_json:
        run = {**run, **{k: _when(run[k]) for k in _TIMES if k in run},
               "tool_calls": [{**c, "started": _when(c["started"]), "seconds": round(c["seconds"], 3)}
                              for c in run["tool_calls"]]}
    out.print_json(msgspec.json.encode(run).decode())


_TIMES = ("started", "finished", "updated", "expires")  # a run record's times, in seconds since the epoch


def _when(ts: float) -> str:
    """A local date-time to the millisecond; ``-`` for an unset time."""
    return dt.datetime.fromtimestamp(ts).isoformat(" ", "milliseconds") if ts else "-"


@agent.command("history")
@click.argument("name")
@click.option("--session", default="", help="The session (default: the agent's default conversation).")
@click.option("--limit", "-n", type=click.IntRange(min=0), default=0, show_default=True,
              help="Only the last N turns, each from the user's message on (0: the whole conversation).")
@click.option("--all", "archived", is_flag=True, help="Also the messages compaction folded into summaries.")
@click.option("--json", "as_json", is_flag=True, help="Print the messages as JSON.")
@run_async
async def history(name: str, session: str, limit: int, archived: bool, as_json: bool) -> None:
    """Print the conversation agent NAME remembers, tool calls and results included; summaries marked."""
    from micro.agent.memory import SUMMARY_HEADER

    summary_mark = SUMMARY_HEADER.split("{", 1)[0]
    rsp = await _info(name, "History", {"session": session, "limit": 0, "archived": archived})
    messages = last_turns(rsp["messages"], limit)
    if as_json:
        out.print_json(msgspec.json.encode(messages).decode())
        return
    if not messages:
        out.print(f"{name} has no history{f' in session {session!r}' if session else ''}")
        return
    for m in messages:
        for block in m["content"]:
            kind = block["type"]
            if kind == "text" and block["text"].startswith(summary_mark):
                out.print(f"[yellow]summary:[/yellow] {escape(block['text'])}")
            elif kind == "text":
                who = "you" if m["role"] == "user" else name
                out.print(f"[bold]{who}:[/bold] {escape(block['text'])}")
            elif kind == "tool_use":
                args = msgspec.json.encode(block["input"]).decode()
                out.print(f"  [cyan]→ {block['name']}({escape(_short(args))})[/cyan]")
            else:
                mark = "[red]✗[/red]" if block["is_error"] else "←"
                out.print(f"  {mark} {escape(_short(block['content']))}")


@agent.command("forget")
@click.argument("name")
@click.option("--session", default="", help="The session (default: the agent's default conversation).")
@run_async
async def forget(name: str, session: str) -> None:
    """Delete everything agent NAME keeps of a session: messages, summaries, archives and run records."""
    await _info(name, "Forget", {"session": session})
    out.print(f"{name} forgot {f'session {session!r}' if session else 'its default conversation'}")


def last_turns(messages: list[dict[str, Any]], turns: int) -> list[dict[str, Any]]:
    """The messages of the last ``turns`` turns (all with 0). A turn starts at a user message
    with text, so the cut never starts at a tool result or mid-answer."""
    if turns <= 0:
        return messages
    starts = [i for i, m in enumerate(messages)
              if m["role"] == "user" and any(b["type"] == "text" for b in m["content"])]
    return messages[starts[-turns]:] if len(starts) >= turns else messages


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


# -- runs that wait for a person ------------------------------------------------------------------


def _waits(run: dict[str, Any]) -> str:
    parts = []
    for p in run.get("pending", []):
        if p["kind"] == "question":
            parts.append(f"an answer: {p['question']}")
        else:
            parts.append(f"approval of {p['tool']}({msgspec.json.encode(p['input']).decode()})")
    return "; ".join(parts) or "nothing"


async def _agent_call(name: str, endpoint: str, request: dict[str, Any]) -> Any:
    """Call ``Agent.*`` on agent NAME; an error is one line naming what to do."""
    async with cli_runtime() as rt:
        try:
            return await rt.client.call(name, f"Agent.{endpoint}", request, timeout=600)
        except ServiceNotFound:
            await missing(rt, name, "agent")
        except EndpointNotFound:
            fail(f"{name} is not an agent that keeps runs (`micro agent list` shows the agents)")
        except Error as exc:
            fail(exc.message)


def print_response(name: str, rsp: dict[str, Any]) -> None:
    """A run's outcome: its reply, or what it waits for and the commands that continue it."""
    status, run_id = rsp.get("status") or "completed", rsp["run_id"]
    if status in ("paused", "input_required"):
        out.print(f"[yellow]run {run_id} {status}[/yellow]")
        for p in rsp.get("pending", []):
            if p["kind"] == "question":
                out.print(f"  [bold]?[/bold] {escape(p['question'])}  [dim](call {p['call_id']})[/dim]")
            else:
                reason = f"  [dim]{escape(p['reason'])}[/dim]" if p.get("reason") else ""
                out.print(f"  [bold]⏸[/bold] {p['tool']}({escape(_short(p['input'], 120))})  "
                          f"[dim](call {p['call_id']})[/dim]{reason}")
        if status == "input_required":
            out.print(f"answer: micro agent answer {name} {run_id} \"…\"")
        else:
            out.print(f"approve: micro agent approve {name} {run_id}   deny: micro agent approve {name} {run_id} "
                      '--deny --reason "…"')
        out.print(f"cancel: micro agent cancel {name} {run_id}")
        return
    if status != "completed":
        out.print(f"[red]run {run_id} {status}[/red]")
        return
    for c in rsp.get("tool_calls", []):
        mark = "[red]✗[/red]" if c.get("is_error") else "←"
        out.print(f"[cyan]→ {c['name']}({escape(_short(c['input'], 120))})[/cyan]")
        out.print(f"  {mark} {escape(_short(c['result']))}")
    out.print(escape(rsp.get("reply", "")))


@agent.command("pending")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the waiting runs as JSON.")
@run_async
async def pending(name: str, as_json: bool) -> None:
    """List the runs of agent NAME that wait for a decision or an answer: run id, age, tool, input, question."""
    rsp = await _info(name, "Pending", {})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    if not rsp["runs"]:
        out.print(f"{name} has no runs waiting for a person")
        return
    now = dt.datetime.now().timestamp()
    for r in rsp["runs"]:
        age = _age(now - (r["updated"] or r["started"]))
        session = f"  session {escape(r['session'])}" if r["session"] else ""
        out.print(f"[bold]{r['id']}[/bold]  [yellow]{r['status']}[/yellow]  {age} ago{session}  "
                  f"[dim]{escape(_short(r['message'], 80))}[/dim]")
        for p in r["pending"]:
            if p["kind"] == "question":
                out.print(f"  ? {escape(p['question'])}  [dim](call {p['call_id']})[/dim]")
            else:
                decided = (" [dim](decided: approve)[/dim]" if p["approved"] else " [dim](decided: deny)[/dim]"
                           ) if p["decided"] else ""
                args = msgspec.json.encode(p["input"]).decode()
                out.print(f"  ⏸ {p['tool']}({escape(_short(args, 120))})  [dim](call {p['call_id']})[/dim]{decided}")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@agent.command("approve")
@click.argument("name")
@click.argument("run_id")
@click.option("--deny", is_flag=True, help="Deny instead of approving (the model is told, with --reason).")
@click.option("--reason", default="", help="Why (told to the model with a denial).")
@click.option("--call", "calls", multiple=True, metavar="CALL_ID",
              help="Decide only this pending call (repeatable); the run resumes once every call is decided.")
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
@run_async
async def approve(name: str, run_id: str, deny: bool, reason: str, calls: tuple[str, ...], as_json: bool) -> None:
    """Approve (or --deny) the pending tool calls of run RUN_ID of agent NAME, and continue it."""
    req: dict[str, Any] = {"run_id": run_id, "reason": reason}
    if calls:
        req["decisions"] = [{"call_id": c, "approve": not deny, "reason": reason} for c in calls]
        req["partial"] = True
    else:
        req["deny_all" if deny else "approve_all"] = True
    rsp = await _agent_call(name, "Resume", req)
    if as_json:
        out.print_json(msgspec.json.encode(rsp).decode())
        return
    print_response(name, rsp)


@agent.command("answer")
@click.argument("name")
@click.argument("run_id")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
@run_async
async def answer(name: str, run_id: str, text: str, as_json: bool) -> None:
    """Answer the question run RUN_ID of agent NAME asked, and continue it."""
    rsp = await _agent_call(name, "Resume", {"run_id": run_id, "answer": text})
    if as_json:
        out.print_json(msgspec.json.encode(rsp).decode())
        return
    print_response(name, rsp)


@agent.command("cancel")
@click.argument("name")
@click.argument("run_id")
@click.option("--reason", default="", help="Why (kept in the run record).")
@run_async
async def cancel(name: str, run_id: str, reason: str) -> None:
    """Cancel run RUN_ID of agent NAME (one that waits, or that a crash interrupted)."""
    rsp = await _agent_call(name, "Cancel", {"run_id": run_id, "reason": reason})
    out.print(f"run {rsp['run_id']} {rsp['status']}")


@agent.command("resume")
@click.argument("name")
@click.option("--interrupted", is_flag=True, required=True,
              help="Continue the runs a crash left unfinished (required: it says what to resume).")
@click.option("--json", "as_json", is_flag=True, help="Print the responses as JSON.")
@run_async
async def resume(name: str, interrupted: bool, as_json: bool) -> None:
    """Continue the runs of agent NAME whose process died mid-way, from their checkpoints (run by an agent
    process that is up: completed tool calls are not made again)."""
    rsp = await _agent_call(name, "ResumeInterrupted", {})
    if as_json:
        out.print_json(msgspec.json.encode(rsp["runs"]).decode())
        return
    if not rsp["runs"]:
        out.print(f"{name} has no interrupted runs")
        return
    for r in rsp["runs"]:
        out.print(f"[bold]run {r['run_id']}[/bold] resumed: {r['status']}")
        print_response(name, r)
