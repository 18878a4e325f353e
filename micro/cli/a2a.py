"""``micro a2a``: the registry's agents as A2A agents, and an A2A client for any agent.

``micro a2a`` serves :mod:`micro.gateway.a2a` with uvicorn (loopback, port 4000 by
default; the flags are ``micro api``'s). ``micro a2a send URL MESSAGE`` and
``micro a2a card URL`` talk to any A2A agent through :class:`micro.a2a.Client`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from micro import metrics
from micro.cli.gateway import _bind, _limits, _serve, loopback, parse_address, token_from, url_of
from micro.cli.main import cli_runtime, err, fail, main, out, run_async

DEFAULT_DRAIN_TIMEOUT = 10.0  # micro.gateway.a2a's; not imported from there: `micro --help` stays fast


@main.group(invoke_without_command=True)
@click.option("--address", default="127.0.0.1:4000", show_default=True,
              help="HOST:PORT to listen on (port 0 picks a free one).")
@click.option("--token-env", metavar="VAR",
              help="Require `Authorization: Bearer $VAR` on every JSON-RPC call (the cards declare it).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds one run may take.")
@click.option("--max-body", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="The largest JSON-RPC body accepted, in bytes; larger gets 413.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also serve requests for this Host name (on loopback only 127.0.0.1, localhost and ::1). "
                   "Repeatable.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="Let browser pages from this origin call the gateway, with CORS. Repeatable.")
@click.option("--public-url", metavar="URL",
              help="The URL clients reach this gateway at, for the cards (default: the URL each request came to).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
              help="Seconds the runs the gateway drives get to finish when it stops (Ctrl-C, SIGTERM); "
                   "the rest are cancelled.")
@_limits
@click.pass_context
def a2a(ctx: click.Context, address: str, token_env: str | None, timeout: float, max_body: int,
        allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...], public_url: str | None, drain_timeout: float,
        head_timeout: float, body_timeout: float, max_connections: int | None) -> None:
    """Serve every agent in the registry over A2A (Agent2Agent protocol v1.0).

    \b
    GET  /agents                                   the Agent Card of every agent
    GET  /agents/NAME/.well-known/agent-card.json  one agent's card
    POST /agents/NAME                              JSON-RPC: SendMessage, SendStreamingMessage,
                                                   GetTask, ListTasks, CancelTask, SubscribeToTask

    \b
    Example:
      micro a2a &
      micro a2a send http://127.0.0.1:4000/agents/task-mgr "What tasks are overdue for Alice?"
    """
    if ctx.invoked_subcommand is not None:
        return
    limits = {"head_timeout": head_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    _gateway(address, token_env, timeout, max_body, allow_hosts, allow_origins, public_url, drain_timeout, limits)


@run_async
async def _gateway(address: str, token_env: str | None, timeout: float, max_body: int,
                   allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...], public_url: str | None,
                   drain_timeout: float, limits: dict[str, Any]) -> None:
    from micro.gateway.a2a import app
    from micro.gateway.http import LOOPBACK_HOSTS

    metrics.enable_if_installed()
    token = token_from(token_env, address)
    host, _ = parse_address(address)
    hosts = [*LOOPBACK_HOSTS, *allow_hosts] if loopback(host) else (list(allow_hosts) or None)
    gateway = app(cli_runtime(), token=token, max_body=max_body, timeout=timeout, allowed_hosts=hosts,
                  allowed_origins=allow_origins, public_url=public_url, drain_timeout=drain_timeout)
    sock = _bind(address)
    url = url_of(sock)
    auth = " (bearer token required)" if token else ""
    await _serve(gateway, sock, lambda: _ready(f"micro a2a on {url}{auth}: GET {url}/agents, "
                                              f"JSON-RPC at {url}/agents/{{name}}"), limits)
    out.print("stopped")


def _ready(line: str) -> None:
    import sys

    out.print(line, markup=False)
    sys.stdout.flush()


def _client_token(var: str | None) -> str | None:
    if var is None:
        return None
    token = os.environ.get(var)
    if not token:
        fail(f"--token-env {var}: the environment variable {var} is not set or is empty", 2)
    return token


@a2a.command()
@click.argument("url")
@click.argument("message")
@click.option("--stream", is_flag=True, help="Print the agent's reply and tool activity as they come.")
@click.option("--context", "context_id", default="", metavar="ID", help="Continue this conversation (context id).")
@click.option("--task", "task_id", default="", metavar="ID",
              help="Send on this task (answer its question, or approve / deny: reason).")
@click.option("--token-env", metavar="VAR", help="Send `Authorization: Bearer $VAR`.")
@click.option("--json", "as_json", is_flag=True, help="Print the task (or each event) as JSON.")
@run_async
async def send(url: str, message: str, stream: bool, context_id: str, task_id: str, token_env: str | None,
               as_json: bool) -> None:
    """Send MESSAGE to the A2A agent at URL and print its answer (any A2A agent, micro's or not).

    \b
    Example:
      micro a2a send http://127.0.0.1:4000/agents/task-mgr "Delete task t7"
      micro a2a send http://127.0.0.1:4000/agents/task-mgr approve --task TASK_ID
    """
    from google.protobuf.json_format import MessageToDict

    from micro.a2a.client import Client, text_of

    async with Client(url, token=_client_token(token_env)) as agent:
        if not stream:
            task = await agent.send(message, context_id=context_id, task_id=task_id)
            if as_json:
                out.print(json.dumps(MessageToDict(task), ensure_ascii=False), markup=False)
                return
            _print_task(task, text_of)
            return
        midline = False
        async for ev in agent.stream(message, context_id=context_id, task_id=task_id):
            if as_json:
                out.print(json.dumps(MessageToDict(ev), ensure_ascii=False), markup=False)
                continue
            midline = _print_event(ev, text_of, midline)


def _state(value: int) -> str:
    from a2a.types import a2a_pb2 as pb

    name = str(pb.TaskState.Name(value))
    return name.removeprefix("TASK_STATE_").lower().replace("_", "-")


def _print_task(task: Any, text_of: Any) -> None:
    from a2a.types import a2a_pb2 as pb

    if isinstance(task, pb.Message):
        out.print(text_of(task), markup=False)
        return
    state = _state(task.status.state)
    if task.status.state == pb.TASK_STATE_COMPLETED:
        out.print(text_of(task), markup=False)
    else:
        said = text_of(task.status)
        out.print(f"[{state}] {said}" if said else f"[{state}]", markup=False)
    err.print(f"task {task.id} ({state}), context {task.context_id}", markup=False)


def _print_event(ev: Any, text_of: Any, midline: bool) -> bool:
    """Print one event of a stream; returns whether the reply's line is still open."""
    from a2a.types import a2a_pb2 as pb

    def end_line() -> None:
        if midline:
            out.print("", markup=False)

    if ev.HasField("task"):
        err.print(f"task {ev.task.id} ({_state(ev.task.status.state)}), context {ev.task.context_id}", markup=False)
    elif ev.HasField("artifact_update"):
        if not ev.artifact_update.last_chunk:  # the last chunk is the whole reply again
            out.print(text_of(ev.artifact_update.artifact), end="", markup=False)
            return True
    elif ev.HasField("status_update"):
        status = ev.status_update.status
        said = text_of(status)
        if status.state == pb.TASK_STATE_WORKING and said:
            end_line()
            err.print(said, markup=False)
            return False
        if status.state != pb.TASK_STATE_WORKING:
            end_line()
            out.print(f"[{_state(status.state)}]{' ' + said if said else ''}", markup=False)
            return False
    elif ev.HasField("message"):
        end_line()
        out.print(text_of(ev.message), markup=False)
        return False
    return midline


@a2a.command()
@click.argument("url")
@click.option("--token-env", metavar="VAR", help="Send `Authorization: Bearer $VAR`.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole card as JSON.")
@run_async
async def card(url: str, token_env: str | None, as_json: bool) -> None:
    """Print the Agent Card of the A2A agent at URL (its name, description, skills, interfaces).

    \b
    Example:
      micro a2a card http://127.0.0.1:4000/agents/task-mgr
    """
    from google.protobuf.json_format import MessageToDict

    from micro.a2a.client import card as fetch

    found = await fetch(url, token=_client_token(token_env))
    if as_json:
        out.print(json.dumps(MessageToDict(found), ensure_ascii=False, indent=2), markup=False)
        return
    out.print(f"{found.name} {found.version}".strip(), markup=False)
    if found.description:
        out.print(f"  {found.description}", markup=False)
    for i in found.supported_interfaces:
        out.print(f"  interface: {i.protocol_binding} {i.url} (A2A {i.protocol_version or '?'})", markup=False)
    caps = [c for c in ("streaming", "push_notifications") if getattr(found.capabilities, c)]
    out.print(f"  capabilities: {', '.join(caps) or 'none'}", markup=False)
    if found.security_schemes:
        out.print(f"  security: {', '.join(sorted(found.security_schemes))}", markup=False)
    for s in found.skills:
        out.print(f"  skill {s.id}: {s.description}", markup=False)
