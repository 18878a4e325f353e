"""``micro chat``: talk to the agents in the registry.

One agent: messages go straight to its ``Agent.StreamChat``. Several: a router
(a model call, or the labelled keyword router without a key) picks one or more,
which are asked concurrently; their lines are labelled ``[agent]``. The agents
are looked up again for every message, so agents that start or stop while the
chat runs are seen on the next one. Interactive with a terminal (line editing,
history in ``$MICRO_HOME/chat_history``, Ctrl-C cancels the turn, Ctrl-D exits);
one-shot with ``-m`` or when stdin is not a terminal.

A run that waits for a person (a tool call that needs approval, or the model's
question) ends its stream with a ``paused`` / ``input_required`` event. The REPL
shows the pending call(s) and asks ``approve? [y/N/reason]`` (or shows the question
and reads the answer), then continues the run (``Agent.StreamResume``); one-shot
mode prints what the run waits for and the commands that continue it.

No agents registered: with a model provider configured, the chat talks to the
services directly (one model over every service's endpoints as tools, the
conversation kept for the chat's lifetime, lines labelled ``[services]``);
without one, it says how to start an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import click

from micro.cli.main import cli_runtime, err, fail, main, missing, out, run_async
from micro.errors import BadRequest

TRUNCATE = 160


class _Routes(Protocol):
    async def route(self, message: str, agents: list[Any]) -> list[Any]: ...


DIRECT_LABEL = "services"
DIRECT_PROMPT = ("You operate a system of services through their endpoints, which are your tools. "
                 "Answer the user's questions and do what they ask by calling them.")


class DirectChat:
    """The chat with no agents: one model over every registered service's endpoints as tools.

    The conversation is kept in memory for the life of the chat (one ``micro chat`` process).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.history: list[Any] = []

    async def turn(self, rt: Any, message: str, timeout: float) -> None:
        from micro.agent import Run, Toolset
        from micro.agent.loop import Event, Limits, system_prompt
        from micro.ai import Message

        records = await rt.registry.list()
        services = sorted(r.name for r in records if r.metadata.get("type", "service") == "service")
        if not services:
            fail("no agents and no services are registered: start some with `micro run`")
        printer = Printer(_write, labelled_lines=False)

        async def emit(ev: Event) -> None:
            if ev.type == "text":
                printer.event(DIRECT_LABEL, {"type": "text", "text": ev.text})
            elif ev.call is not None:
                import msgspec

                call = {"name": ev.call.name, "input": msgspec.json.encode(ev.call.input).decode(),
                        "result": ev.call.result, "is_error": ev.call.is_error}
                printer.event(DIRECT_LABEL, {"type": ev.type, "tool_call": call})

        run = Run(self.model, system_prompt(DIRECT_PROMPT), Toolset(rt.client, services, {}).tools, Limits(),
                  None, emit)
        printer.start(DIRECT_LABEL)
        with anyio.fail_after(timeout):
            await run(self.history, Message.user(message))
        self.history.extend(run.new_messages)
        printer.done(DIRECT_LABEL)


def _short(text: str, limit: int = TRUNCATE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Printer:
    """Renders chat events: inline streaming for one agent, labelled whole lines for several."""

    def __init__(self, write: Callable[[str], None], *, labelled_lines: bool) -> None:
        self.write = write
        self.labelled_lines = labelled_lines
        self._buffers: dict[str, str] = {}
        self._fresh_line = True  # single-agent mode: nothing written on the current line yet
        self._label = ""  # single-agent mode: the label, written with the first thing the agent says

    def _inline(self, text: str) -> None:
        if text:
            self.write(self._label + text)
            self._label = ""
            self._fresh_line = text.endswith("\n")

    def start(self, agent: str) -> None:
        if not self.labelled_lines:
            self._label = f"[{agent}] "

    def event(self, agent: str, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "text":
            self._text(agent, ev.get("text", ""))
        elif kind in ("tool_start", "tool_end"):
            call = ev.get("tool_call") or {}
            if kind == "tool_start":
                line = f"→ {call.get('name', '?')}({_short(call.get('input', ''), 120)})"
            else:
                mark = "✗" if call.get("is_error") else "←"
                line = f"{mark} {_short(call.get('result', ''))}"
            self._line(agent, line)
        elif kind == "error":
            self._line(agent, f"error: {ev.get('text', '')}")
        elif kind in ("paused", "input_required"):
            self.waiting(agent, ev.get("response") or {})

    def waiting(self, agent: str, rsp: dict[str, Any]) -> None:
        """What a run waits for (one line per pending call)."""
        for p in rsp.get("pending", []):
            if p.get("kind") == "question":
                self._line(agent, f"? {p.get('question', '')}")
            else:
                self._line(agent, f"⏸ {p.get('tool', '?')}({_short(p.get('input', ''), 120)}) needs approval")

    def _text(self, agent: str, text: str) -> None:
        if not self.labelled_lines:
            self._inline(text)
            return
        buf = self._buffers.get(agent, "") + text
        *lines, rest = buf.split("\n")
        for line in lines:
            if line.strip():
                self.write(f"[{agent}] {line}\n")
        self._buffers[agent] = rest

    def _line(self, agent: str, line: str) -> None:
        if self.labelled_lines:
            self._flush(agent)
            self.write(f"[{agent}] {line}\n")
        else:
            self._inline(("" if self._fresh_line else "\n") + line + "\n")

    def _flush(self, agent: str) -> None:
        rest = self._buffers.pop(agent, "")
        if rest.strip():
            self.write(f"[{agent}] {rest}\n")

    def done(self, agent: str) -> None:
        if self.labelled_lines:
            self._flush(agent)
        elif not self._fresh_line:
            self._inline("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


Decide = Callable[[str, dict[str, Any]], Awaitable["dict[str, Any] | None"]]
"""``decide(agent, response)`` -> the ``Agent.Resume`` request for a waiting run, or None to leave it."""


async def turn(rt: Any, router: _Routes, message: str, *, only: str | None, session: str,
               timeout: float, direct: DirectChat | None = None, decide: Decide | None = None) -> int:
    """Route one message, ask the agents concurrently, print as they stream. Returns agents asked
    (0 when there were none and ``direct`` talked to the services instead). A run that waits for a
    person is then put to ``decide`` (the REPL asks inline) and continued, or its commands printed."""
    from micro.agent.router import Route, discover

    agents = await discover(rt.registry)
    if only is not None:
        if all(a.name != only for a in agents):
            await missing(rt, only, "agent")
        routes = [Route(only, message)]
    else:
        if not agents:
            if direct is None:
                fail("no agents are registered: define one with micro.NewAgent(...) and start it with "
                     "`micro run` (or configure a model provider, e.g. ANTHROPIC_API_KEY or --provider, "
                     "to chat with the services directly)")
            await direct.turn(rt, message, timeout)
            return 0
        routes = await router.route(message, agents)
        for r in routes:
            if r.guessed:
                services = ", ".join(s for a in agents for s in a.services if a.name == r.agent)
                err.print(f"[dim](no agent's name or services in the message: asking {r.agent}, which manages "
                          f"{services or 'nothing'}; name a service, or choose with --agent NAME)[/dim]")
    from micro.errors import Error

    printer = Printer(_write, labelled_lines=len(routes) > 1)
    waiting: list[tuple[str, dict[str, Any]]] = []
    refused: list[str] = []

    async def run(agent: str, endpoint: str, req: dict[str, Any]) -> None:
        printer.start(agent)
        try:
            async for ev in rt.client.stream(agent, endpoint, req, timeout=timeout):
                printer.event(agent, ev)
                if ev.get("type") in ("paused", "input_required"):
                    waiting.append((agent, ev.get("response") or {}))
        except Error as exc:  # e.g. the session has a run that waits: one line, not a traceback
            refused.append(f"{agent}: {exc.message}" if len(routes) > 1 else exc.message)
        printer.done(agent)

    async with anyio.create_task_group() as tg:
        for r in routes:
            tg.start_soon(run, r.agent, "Agent.StreamChat", {"message": r.message, "session": session})
    # one at a time: a person answers one question at a time
    while waiting:
        agent, rsp = waiting.pop(0)
        resume = await decide(agent, rsp) if decide is not None else None
        if resume is None:
            _continue_with(agent, rsp)
            continue
        await run(agent, "Agent.StreamResume", resume)
    if refused:
        fail("\n".join(refused))
    return len(routes)


def _continue_with(agent: str, rsp: dict[str, Any]) -> None:
    run_id = rsp.get("run_id", "")
    if rsp.get("status") == "input_required":
        _write(f"[{agent}] waiting for your answer: micro agent answer {agent} {run_id} \"…\"\n")
    else:
        _write(f"[{agent}] waiting for approval: micro agent approve {agent} {run_id}  "
               f"(or --deny --reason \"…\"; micro agent cancel {agent} {run_id})\n")


def _router(provider: str | None, model: str | None) -> tuple[_Routes, DirectChat | None]:
    """The router, and the direct chat used when no agents are registered (None without a model)."""
    from micro.agent.router import KeywordRouter, Router
    from micro.ai import from_provider

    name = provider or os.environ.get("MICRO_PROVIDER")
    if name is None:
        name = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else None
    if name is None or name == "scripted":
        return KeywordRouter(), None
    llm = from_provider(name, model=model)
    return Router(llm), DirectChat(llm)


@main.command()
@click.option("--agent", "only", metavar="NAME", help="Talk to this agent only (no routing).")
@click.option("--provider", help="Model provider for the router (default: $MICRO_PROVIDER, anthropic with a key).")
@click.option("--model", help="Model id for the router.")
@click.option("--session", default="", help="Session id: the agents keep a separate history per session.")
@click.option("-m", "--message", help="Send one message and exit (also: pipe messages on stdin).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds per turn.")
@run_async
async def chat(only: str | None, provider: str | None, model: str | None, session: str,
               message: str | None, timeout: float) -> None:
    """Chat with the agents in the registry (routed to the right one(s))."""
    if message is not None and not message.strip():
        raise BadRequest("micro chat: the message is empty (-m takes the text to send)")
    router, direct = _router(provider, model)
    async with cli_runtime() as rt:
        if message is not None or not sys.stdin.isatty():
            lines = [message] if message is not None else [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
            for line in lines:
                await turn(rt, router, line, only=only, session=session, timeout=timeout, direct=direct)
            return
        await _repl(rt, router, only, session, timeout, direct)


async def _repl(rt: Any, router: _Routes, only: str | None, session: str, timeout: float,
                direct: DirectChat | None = None) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    from micro.registry.local import default_home

    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    prompt: PromptSession[str] = PromptSession(history=FileHistory(str(Path(home) / "chat_history")))
    async def decide(agent: str, rsp: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the person, inline, for a decision on each pending call (or the answer to a question)."""
        decisions = []
        for p in rsp.get("pending", []):
            try:
                if p.get("kind") == "question":
                    text = await prompt.prompt_async(f"[{agent}] answer: ")
                    if not text.strip():
                        return None  # left waiting: the commands are printed
                    decisions.append({"call_id": p["call_id"], "answer": text})
                    continue
                text = (await prompt.prompt_async(f"[{agent}] approve {p.get('tool')}? [y/N/reason] ")).strip()
            except (EOFError, KeyboardInterrupt):
                return None
            if text.lower() in ("y", "yes"):
                decisions.append({"call_id": p["call_id"], "approve": True})
            else:
                why = "" if text.lower() in ("", "n", "no") else text
                decisions.append({"call_id": p["call_id"], "approve": False, "reason": why or "denied in micro chat"})
        return {"run_id": rsp.get("run_id", ""), "decisions": decisions}

    label = getattr(router, "label", "")
    out.print(f"[dim]micro chat — Ctrl-C cancels a turn, Ctrl-D exits{f'; routing: {label}' if label else ''}[/dim]")
    loop = asyncio.get_running_loop()
    while True:
        try:
            text = await prompt.prompt_async("> ")
        except EOFError:
            return
        except KeyboardInterrupt:
            continue
        if not text.strip():
            continue
        task = asyncio.ensure_future(turn(rt, router, text, only=only, session=session, timeout=timeout,
                                          direct=direct, decide=decide))
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            _write("\n[cancelled]\n")
        except SystemExit as exc:  # fail() inside a turn: report and keep chatting
            del exc
        except Exception as exc:
            out.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGINT)


